"""The label store at its edges, without training: the dataset lock, what a killed run leaves running, label files
that say they are EM output, optional files that are links to nothing, unreadable bookkeeping, temp folders."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from nnunetv2_em import checks, engine, storage
from nnunetv2_em.errors import EMInputError


def _dataset(tmp_path, name="Dataset001_X"):
    raw = tmp_path / "raw" / name
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text('{"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}')
    preprocessed = tmp_path / "preprocessed" / name
    preprocessed.mkdir(parents=True)
    return str(raw), str(preprocessed)


def test_the_lock_file_is_never_deleted_so_a_late_opener_still_excludes_a_new_holder(tmp_path):
    raw, preprocessed = _dataset(tmp_path)
    with storage.dataset_lock(raw, preprocessed):
        late = open(storage.lock_path(raw), "a+")  # opened while the first holder had it
    assert os.path.isfile(storage.lock_path(raw))
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the late opener now holds it
    try:
        with pytest.raises(EMInputError, match="already working on this dataset"):
            with storage.dataset_lock(raw, preprocessed):
                pass
        assert storage.lock_holder(raw) is not None
    finally:
        late.close()
    assert storage.lock_holder(raw) is None


def test_the_lock_belongs_to_the_raw_dataset_whatever_the_preprocessed_folder_or_links(tmp_path):
    raw, preprocessed = _dataset(tmp_path)
    other_preprocessed = tmp_path / "elsewhere" / "Dataset001_X"
    other_preprocessed.mkdir(parents=True)
    linked_raw = tmp_path / "linked_raw"
    linked_raw.mkdir()
    os.symlink(raw, linked_raw / "Dataset001_X")
    with storage.dataset_lock(raw, preprocessed):
        for raw_path, preprocessed_path in ((raw, str(other_preprocessed)),
                                            (str(linked_raw / "Dataset001_X"), preprocessed)):
            with pytest.raises(EMInputError, match="already working"):
                with storage.dataset_lock(raw_path, preprocessed_path):
                    pass
    assert not os.path.exists(os.path.join(raw, storage.LOCK_SUFFIX))  # beside the dataset, not inside it
    assert os.listdir(raw) == ["labelsTr", "dataset.json"] or sorted(os.listdir(raw)) == ["dataset.json", "labelsTr"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_taking_the_lock_ends_processes_a_killed_holder_left_behind(tmp_path):
    raw, preprocessed = _dataset(tmp_path)
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                                env={**os.environ, storage.LOCK_ENV: storage.lock_path(raw)})
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                                env={**os.environ, storage.LOCK_ENV: storage.lock_path(raw) + "x"})
    try:
        time.sleep(0.5)
        with storage.dataset_lock(raw, preprocessed):
            assert os.environ[storage.LOCK_ENV] == storage.lock_path(raw)  # inherited by what it starts
            leftover.wait(timeout=10)
        assert leftover.returncode == -signal.SIGKILL
        assert stranger.poll() is None  # another dataset's process is left alone
        assert storage.LOCK_ENV not in os.environ
    finally:
        for process in (leftover, stranger):
            process.kill()
            process.wait()


def test_a_child_and_the_workers_it_forked_end_when_the_process_that_started_it_is_killed(tmp_path):
    """nnU-Net's trainer forks daemonic augmentation workers; a killed trainer leaves them running unless its whole
    process group is ended."""
    pid_file = tmp_path / "worker.pid"
    trainer = textwrap.dedent(f"""
        import multiprocessing, time
        def work():
            time.sleep(120)
        if __name__ == "__main__":
            worker = multiprocessing.get_context("fork").Process(target=work, daemon=True)
            worker.start()
            open({str(pid_file)!r}, "w").write(str(worker.pid))
            time.sleep(120)
    """)
    (tmp_path / "trainer.py").write_text(trainer)
    dask_worker = (f"from nnunetv2_em import engine; import os, sys\n"
                   f"engine.run_child([sys.executable, {str(tmp_path / 'trainer.py')!r}], env=dict(os.environ), "
                   f"log_file={str(tmp_path / 'log.txt')!r})")
    parent = subprocess.Popen([sys.executable, "-c", dask_worker], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.kill()
        parent.wait()
        assert _wait_dead(worker), "the trainer's forked worker outlived the killed process that ran the trainer"
    finally:
        parent.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "trainer.py")], check=False)


def test_a_failing_child_still_fails_with_its_exit_code_and_log(tmp_path):
    with pytest.raises(RuntimeError, match="exit code 3") as raised:
        engine.run_child([sys.executable, "-c", "print('half done'); raise SystemExit(3)"], env=dict(os.environ),
                         log_file=str(tmp_path / "log.txt"))
    assert "half done" in str(raised.value)


def _reader_writer():
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return SimpleITKIO()


def _write_label(path, *, provenance=None):
    properties = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                 "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)},
                  "spacing": [1.0, 1.0, 1.0]}
    seg = np.zeros((4, 5, 6), dtype=np.uint8)
    seg[1:3, 1:3, 1:3] = 1
    storage.write_label_image(str(path), seg, properties, _reader_writer(), provenance=provenance)
    return seg


def test_a_label_the_e_step_wrote_says_so_in_its_header_wherever_it_is_copied(tmp_path):
    import shutil

    seg = _write_label(tmp_path / "refined.nii.gz", provenance="refined, round 2 of em_run__T__P__2d")
    _write_label(tmp_path / "annotation.nii.gz")
    copied = tmp_path / "other_dataset" / "case.nii.gz"
    copied.parent.mkdir()
    shutil.copyfile(tmp_path / "refined.nii.gz", copied)  # a plain copy, no marker file anywhere
    assert storage.label_stamp(str(copied)) == "refined, round 2 of em_run__T__P__2d"
    assert storage.label_stamp(str(tmp_path / "annotation.nii.gz")) is None
    np.testing.assert_array_equal(_reader_writer().read_seg(str(copied))[0][0], seg)  # the labels are unchanged
    with pytest.raises(EMInputError, match="written by nnunetv2_em .refined, round 2") as raised:
        checks.check_not_em_output(str(copied))
    assert str(copied) in str(raised.value) and "Fix:" in str(raised.value)
    checks.check_not_em_output(str(tmp_path / "annotation.nii.gz"))


@pytest.mark.parametrize("name", [checks.VERIFIED_CASES_FILE, "em_weak_labels.json"])
def test_an_optional_file_that_is_a_link_to_nothing_is_an_error_not_absent(tmp_path, name):
    from nnunetv2_em import weak_labels

    raw, _ = _dataset(tmp_path)
    os.symlink(str(tmp_path / "unmounted" / name), os.path.join(raw, name))
    with pytest.raises(EMInputError, match="link") as raised:
        if name == checks.VERIFIED_CASES_FILE:
            checks.load_verified_cases(raw, ["case_1"])
        else:
            weak_labels.load_weak_labels(raw, {"labels": {"background": 0, "a": 1}}, labelled=["case_1"],
                                         images=["case_1"])
    assert os.path.join(raw, name) in str(raised.value)


def test_unreadable_bookkeeping_is_one_error_naming_the_file(tmp_path):
    raw, preprocessed = _dataset(tmp_path)
    versions = storage.DatasetLabelVersions(raw, preprocessed, "id", ".nii.gz")
    os.makedirs(versions.root)
    with open(versions.active_path(), "w") as handle:
        handle.write('{"run": "em_run__a", "rou')  # cut short
    with pytest.raises(EMInputError, match="active.json: not valid JSON") as raised:
        storage.dataset_status(raw, preprocessed)
    assert "restore" in str(raised.value)


def test_temp_folders_of_a_killed_writer_are_no_runs_and_are_removed_under_the_lock(tmp_path):
    raw, preprocessed = _dataset(tmp_path)
    versions = storage.DatasetLabelVersions(raw, preprocessed, "id", ".nii.gz")
    leftovers = [os.path.join(versions.root, f"{storage.TEMP_DIR_PREFIX}dead"),
                 os.path.join(versions.root, "em_run__a", "round_01", f"{storage.TEMP_DIR_PREFIX}dead"),
                 os.path.join(raw, "labelsTr", f"{storage.TEMP_DIR_PREFIX}dead"),
                 os.path.join(preprocessed, "nnUNetPlans_2d", f"{storage.TEMP_DIR_PREFIX}dead")]
    for folder in leftovers:
        os.makedirs(os.path.join(folder, "file"))
    assert "em_run__a" in versions.runs() and not any(run.startswith(".") for run in versions.runs())
    with storage.dataset_lock(raw, preprocessed):
        pass
    assert not any(os.path.exists(folder) for folder in leftovers)
    assert os.path.isdir(os.path.join(versions.root, "em_run__a", "round_01"))


def test_the_stamp_survives_a_resave_and_the_documented_fix_clears_it(tmp_path):
    import SimpleITK as sitk

    path = str(tmp_path / "refined.nii.gz")
    _write_label(path, provenance="pseudo, round 1 of em_run__T__P__2d")
    sitk.WriteImage(sitk.ReadImage(path), path, True)
    assert storage.label_stamp(path) == "pseudo, round 1 of em_run__T__P__2d"
    image = sitk.ReadImage(path)
    image.SetMetaData("ITK_FileNotes", "")
    sitk.WriteImage(image, path, True)
    assert storage.label_stamp(path) is None
    checks.check_not_em_output(path)
