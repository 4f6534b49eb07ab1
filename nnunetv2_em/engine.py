"""Dask execution: an embedded LocalCluster by default, worker jobs on SLURM / PBS / SGE (``nnunetv2_em.cluster``),
or an existing scheduler.

Tasks that need the accelerator (or all cores), trainings and predictions, ask for the worker resource
``device=1``; every worker offers exactly one, so two of them never share a device. Other tasks (per-case E-step
work) run on any worker thread. Heavy tasks run nnU-Net in a child process, which dies with the worker.

Worker jobs on a batch system: ``nnunetv2_em run --cluster slurm`` (see ``nnunetv2_em.cluster``). An existing
cluster: start each worker with ``--resources device=1`` (one worker per GPU, with its own ``CUDA_VISIBLE_DEVICES``)
on machines that share the nnU-Net folders, then pass ``--scheduler tcp://host:8786``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

DEVICE = "device"
SCHEDULER_TIMEOUT_S = 10


@contextlib.contextmanager
def open_client(scheduler: str | None = None, *, device: str = "cpu", jobs=None):
    """A ``distributed.Client``: connected to ``scheduler``, to worker jobs of a batch system (``jobs``:
    ``cluster.JobOptions``), or to a LocalCluster sized to this machine (one worker per GPU, one worker for a
    CPU-only machine, the cores shared among them)."""
    from distributed import Client, LocalCluster

    if jobs is not None:
        from nnunetv2_em.cluster import job_client

        if scheduler:
            from nnunetv2_em.errors import EMInputError

            raise EMInputError("--scheduler and --cluster both given. Fix: pass one (--cluster starts its own "
                               "scheduler and submits the worker jobs).")
        with job_client(jobs, resource=DEVICE) as client:
            yield client
        return
    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            from nnunetv2_em.errors import EMInputError

            raise EMInputError(f"--scheduler {scheduler}: no Dask scheduler answered within {SCHEDULER_TIMEOUT_S} s "
                               f"({type(error).__name__}). Fix: start it (`dask scheduler`) or correct the address; "
                               f"without --scheduler the run starts its own cluster.") from None
        with client:
            yield client
        return
    gpus = 0
    if device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
    workers = max(1, gpus)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, resources={DEVICE: 1},
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def worker_device_env(device: str) -> dict[str, str]:
    """Environment for a child process on this worker: on a LocalCluster with several GPUs, worker ``i`` uses
    GPU ``i`` unless the worker already has ``CUDA_VISIBLE_DEVICES``."""
    if not device.startswith("cuda") or "CUDA_VISIBLE_DEVICES" in os.environ:
        return {}
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(name)} if isinstance(name, int) else {}


def without_worker_limits(env: dict) -> dict:
    """``env`` without what a Dask nanny injects into its workers (``distributed.nanny.pre-spawn-environ``:
    ``MALLOC_TRIM_THRESHOLD_=65536`` and one OpenMP/BLAS thread). A child here is an nnU-Net training or
    prediction that owns the worker's device and cores, not a small Dask task; with that trim threshold glibc
    returns and refaults every large tensor, which doubled CPU epoch times (28 s -> 55 s on Hippocampus 2d).
    A value that differs from Dask's default was set by the user and is kept."""
    try:
        import dask

        injected = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    except ImportError:
        injected = {}
    return {key: value for key, value in env.items()
            if key not in injected or str(injected[key]) != str(value)}


def run_child(command: list[str], *, env: dict, log_file: str) -> None:
    """Run a child process with its output in ``log_file``. It runs through ``nnunetv2_em.process_group``, so it
    and everything it starts (nnU-Net's augmentation workers) end when it ends or when this process dies. Raises
    with the end of the log on failure."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        if os.name == "posix":
            from nnunetv2_em.process_group import die_with_parent, load_libc

            libc = load_libc()  # loaded here: between fork and exec the child only calls into it
            command_line = [sys.executable, "-m", "nnunetv2_em.process_group", *command]
            result = subprocess.run(command_line, env=without_worker_limits(env), stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=lambda: die_with_parent(libc, signal.SIGTERM))
        else:
            result = subprocess.run(command, env=without_worker_limits(env), stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode} (log: {log_file}):\n"
                           f"{tail}")
