"""Worker jobs through dask-jobqueue (``nnunetv2_em run --cluster``): the job a batch system gets, the site config,
the refusals, and the watchdog that submits ended jobs again. No batch system is needed: dask-jobqueue writes the
job script without submitting it."""

from __future__ import annotations

import sys

import pytest

from nnunetv2_em import cluster, engine
from nnunetv2_em.errors import EMInputError

ENV = {"nnUNet_raw": "/data/raw", "nnUNet_preprocessed": "/data/pre processed", "nnUNet_results": "/data/results",
       "HOME": "/home/u"}


def _job_script(options: cluster.JobOptions) -> str:
    arguments = cluster.cluster_arguments(options, resource=engine.DEVICE, env=ENV)
    with cluster.cluster_class(options.kind)(**arguments) as jobs:
        return jobs.job_script()


def test_a_slurm_job_runs_one_worker_offering_one_device_with_the_nnunet_folders(tmp_path):
    script = _job_script(cluster.JobOptions(kind="slurm", jobs=2, queue="gpu", account="lab", walltime="02:00:00",
                                            memory="16GB", cores=4, gpus=1, extra_directives=("--constraint=a100",),
                                            log_directory=str(tmp_path / "logs")))
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --gres=gpu:1", "#SBATCH --constraint=a100", f"#SBATCH -o {tmp_path / 'logs'}"):
        assert line in script, line
    assert "export nnUNet_raw=/data/raw" in script
    assert "export nnUNet_preprocessed='/data/pre processed'" in script  # quoted for the shell
    assert "HOME" not in script
    worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    assert worker.startswith(sys.executable) and "--resources device=1" in worker and "--nthreads 4" in worker


def test_the_site_config_gives_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "jobqueue.yaml"
    config.write_text("jobqueue:\n  slurm:\n    queue: short\n    walltime: '00:30:00'\n    memory: 4GB\n"
                      "    job_extra_directives: ['--qos=low']\n    job_script_prologue: ['module load cuda']\n"
                      "    worker-extra-args: ['--lifetime', '25m', '--resources', 'GPU=2']\n    cores: null\n")
    arguments = cluster.cluster_arguments(cluster.JobOptions(walltime="01:00:00", config_file=str(config)),
                                          resource=engine.DEVICE, env=ENV)
    assert arguments["queue"] == "short" and arguments["memory"] == "4GB" and arguments["walltime"] == "01:00:00"
    assert arguments["job_extra_directives"] == ["--qos=low"]
    assert arguments["job_script_prologue"][0] == "module load cuda"
    assert arguments["worker_extra_args"] == ["--lifetime", "25m", "--resources", "device=1"]
    assert arguments["processes"] == 1 and arguments["cores"] == 1  # unset in the file: our default
    script = _job_script(cluster.JobOptions(walltime="01:00:00", config_file=str(config)))
    assert "#SBATCH -p short" in script and "#SBATCH -t 01:00:00" in script and "--lifetime 25m" in script


@pytest.mark.parametrize("options, message", [
    (dict(kind="lsf"), "--cluster lsf: unknown"),
    (dict(jobs=0), "--jobs 0: must be at least 1"),
    (dict(kind="pbs", gpus=1), "Fix: pass it with --job-extra"),
    (dict(cores=0), "must be positive"),
    (dict(config_file="/nowhere/jobqueue.yaml"), "--cluster-config /nowhere/jobqueue.yaml: not found"),
])
def test_impossible_job_options_are_refused_with_the_fix(options, message):
    with pytest.raises(EMInputError, match=message):
        cluster.JobOptions(**options).check()


def test_a_config_file_that_is_not_jobqueue_yaml_is_refused(tmp_path):
    for text in ("jobqueue: [1, 2", "jobqueue:\n  slurm: 3\n"):
        config = tmp_path / "bad.yaml"
        config.write_text(text)
        with pytest.raises(EMInputError, match=f"--cluster-config {config}"):
            cluster.cluster_arguments(cluster.JobOptions(config_file=str(config)), resource=engine.DEVICE, env=ENV)


def test_run_refuses_a_scheduler_and_a_cluster_together_before_anything_else(nnunet_env, capsys):
    from nnunetv2_em.cli import main

    code = main(["run", "-d", "999", "--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1", "--folds", "0", "1"])
    assert code == 2 and "--scheduler and --cluster both given" in capsys.readouterr().err
    with pytest.raises(EMInputError, match="--scheduler and --cluster both given"):  # the API says the same
        with engine.open_client("tcp://127.0.0.1:1", jobs=cluster.JobOptions()):
            pass


class _FakeCluster:
    """What the watchdog touches of a dask-jobqueue cluster: its spec, its jobs, the scheduler's workers, scale."""

    def __init__(self, names):
        self.worker_spec = {name: {} for name in names}
        self.workers = {name: object() for name in names}
        self.scheduler_info = {"workers": {}}
        self.scaled = []
        self._next = len(names)

    def connect(self, *names):
        self.scheduler_info = {"workers": {f"tcp://h:{i}": {"name": n} for i, n in enumerate(names)}}

    def scale(self, jobs):
        self.scaled.append(jobs)
        while len(self.worker_spec) < jobs:
            name = f"job-{self._next}"
            self._next += 1
            self.worker_spec[name], self.workers[name] = {}, object()


def test_dead_jobs_are_those_whose_worker_connected_and_left_not_those_still_queued():
    assert cluster.dead_jobs(["a", "b", "c"], ever_connected={"a", "b"}, connected_now={"b"}) == ["a"]
    assert cluster.dead_jobs(["a", "c"], ever_connected=set(), connected_now=set()) == []


def test_the_watchdog_submits_an_ended_job_again_and_leaves_queued_ones_alone():
    fake = _FakeCluster(["job-0", "job-1"])
    watchdog = cluster.JobWatchdog(fake, 2)
    assert watchdog.check() == [] and fake.scaled == []  # both queued: nothing to do
    fake.connect("job-0", "job-1")
    assert watchdog.check() == []
    fake.connect("job-1")  # job-0 was cancelled (scancel, walltime, preemption)
    assert watchdog.check() == ["job-0"]
    assert sorted(fake.worker_spec) == ["job-1", "job-2"] and fake.scaled == [2]
    assert watchdog.check() == [] and watchdog.resubmitted == ["job-0"]  # job-2 is queued, not dead


def test_without_a_file_dask_jobqueues_own_config_is_the_site_config():
    import dask

    with dask.config.set({"jobqueue.slurm.queue": "from-dask", "jobqueue.slurm.job-extra-directives": ["--qos=x"],
                          "jobqueue.slurm.memory": "32GB"}):
        arguments = cluster.cluster_arguments(cluster.JobOptions(memory="16GB"), resource=engine.DEVICE, env=ENV)
    assert arguments["queue"] == "from-dask" and arguments["memory"] == "16GB"
    assert arguments["job_extra_directives"] == ["--qos=x"]
