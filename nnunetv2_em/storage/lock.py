"""The dataset's lock: one command at a time changes a dataset's labels; what a killed holder left behind is
ended and cleaned by the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.storage.files import TEMP_DIR_PREFIX
from nnunetv2_em.storage.versions import EM_LABELS

LOCK_SUFFIX = ".em_lock"  # beside the raw dataset folder: <nnUNet_raw>/<Dataset>.em_lock
LOCK_ENV = "NNUNETV2_EM_LOCK"  # set while the lock is held: every process started under it inherits it


def lock_path(raw_folder: str) -> str:
    """The dataset's lock file, keyed by the raw dataset's real folder (links followed), so two runs over the same
    raw dataset share it whatever their preprocessed folders. Beside the folder, not in it: nnU-Net lists only
    folders there, and the dataset's own tree stays untouched."""
    return os.path.realpath(raw_folder).rstrip(os.sep) + LOCK_SUFFIX


@contextlib.contextmanager
def dataset_lock(raw_folder: str, preprocessed_folder: str):
    """Hold the dataset's lock (runs, restores and review imports take it): an OS lock (``flock``) on a file that
    is never deleted, released by the kernel when the process ends, however it ends. One clear error when another
    process holds it. Taking it ends what a killed holder left running and removes its temp folders."""
    path = lock_path(raw_folder)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise EMInputError(f"{os.path.basename(os.path.normpath(raw_folder))}: an nnunetv2_em command is already "
                           f"working on this dataset ({holder}; lock {path}). Fix: wait for it to finish or stop it, "
                           f"then run again.") from None
    reap_leftover_processes(path)
    remove_stale_temp_folders(raw_folder, preprocessed_folder)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    previous_env = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = path
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous_env
        handle.seek(0)
        handle.truncate()  # under the lock: the file itself stays, so no one can ever lock a different inode
        handle.close()


def reap_leftover_processes(path: str) -> list[int]:
    """SIGKILL every process that a previous holder of the lock ``path`` started and that outlived it (a kill -9
    of a run leaves nnU-Net's augmentation workers behind): they carry ``NNUNETV2_EM_LOCK=<path>`` in their
    environment. Called with the lock held, so no live holder owns them. Returns the pids ended."""
    marker = f"{LOCK_ENV}={path}".encode()
    own = {os.getpid(), *_ancestors()}
    ended = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environment = handle.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marker in environment:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)
                ended.append(int(entry))
    return ended


def _ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def lock_holder(raw_folder: str) -> str | None:
    """Who holds the dataset's lock now, or None."""
    path = lock_path(raw_folder)
    if not os.path.isfile(path):
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def remove_stale_temp_folders(raw_folder: str, preprocessed_folder: str) -> list[str]:
    """Temp folders (``.em_tmp_*``) that a killed writer left where only lock holders write: the raw dataset, its
    labels, images and versions, the preprocessed versions and data folders. Call with the lock held."""
    found = []
    for top in (os.path.join(raw_folder, EM_LABELS), os.path.join(preprocessed_folder, EM_LABELS)):
        for folder, subfolders, _ in os.walk(top):
            found.extend(os.path.join(folder, name) for name in subfolders if name.startswith(TEMP_DIR_PREFIX))
            subfolders[:] = [name for name in subfolders if not name.startswith(TEMP_DIR_PREFIX)]
    data_folders = [os.path.join(preprocessed_folder, name) for name in os.listdir(preprocessed_folder)] \
        if os.path.isdir(preprocessed_folder) else []
    for folder in (raw_folder, os.path.join(raw_folder, "labelsTr"), os.path.join(raw_folder, "imagesTr"),
                   preprocessed_folder, *data_folders):
        if os.path.isdir(folder) and not os.path.islink(folder):
            found.extend(os.path.join(folder, name) for name in os.listdir(folder) if name.startswith(TEMP_DIR_PREFIX))
    removed = [path for path in found if os.path.isdir(path) and not os.path.islink(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
