"""``nnunetv2_em run`` killed (SIGKILL) at every write window of a round, then the same command again.

Real Hippocampus cases, 2 folds x 1 round of the tiny CPU trainer. After every kill a user must find a dataset that
nnU-Net's own ``verify_dataset_integrity`` accepts, whose labelsTr is one complete label version, whose original
annotations are byte-identical, and which ``nnunetv2_em status`` describes; rerunning the command finishes the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import NnUNetWorkspace, demo_cases, make_raw_dataset

from nnunetv2_em import storage

pytestmark = pytest.mark.slow

DATASET_ID = 932
DATASET = "Dataset932_Hippo"
CASES = demo_cases(8)
RUN = ["nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1", "--rounds", "1", "--trainer",
       "VanillaTrainer_tiny", "--device", "cpu", "--no-validation", "--seed", "0"]
# in the order a round reaches them: originals copied, trainings, E-step, staging, the switch, bookkeeping
WINDOWS = ["copying_originals", "fold_trained", "estep_case", "round_staged", "journal_written", "exchanged",
           "preprocessed_partly", "round_activated", "state_written"]


def _sha(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _processes_left(lock: str, grace_s: float = 30) -> list[str]:
    """Command lines of live processes the run started under its lock (the marker in their environment), after
    giving the kill ``grace_s`` to propagate."""
    marker = f"{storage.LOCK_ENV}={lock}".encode()
    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if marker not in handle.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    left.append(handle.read().replace(b"\0", b" ").decode(errors="replace")[:200])
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _run_killed_at(workspace: NnUNetWorkspace, window: str) -> subprocess.CompletedProcess:
    executable = os.path.join(os.path.dirname(sys.executable), RUN[0])
    process = subprocess.Popen([executable, *RUN[1:]], env={**workspace.env, storage.KILL_AT_ENV: window},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
        left = _processes_left(storage.lock_path(os.path.join(workspace.raw, DATASET)))
        assert not left, f"after a kill at {window}, the run's children outlived it: {left}"
    finally:
        try:  # the run's Dask workers and trainings, orphaned by the kill
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def test_a_run_killed_at_every_window_stays_valid_and_finishes(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    workspace = NnUNetWorkspace(str(tmp_path))
    raw = make_raw_dataset(workspace.raw, DATASET_ID, CASES)
    originals = {case: _sha(os.path.join(raw, "labelsTr", f"{case}.nii.gz")) for case in CASES}
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    plans_file = os.path.join(workspace.preprocessed, DATASET, "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    plans["em"].update({"min_model_dice": 0.0, "mirroring": False, "max_ignored_share": 1.0})  # it must refine
    with open(plans_file, "w") as handle:
        json.dump(plans, handle)

    preprocessed = os.path.join(workspace.preprocessed, DATASET)
    for window in WINDOWS:
        killed = _run_killed_at(workspace, window)
        assert killed.returncode == -signal.SIGKILL, f"{window} not reached:\n{killed.stdout[-3000:]}"
        verify_dataset_integrity(raw, num_processes=1)
        versions = storage.dataset_versions(raw, preprocessed)
        state = storage.labels_folder_state(versions)
        if versions.has_originals():
            assert versions.changed_originals() == []
            assert {case: _sha(versions.label_path(0, case)) for case in CASES} == originals
            assert state["equal_to"] is not None, f"after a kill at {window}, labelsTr is no complete version"
        else:
            assert {case: _sha(os.path.join(raw, "labelsTr", f"{case}.nii.gz")) for case in CASES} == originals
        status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
        unfinished = os.path.isfile(versions.journal_path())
        assert ("UNFINISHED" in status) == unfinished, (window, status)
        assert "lock: free" in status

    finished = workspace.run(*RUN)
    assert "1 round(s) done" in finished.stdout
    assert "labelsTr holds round 1 of run em_run__VanillaTrainer_tiny__nnUNetPlans__2d" in finished.stdout
    verify_dataset_integrity(raw, num_processes=1)
    status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert "labelsTr: round 1 of run" in status and "checksums match" in status and "UNFINISHED" not in status
    versions = storage.dataset_versions(raw, preprocessed)
    assert {case: _sha(versions.label_path(0, case)) for case in CASES} == originals
    assert storage.lock_holder(raw) is None
    fold_folder = os.path.join(workspace.results, DATASET, "em_run__VanillaTrainer_tiny__nnUNetPlans__2d",
                               "round_01", "nnUNet_results", DATASET, "VanillaTrainer_tiny__nnUNetPlans__2d", "fold_1")
    with open(os.path.join(fold_folder, "em_mstep_done.json")) as handle:
        assert json.load(handle)["seed"] == 0
    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "0")
    assert {case: _sha(os.path.join(raw, "labelsTr", f"{case}.nii.gz")) for case in CASES} == originals
    assert sorted(os.listdir(os.path.join(raw, "labelsTr"))) == sorted(f"{case}.nii.gz" for case in CASES)
