"""Workers as batch jobs: ``nnunetv2_em run --cluster slurm`` (or ``pbs`` / ``sge``) through dask-jobqueue.

Each job runs one Dask worker that offers the ``device=1`` resource (``engine.DEVICE``, passed in), so every
training or prediction gets a job of its own and its GPUs. Site defaults live where dask-jobqueue keeps them
(``~/.config/dask/jobqueue.yaml``, or the file given with ``--cluster-config``: the same format, a
``jobqueue: {slurm: {...}}`` block); options given on the command line win.

Jobs that end (walltime, preemption, ``scancel``) are submitted again by ``JobWatchdog``, which dask-jobqueue does not
do by itself (dask/dask-jobqueue#611, #691); the scheduler retries the tasks that were running on them
(``distributed.scheduler.allowed-failures``). The run's state is on disk, so a run whose allocation ended entirely
continues with the same command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading

from nnunetv2_em.errors import EMInputError

KINDS = ("slurm", "pbs", "sge")
# what a job must export for the worker's nnU-Net children: the folders, and the knobs a user or test set here
FORWARDED_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_def_n_proc", "nnUNet_n_proc_DA",
                 "nnUNet_compile", "nnUNet_USE_BLOSC2", "CUDA_VISIBLE_DEVICES_POLICY")
WATCH_INTERVAL_S = 5.0
JOB_NAME = "nnunetv2_em-worker"  # what squeue / qstat show


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """What each worker job asks the batch system for; ``None`` leaves a value to the site config (or to
    dask-jobqueue's default)."""

    kind: str = "slurm"
    jobs: int = 1  # worker jobs kept alive (one worker, one device each)
    queue: str | None = None  # SLURM partition / PBS or SGE queue
    account: str | None = None
    walltime: str | None = None  # e.g. 24:00:00
    memory: str | None = None  # per job, e.g. 64GB
    cores: int | None = None  # per job
    gpus: int = 0  # per job: SLURM --gres=gpu:N
    extra_directives: tuple[str, ...] = ()  # more #SBATCH / #PBS / #$ lines, e.g. --constraint=a100
    config_file: str | None = None  # YAML in dask-jobqueue's format
    log_directory: str | None = None  # one .out/.err per job

    def check(self) -> None:
        if self.kind not in KINDS:
            raise EMInputError(f"--cluster {self.kind}: unknown. Fix: one of {', '.join(KINDS)}.")
        if self.jobs < 1:
            raise EMInputError(f"--jobs {self.jobs}: must be at least 1. Fix: e.g. --jobs 5 (one per fold).")
        if self.gpus < 0 or self.cores is not None and self.cores < 1:
            raise EMInputError(f"--gpus-per-job {self.gpus} / --job-cores {self.cores}: must be positive. Fix: e.g. "
                               f"--gpus-per-job 1 --job-cores 8.")
        if self.gpus and self.kind != "slurm":
            raise EMInputError(f"--gpus-per-job with --cluster {self.kind}: the GPU request is site-specific there. "
                               f"Fix: pass it with --job-extra (e.g. '-l ngpus=1' on PBS).")
        if self.config_file is not None and not os.path.isfile(self.config_file):
            raise EMInputError(f"--cluster-config {self.config_file}: not found. Fix: pass a YAML file in "
                               f"dask-jobqueue's format (jobqueue: {{{self.kind}: {{...}}}}).")


# the keys of dask-jobqueue's config (and keyword arguments) a site may set for our jobs
SITE_KEYS = ("queue", "account", "walltime", "memory", "cores", "job_name", "log_directory", "job_extra_directives",
             "job_script_prologue", "worker_extra_args", "python", "interface", "local_directory", "death_timeout",
             "job_directives_skip", "shebang", "job_cpu", "job_mem", "scheduler_options")


def _site_config(options: JobOptions) -> dict:
    """The site's defaults for ``options.kind``: the ``jobqueue.<kind>`` block of ``--cluster-config``, else of
    dask's own config (``~/.config/dask/jobqueue.yaml``, ``DASK_*`` variables); keys as keyword arguments, unset
    ones left out."""
    if options.config_file is None:
        import dask

        block = dask.config.get(f"jobqueue.{options.kind}", default={}) or {}
    else:
        import yaml

        try:
            with open(options.config_file) as handle:
                loaded = yaml.safe_load(handle) or {}
            block = loaded.get("jobqueue", {}).get(options.kind, {}) if isinstance(loaded, dict) else None
        except (yaml.YAMLError, AttributeError) as error:
            raise EMInputError(f"--cluster-config {options.config_file}: not a YAML mapping ({error}). Fix: write "
                               f"jobqueue: {{{options.kind}: {{queue: ..., walltime: ...}}}}.") from None
        if not isinstance(block, dict):
            raise EMInputError(f"--cluster-config {options.config_file}: jobqueue.{options.kind} is not a mapping. "
                               f"Fix: jobqueue: {{{options.kind}: {{queue: ..., walltime: ...}}}}.")
    block = {str(key).replace("-", "_"): value for key, value in block.items()}
    return {key: block[key] for key in SITE_KEYS if block.get(key) is not None}


def cluster_arguments(options: JobOptions, *, resource: str, env: dict[str, str] | None = None) -> dict:
    """Keyword arguments of dask-jobqueue's cluster class: the site's defaults, then the options given; one worker
    process per job offering one unit of ``resource`` (``engine.DEVICE``); the job exports the nnU-Net folders (and
    knobs) of ``env`` and runs this Python."""
    env = os.environ if env is None else env
    arguments = _site_config(options)
    given = {"queue": options.queue, "account": options.account, "walltime": options.walltime,
             "memory": options.memory, "cores": options.cores, "log_directory": options.log_directory}
    arguments.update({key: value for key, value in given.items() if value is not None})
    arguments.setdefault("cores", 1)
    arguments.setdefault("memory", "8GB")
    arguments.setdefault("job_name", JOB_NAME)
    directives = list(arguments.get("job_extra_directives") or [])
    if options.gpus:
        directives.append(f"--gres=gpu:{options.gpus}")
    directives += list(options.extra_directives)
    worker_arguments, skip = [], False
    for argument in arguments.get("worker_extra_args") or []:  # a site's own --resources gives way to ours
        if skip or argument == "--resources":
            skip = not skip
            continue
        worker_arguments.append(argument)
    prologue = list(arguments.get("job_script_prologue") or [])
    prologue += [f"export {key}={_shell_quote(env[key])}" for key in FORWARDED_ENV if env.get(key)]
    arguments.update(processes=1, job_extra_directives=directives, job_script_prologue=prologue,
                     worker_extra_args=[*worker_arguments, "--resources", f"{resource}=1"],
                     python=arguments.get("python", sys.executable),
                     scheduler_options={"dashboard_address": None, **(arguments.get("scheduler_options") or {})})
    return arguments


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def cluster_class(kind: str):
    import dask_jobqueue

    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
            "sge": dask_jobqueue.SGECluster}[kind]


def dead_jobs(spec_names, ever_connected: set[str], connected_now: set[str]) -> list[str]:
    """Jobs in the cluster's spec whose worker connected once and is gone now (ended, killed, preempted). Jobs still
    waiting in the queue (never connected) are not dead."""
    return sorted(name for name in spec_names if name in ever_connected and name not in connected_now)


class JobWatchdog:
    """Keeps ``jobs`` worker jobs alive: every ``interval`` seconds, a job whose worker connected and left is dropped
    from the cluster's spec and the cluster scaled back to ``jobs`` (a fresh submission); ``resubmitted`` counts
    them."""

    def __init__(self, cluster, jobs: int, *, interval: float = WATCH_INTERVAL_S):
        self.cluster, self.jobs, self.interval = cluster, jobs, interval
        self.ever_connected: set[str] = set()
        self.resubmitted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nnunetv2_em-job-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.interval * 2)

    def connected(self) -> set[str]:
        workers = self.cluster.scheduler_info.get("workers", {})
        return {str(info.get("name")) for info in workers.values()}

    def check(self) -> list[str]:
        """One look: resubmit the dead jobs; returns their names."""
        connected = self.connected()
        self.ever_connected |= connected
        dead = dead_jobs(list(self.cluster.worker_spec), self.ever_connected, connected)
        for name in dead:
            self.cluster.worker_spec.pop(name, None)
            self.cluster.workers.pop(name, None)
        if dead:
            self.resubmitted += dead
            print(f"nnunetv2_em: worker job(s) {', '.join(dead)} ended; submitting {len(dead)} new job(s)",
                  file=sys.stderr, flush=True)
        if dead or len(self.cluster.worker_spec) < self.jobs:
            self.cluster.scale(jobs=self.jobs)
        return dead

    def _watch(self):
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 (a watchdog that dies would leave the run without workers)
                print(f"nnunetv2_em: job watchdog: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def job_client(options: JobOptions, *, resource: str):
    """A ``distributed.Client`` on a dask-jobqueue cluster of ``options.jobs`` worker jobs, each offering one unit
    of ``resource``, kept alive by the watchdog; the jobs are cancelled when the block ends."""
    from distributed import Client

    options.check()
    try:
        cluster = cluster_class(options.kind)(**cluster_arguments(options, resource=resource))
    except (OSError, ValueError, TypeError) as error:
        raise EMInputError(f"--cluster {options.kind}: dask-jobqueue could not set up the cluster "
                           f"({type(error).__name__}: {error}). Fix: check the options and the site config "
                           f"(--cluster-config or ~/.config/dask/jobqueue.yaml).") from None
    with cluster:
        cluster.scale(jobs=options.jobs)
        with JobWatchdog(cluster, options.jobs), Client(cluster) as client:
            yield client
