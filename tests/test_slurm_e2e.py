"""``nnunetv2_em run --cluster slurm`` on a real one-node SLURM (``.ci/slurm_single_host.sh``, installed through apt
when missing): the workers run as ``sbatch`` jobs, a job cancelled mid-training is submitted again and its task
retried, and the run ends with the same labels as a local run of the same seed."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REFINE_ALWAYS, NnUNetWorkspace, demo_cases, make_raw_dataset, update_em_plans

pytestmark = pytest.mark.slow

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
DATASET_ID = 982
DATASET = "Dataset982_Hippo"
CASES = demo_cases(8)
RUN = ["nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1", "--rounds", "1", "--trainer",
       "VanillaTrainer_tiny", "--device", "cpu", "--no-validation", "--seed", "0"]
# one job at a time on this 2-core machine: one worker, both cores, the trainings one after the other
CLUSTER = ["--cluster", "slurm", "--jobs", "1", "--job-cores", "2", "--job-memory", "6GB", "--walltime", "00:30:00"]


@pytest.fixture(scope="module")
def slurm() -> str:
    """The job-completion log of a running one-node SLURM; skipped where this host cannot have one."""
    if os.geteuid() != 0:
        pytest.skip("starting the SLURM daemons needs root")
    try:  # bounded: an unreachable package mirror or a node that never comes up must not eat CI's 90 minutes
        started = subprocess.run(["bash", str(REPOSITORY / ".ci" / "slurm_single_host.sh")], capture_output=True,
                                 text=True, timeout=420)
    except subprocess.TimeoutExpired:
        pytest.skip("setting up a one-node SLURM took more than 7 minutes on this host")
    if started.returncode == 3:
        pytest.skip(f"no SLURM on this host: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    # worker jobs of an earlier, interrupted test run would hold the node's cores
    subprocess.run(["scancel", "--name", "nnunetv2_em-worker"], check=False)
    return "/var/lib/nnunetv2_em_slurm/jobcomp.log"


def _prepared(root: str) -> NnUNetWorkspace:
    workspace = NnUNetWorkspace(root)
    make_raw_dataset(workspace.raw, DATASET_ID, CASES)
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d")
    update_em_plans(workspace, DATASET, REFINE_ALWAYS)
    return workspace


def _labels(workspace: NnUNetWorkspace) -> dict[str, str]:
    folder = pathlib.Path(workspace.raw) / DATASET / "labelsTr"
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.nii.gz"))}


def _running_jobs() -> list[str]:
    listed = subprocess.run(["squeue", "-h", "-t", "R", "-n", "nnunetv2_em-worker", "-o", "%i"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_run_on_slurm_survives_a_cancelled_job_and_gives_the_local_runs_labels(slurm, tmp_path):
    local = _prepared(str(tmp_path / "local"))
    workspace = NnUNetWorkspace(str(tmp_path / "slurm"))  # the same planned dataset, before any run touched it
    for source, target in ((local.raw, workspace.raw), (local.preprocessed, workspace.preprocessed)):
        shutil.copytree(source, target, dirs_exist_ok=True)
    local.run(*RUN)

    before = set(open(slurm).read().split("\n")) if os.path.isfile(slurm) else set()
    run_folder = pathlib.Path(workspace.results) / DATASET / "em_run__VanillaTrainer_tiny__nnUNetPlans__2d"
    training_log = run_folder / "round_01" / "logs" / "train_fold_0.log"
    script = os.path.join(os.path.dirname(sys.executable), RUN[0])  # this environment's console script
    process = subprocess.Popen([script, *RUN[1:], *CLUSTER], env=workspace.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
    try:
        cancelled = None
        deadline = time.time() + 300
        while cancelled is None and time.time() < deadline and process.poll() is None:
            jobs = _running_jobs()
            if jobs and training_log.is_file() and "Epoch" in training_log.read_text(errors="replace"):
                cancelled = jobs[0]
                subprocess.run(["scancel", cancelled], check=True)
            time.sleep(1)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert cancelled is not None, "no training job was seen running"
    assert process.returncode == 0, output[-4000:]
    assert "worker job(s)" in output and "submitting 1 new job(s)" in output  # the watchdog's line

    finished = [line for line in open(slurm).read().split("\n") if line and line not in before]
    ours = [line for line in finished if "Name=nnunetv2_em-worker" in line]
    assert any(f"JobId={cancelled} " in line and "JobState=CANCELLED" in line for line in ours), finished
    assert len(ours) >= 2  # the cancelled job and the one submitted in its place (cancelled when the run ended)
    logs = list((run_folder / "cluster_logs").glob("*.out")) + list((run_folder / "cluster_logs").glob("*.err"))
    assert logs, "the jobs' logs are in the run folder"
    assert _labels(workspace) == _labels(local)
