"""``python -m nnunetv2_em.process_group COMMAND...``: run COMMAND as the leader of a process group of its own
and end the whole group with it.

nnU-Net's trainer forks augmentation workers (daemonic ``multiprocessing`` children, ended only when the trainer
exits normally); killed, the trainer leaves them running. ``engine.run_child`` starts every training and
prediction through this wrapper, which dies with its Dask worker (``PR_SET_PDEATHSIG``): on that signal, on
SIGINT/SIGHUP, and when the command exits however it exits, the wrapper SIGKILLs the command's whole group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def load_libc():
    return ctypes.CDLL("libc.so.6", use_errno=True)


def die_with_parent(libc, sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that started it ends (Linux)."""
    libc.prctl(PR_SET_PDEATHSIG, sig)


def end_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def main(command: list[str]) -> int:
    if not command:
        print("usage: python -m nnunetv2_em.process_group COMMAND [ARGS...]", file=sys.stderr)
        return 2
    libc = load_libc()  # loaded before the fork: the child only calls into it
    group: list[int] = []

    def on_signal(signum, _frame):
        if group:
            end_group(group[0])
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    def in_child():  # between fork and exec: a group of its own, and killed if this wrapper is killed
        os.setpgid(0, 0)
        die_with_parent(libc, signal.SIGKILL)

    child = subprocess.Popen(command, preexec_fn=in_child)
    group.append(child.pid)
    code = child.wait()
    end_group(child.pid)  # whatever the command left behind in its group
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
