"""Switching labelsTr between label versions on real cases, killed (SIGKILL) at every write window.

A dataset is planned once; two rounds of a run are staged through ``DatasetLabelVersions`` (round 1 refines every
case, round 2 also adds a pseudo-labelled case whose image comes from outside the dataset). Each test copies that
workspace, activates a version in a child process that kills itself at one window, and checks what a user would
find: labelsTr is one complete version, nnU-Net accepts the dataset, the originals are untouched, `status` says
what happened, and `restore` finishes the switch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import NnUNetWorkspace, demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em import cli, storage
from nnunetv2_em.demo import DEMO_DATA

DATASET_ID = 931
DATASET = "Dataset931_Hippo"
CASES = demo_cases(7)
LABELLED, ADDED = CASES[:6], CASES[6]
RUN = "em_run__VanillaTrainer_tiny__nnUNetPlans__2d"
IDENTIFIER = "nnUNetPlans_2d"
IGNORE = 3

pytestmark = pytest.mark.slow

ACTIVATION_WINDOWS = ["staged", "journal_written", "bridge_json", "exchanged", "raw_switched", "preprocessed_partly",
                      "before_journal_removed"]


def _versions(workspace: NnUNetWorkspace) -> storage.DatasetLabelVersions:
    return storage.DatasetLabelVersions(os.path.join(workspace.raw, DATASET),
                                        os.path.join(workspace.preprocessed, DATASET), IDENTIFIER, ".nii.gz", RUN)


def _changed(array: np.ndarray, seed: int) -> np.ndarray:
    """A refinement's footprint: some foreground voxels become ignore, some background becomes class 1."""
    rng = np.random.default_rng(seed)
    out = array.copy()
    foreground = np.flatnonzero(out > 0)
    out.flat[rng.choice(foreground, size=max(1, foreground.size // 10), replace=False)] = IGNORE
    background = np.flatnonzero(out == 0)
    out.flat[rng.choice(background, size=20, replace=False)] = 1
    return out


def _stage_round(versions, round_index: int, *, with_added_case: bool) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reader_writer = SimpleITKIO()
    with open(os.path.join(versions.preprocessed_folder, "nnUNetPlans.json")) as handle:
        patch_size = json.load(handle)["configurations"]["2d"]["patch_size"]
    entries = {}
    cases = [*LABELLED, ADDED] if with_added_case else LABELLED
    for index, case in enumerate(cases):
        source = (os.path.join(DEMO_DATA, "labelsTr", f"{case}.nii.gz") if case == ADDED
                  else versions.label_path(0, case))
        raw, raw_properties = reader_writer.read_seg(source)
        reference = LABELLED[0] if case == ADDED else case
        segmentation = storage.read_seg_b2nd(os.path.join(versions.segmentation_folder(0), f"{reference}_seg.b2nd"))
        with open(os.path.join(versions.segmentation_folder(0), f"{reference}.pkl"), "rb") as handle:
            import pickle
            properties = pickle.load(handle)
        versions.write_case(round_index, case, raw_label=_changed(raw[0].astype(np.int16), 10 * round_index + index),
                            raw_properties=raw_properties, reader_writer=reader_writer,
                            segmentation=_changed(segmentation, round_index), properties=properties,
                            patch_size=patch_size)
        entries[case] = {"provenance": storage.REFINED}
    if with_added_case:
        entries[ADDED] = {"provenance": storage.PSEUDO,
                          "images": versions.keep_added_images(ADDED, [os.path.join(DEMO_DATA, "imagesTr",
                                                                                    f"{ADDED}_0000.nii.gz")]),
                          "preprocessed_image": os.path.join(versions.live_data_folder(), f"{LABELLED[0]}.b2nd")}
    with open(os.path.join(versions.round_folder(0), "dataset.json")) as handle:
        dataset_json = json.load(handle)
    dataset_json["labels"]["ignore"] = IGNORE
    versions.write_round_metadata(round_index, dataset_json, entries)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A planned dataset with its originals kept and rounds 1 and 2 of one run staged (nothing activated)."""
    workspace = NnUNetWorkspace(str(tmp_path_factory.mktemp("activation")))
    make_raw_dataset(workspace.raw, DATASET_ID, LABELLED)
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    raw = os.path.join(workspace.raw, DATASET)
    before = tree_snapshot(raw)
    versions = _versions(workspace)
    versions.keep_originals(LABELLED)
    _stage_round(versions, 1, with_added_case=False)
    _stage_round(versions, 2, with_added_case=True)
    return {"workspace": workspace, "raw_before": before}


def _copy(staged, tmp_path) -> NnUNetWorkspace:
    shutil.copytree(staged["workspace"].root, tmp_path / "ws", symlinks=True)
    return NnUNetWorkspace(str(tmp_path / "ws"))


def _activate_in_child(workspace: NnUNetWorkspace, round_index: int, kill_at: str | None, *,
                       two_renames: bool = False) -> int:
    # where activation looks the swap up: as if the file system had no atomic exchange
    patch = "storage.activation.exchange_paths = lambda a, b: False\n" if two_renames else ""
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "import test_activation_faults as t\n"
              "from nnunetv2_em import storage\n"
              "from conftest import NnUNetWorkspace\n"
              f"{patch}storage.activate(t._versions(NnUNetWorkspace({workspace.root!r})), {round_index})\n")
    env = {**workspace.env, storage.KILL_AT_ENV: kill_at or ""}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300).returncode


def _labels_state(workspace):
    versions = storage.dataset_versions(os.path.join(workspace.raw, DATASET),
                                        os.path.join(workspace.preprocessed, DATASET))
    return storage.labels_folder_state(versions)


def _verify(workspace) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(os.path.join(workspace.raw, DATASET), num_processes=1)


def _assert_originals_intact(workspace, staged) -> None:
    versions = _versions(workspace)
    assert versions.changed_originals() == []
    for case, digest in staged["raw_before"].items():
        if case.startswith("labelsTr/") and case.endswith(".nii.gz"):
            assert storage.sha256(versions.label_path(0, os.path.basename(case)[:-len(".nii.gz")])) == digest


def _assert_live_matches(workspace, round_index: int) -> None:
    versions = _versions(workspace)
    for case in versions.read_manifest(round_index)["cases"]:
        np.testing.assert_array_equal(
            storage.read_seg_b2nd(os.path.join(versions.live_data_folder(), f"{case}_seg.b2nd")),
            versions.read_segmentation(round_index, case))


# renameat2 exchanges labelsTr in one step; without it (some network file systems) two renames do
KILLS = [(window, False) for window in ACTIVATION_WINDOWS] + \
    [(window, True) for window in ACTIVATION_WINDOWS if window != "exchanged"] + [("between_renames", True)]


@pytest.mark.parametrize("kill_at, two_renames", KILLS,
                         ids=[f"{w}-{'two-renames' if t else 'exchange'}" for w, t in KILLS])
def test_a_kill_while_activating_leaves_one_complete_version_and_restore_finishes_it(staged, tmp_path, kill_at,
                                                                                     two_renames):
    workspace = _copy(staged, tmp_path)
    assert _activate_in_child(workspace, 1, kill_at, two_renames=two_renames) == -signal.SIGKILL

    state = _labels_state(workspace)
    if kill_at == "between_renames":  # without renameat2, the one instant at which labelsTr is absent
        assert not os.path.exists(os.path.join(workspace.raw, DATASET, "labelsTr"))
    else:
        assert state["equal_to"] in ({"run": None, "round": 0}, {"run": RUN, "round": 1})  # one complete version
        _verify(workspace)
    _assert_originals_intact(workspace, staged)
    status = storage.dataset_status(os.path.join(workspace.raw, DATASET),
                                    os.path.join(workspace.preprocessed, DATASET))
    assert (status["unfinished_switch"] is not None) == (kill_at != "staged")

    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID))  # completes (or clears) the interrupted switch
    state = _labels_state(workspace)
    expected = {"run": None, "round": 0} if kill_at == "staged" else {"run": RUN, "round": 1}
    assert state["equal_to"] == expected and state["matches_active"] in (None, True)
    _verify(workspace)
    if expected["round"] == 1:
        _assert_live_matches(workspace, 1)
        assert state["marker"]["round"] == 1
    assert not os.path.exists(os.path.join(workspace.raw, DATASET, storage.STAGING_LABELS))
    assert not os.path.exists(os.path.join(workspace.raw, DATASET, storage.PREVIOUS_LABELS))


@pytest.mark.parametrize("kill_at", ["journal_written", "raw_switched", "preprocessed_partly"])
def test_restore_to_the_originals_is_byte_identical_even_after_a_kill(staged, tmp_path, kill_at):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    assert _activate_in_child(workspace, 1, None) == 0
    assert _activate_in_child(workspace, 2, None) == 0
    assert os.path.isfile(os.path.join(raw, "imagesTr", f"{ADDED}_0000.nii.gz"))  # the added case joined
    assert os.path.isfile(os.path.join(raw, "labelsTr", f"{ADDED}.nii.gz"))
    _verify(workspace)

    script = f"from nnunetv2_em import cli; cli.main(['restore', '-d', '{DATASET_ID}', '--round', '0'])"
    killed = subprocess.run([sys.executable, "-c", script], env={**workspace.env, storage.KILL_AT_ENV: kill_at},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    _assert_originals_intact(workspace, staged)
    assert workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "0").returncode == 0
    assert tree_snapshot(raw) == {**staged["raw_before"], **_em_labels_entries(raw)}
    status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert "labelsTr: round 0 (the original annotations)" in status and "checksums match" in status
    assert "UNFINISHED" not in status
    # the preprocessed side follows: original segmentations, the added case gone from data and splits
    versions = _versions(workspace)
    for case in LABELLED:
        np.testing.assert_array_equal(
            storage.read_seg_b2nd(os.path.join(versions.live_data_folder(), f"{case}_seg.b2nd")),
            versions.read_segmentation(0, case))
    assert not os.path.exists(os.path.join(versions.live_data_folder(), f"{ADDED}_seg.b2nd"))
    # and forward again: round 2 comes back complete, its added image included
    assert workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "2").returncode == 0
    assert _labels_state(workspace)["equal_to"] == {"run": RUN, "round": 2}
    _verify(workspace)


def _em_labels_entries(raw: str) -> dict:
    """The version store itself (em_labels/) is the only addition to the raw dataset after a restore."""
    return {path: digest for path, digest in tree_snapshot(raw).items() if path.startswith("em_labels")}


def test_a_full_disk_while_staging_changes_nothing_and_says_what_to_do(staged, tmp_path, monkeypatch, capsys):
    workspace = _copy(staged, tmp_path)
    for key, value in workspace.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    raw = os.path.join(workspace.raw, DATASET)
    before = tree_snapshot(raw)
    calls = {"n": 0}
    real_copyfile = shutil.copyfile

    def copy_until_full(source, destination, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", destination)
        return real_copyfile(source, destination, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_until_full)
    assert cli.main(["restore", "-d", str(DATASET_ID), "--round", "1"]) == 2
    message = capsys.readouterr().err
    assert "No space left on device" in message and "rerun the same command" in message
    assert message.count("\n") == 1
    assert tree_snapshot(raw) == before


def test_refined_labels_are_never_taken_for_annotations(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    assert _activate_in_child(workspace, 1, None) == 0
    for command in (["check", "-d", str(DATASET_ID)], ["plan", "-d", str(DATASET_ID), "-c", "2d"]):
        before = tree_snapshot(workspace.root)
        result = workspace.run("nnunetv2_em", *command, check=False)
        assert result.returncode == 2, result.stderr
        assert "holds EM output (round 1 of run" in result.stderr and "restore" in result.stderr
        assert tree_snapshot(workspace.root) == before
    # a different run must not start from this run's labels
    other = workspace.run("nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1",
                          "--trainer", "VanillaTrainer_cpu", "--device", "cpu", check=False)
    assert other.returncode == 2 and "would start from another run's labels" in other.stderr
    # EMTrainer refuses preprocessed data that holds a run's refined segmentations
    trainer = workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "EMTrainer_tiny", "-device", "cpu",
                            check=False)
    assert trainer.returncode != 0 and "would take them for originals" in trainer.stderr
    # without em_labels/ the marker still tells: EM output, originals missing
    shutil.rmtree(os.path.join(raw, "em_labels"))
    result = workspace.run("nnunetv2_em", "check", "-d", str(DATASET_ID), check=False)
    assert result.returncode == 2 and "original annotations" in result.stderr and "missing" in result.stderr
    # once restored, the same commands work again
    shutil.copytree(os.path.join(staged["workspace"].raw, DATASET, "em_labels"), os.path.join(raw, "em_labels"))
    storage.write_json(os.path.join(raw, "em_labels", "active.json"),
                       {"run": RUN, "round": 1, "data_identifier": IDENTIFIER})
    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "0")
    assert "labelled cases" in workspace.run("nnunetv2_em", "check", "-d", str(DATASET_ID)).stdout


def _edit_by_hand(path: str) -> None:
    """One voxel of a label file changed, as a person editing it in a viewer would."""
    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 1
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, path, True)


def test_a_manually_changed_labels_folder_is_reported_by_status(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    assert _activate_in_child(workspace, 1, None) == 0
    path = os.path.join(raw, "labelsTr", f"{LABELLED[0]}.nii.gz")
    _edit_by_hand(path)
    status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert "CHANGED since: 1 file(s) differ" in status and LABELLED[0] in status
    as_json = json.loads(workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID), "--json").stdout)
    assert as_json["labelsTr"]["differing"] == [LABELLED[0]]


# ----------------------------------------------------------------------------- the store at its edges (issue 28)
def _files(workspace) -> dict:
    """Every file of the workspace but the dataset's lock file (beside the raw dataset, empty when free, never
    deleted: the one file a refused command that took the lock leaves)."""
    lock = os.path.relpath(storage.lock_path(os.path.join(workspace.raw, DATASET)), workspace.root)
    return {path: digest for path, digest in tree_snapshot(workspace.root).items() if path != lock}


def _restore(workspace, *arguments):
    return workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), *arguments, check=False)


def test_files_in_labelsTr_that_are_not_labels_survive_every_switch(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    labels = os.path.join(raw, "labelsTr")
    with open(os.path.join(labels, "notes.txt"), "w") as handle:
        handle.write("second reader: case 3 unsure\n")
    with open(os.path.join(labels, f"{LABELLED[0]}.json"), "w") as handle:
        handle.write('{"annotator": "A"}\n')
    os.makedirs(os.path.join(labels, "old_versions"))
    shutil.copy(os.path.join(labels, f"{LABELLED[1]}.nii.gz"), os.path.join(labels, "old_versions", "v1.nii.gz"))
    before = tree_snapshot(raw)
    checked = workspace.run("nnunetv2_em", "check", "-d", str(DATASET_ID)).stdout
    assert "3 other file(s)" in checked and "notes.txt" in checked and "old_versions" in checked

    assert _activate_in_child(workspace, 1, None) == 0
    after = tree_snapshot(raw)
    for name in ("labelsTr/notes.txt", f"labelsTr/{LABELLED[0]}.json", "labelsTr/old_versions/v1.nii.gz"):
        assert after[name] == before[name]
    assert _labels_state(workspace)["equal_to"] == {"run": RUN, "round": 1}
    assert "notes.txt" in workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert _restore(workspace, "--round", "0").returncode == 0
    assert tree_snapshot(raw) == {**before, **_em_labels_entries(raw)}


def test_restore_without_a_round_checks_what_it_claims(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    assert _activate_in_child(workspace, 1, None) == 0
    done = _restore(workspace)
    assert done.returncode == 0 and f"labelsTr holds round 1 of run {RUN} (checksums match" in done.stdout

    path = os.path.join(raw, "labelsTr", f"{LABELLED[0]}.nii.gz")
    with open(path, "rb") as handle:
        original = handle.read()
    _edit_by_hand(path)
    changed = _restore(workspace)
    assert changed.returncode == 2 and "CHANGED" in changed.stderr and LABELLED[0] in changed.stderr
    assert changed.stderr.count("\n") == 1 and "holds round" not in changed.stdout
    with open(path, "wb") as handle:
        handle.write(original)

    shutil.rmtree(os.path.join(raw, "em_labels"))
    missing = _restore(workspace)
    assert missing.returncode == 2 and "round_00) are missing" in missing.stderr
    assert "original annotations" not in missing.stdout


def test_refined_labels_copied_into_another_dataset_are_not_taken_for_annotations(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    assert _activate_in_child(workspace, 1, None) == 0
    other = make_raw_dataset(workspace.raw, 933, LABELLED, name="Copy")
    for case in LABELLED:  # `cp labelsTr/*.nii.gz`: the version marker stays behind
        shutil.copyfile(os.path.join(raw, "labelsTr", f"{case}.nii.gz"), os.path.join(other, "labelsTr",
                                                                                       f"{case}.nii.gz"))
    before = _files(workspace)
    for command in (["check", "-d", "933"], ["plan", "-d", "933", "-c", "2d"]):
        refused = workspace.run("nnunetv2_em", *command, check=False)
        assert refused.returncode == 2 and f"written by nnunetv2_em (refined, round 1 of {RUN})" in refused.stderr
    assert _files(workspace) == before

    # nnU-Net's own planner, run while labelsTr holds round 1, copies those labels into gt_segmentations
    gt = os.path.join(workspace.preprocessed, DATASET, "gt_segmentations")
    for case in LABELLED:
        shutil.copyfile(os.path.join(raw, "labelsTr", f"{case}.nii.gz"), os.path.join(gt, f"{case}.nii.gz"))
    status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert f"gt_segmentations: CHANGED: {len(LABELLED)} file(s)" in status
    repaired = _restore(workspace)
    assert repaired.returncode == 0 and "the originals are back" in repaired.stdout
    versions = _versions(workspace)
    for case in LABELLED:
        assert storage.sha256(os.path.join(gt, f"{case}.nii.gz")) == \
            storage.sha256(versions.label_path(0, case))
    assert "gt_segmentations: CHANGED" not in workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout


@pytest.mark.parametrize("kill_at", [None, "exchanged"])
def test_a_symlinked_labelsTr_is_switched_behind_its_link(staged, tmp_path, kill_at):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    shared = tmp_path / "share" / "hippo_labels"
    shared.parent.mkdir()
    shutil.move(os.path.join(raw, "labelsTr"), shared)
    os.symlink(str(shared), os.path.join(raw, "labelsTr"))

    code = _activate_in_child(workspace, 1, kill_at)
    assert code == (-signal.SIGKILL if kill_at else 0)
    assert _restore(workspace).returncode == 0  # finishes an interrupted switch
    assert os.path.islink(os.path.join(raw, "labelsTr")) and os.readlink(os.path.join(raw, "labelsTr")) == str(shared)
    assert _labels_state(workspace)["equal_to"] == {"run": RUN, "round": 1}
    _verify(workspace)
    assert _restore(workspace, "--round", "0").returncode == 0
    assert os.path.islink(os.path.join(raw, "labelsTr"))
    for name, digest in staged["raw_before"].items():
        if name.startswith("labelsTr/") and digest != "dir":
            assert storage.sha256(os.path.join(shared, name[len("labelsTr/"):])) == digest
    assert sorted(os.listdir(shared.parent)) == ["hippo_labels"]  # no staging or previous folder left
    assert sorted(os.listdir(raw)) == sorted(os.listdir(os.path.join(staged["workspace"].raw, DATASET)))


def test_a_link_to_nothing_as_labelsTr_is_refused_before_anything_moves(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    raw = os.path.join(workspace.raw, DATASET)
    shutil.rmtree(os.path.join(raw, "labelsTr"))
    os.symlink(str(tmp_path / "unmounted" / "labelsTr"), os.path.join(raw, "labelsTr"))
    before = _files(workspace)
    refused = _restore(workspace, "--round", "1")
    assert refused.returncode == 2 and "not a folder here" in refused.stderr and refused.stderr.count("\n") == 1
    assert _files(workspace) == before


def test_bad_restores_are_one_error_and_change_nothing(staged, tmp_path):
    workspace = _copy(staged, tmp_path)
    assert _activate_in_child(workspace, 1, None) == 0
    negative = _restore(workspace, "--round", "-1")
    assert negative.returncode == 2 and "numbered from 0" in negative.stderr and negative.stderr.count("\n") == 1

    kept = _versions(workspace).label_path(0, LABELLED[2])
    with open(kept, "ab") as handle:
        handle.write(b"\0")  # a kept original damaged on disk
    before = _files(workspace)
    damaged = _restore(workspace, "--round", "0")
    assert damaged.returncode == 2 and kept in damaged.stderr and damaged.stderr.count("\n") == 1
    assert _files(workspace) == before
    assert _labels_state(workspace)["equal_to"] == {"run": RUN, "round": 1}


def test_a_dataset_json_without_numTraining_and_a_nan_image_are_refused_by_check(tmp_path):
    workspace = NnUNetWorkspace(str(tmp_path))
    raw = make_raw_dataset(workspace.raw, 934, LABELLED[:2], name="Bad")
    with open(os.path.join(raw, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    without = {key: value for key, value in dataset_json.items() if key != "numTraining"}
    with open(os.path.join(raw, "dataset.json"), "w") as handle:
        json.dump(without, handle)
    for command in (["check", "-d", "934"], ["plan", "-d", "934", "-c", "2d"]):
        refused = workspace.run("nnunetv2_em", *command, check=False)
        assert refused.returncode == 2 and "'numTraining'" in refused.stderr and '"numTraining": 2' in refused.stderr
    with open(os.path.join(raw, "dataset.json"), "w") as handle:
        json.dump(dataset_json, handle)

    # ITK's NIfTI reader turns NaN into 0, so nnU-Net never sees one in a .nii.gz; in MetaImage it does
    for folder in ("imagesTr", "labelsTr"):
        for name in os.listdir(os.path.join(raw, folder)):
            path = os.path.join(raw, folder, name)
            sitk.WriteImage(sitk.ReadImage(path), path.replace(".nii.gz", ".mha"))
            os.remove(path)
    with open(os.path.join(raw, "dataset.json"), "w") as handle:
        json.dump({**dataset_json, "file_ending": ".mha"}, handle)
    assert workspace.run("nnunetv2_em", "check", "-d", "934").returncode == 0
    path = os.path.join(raw, "imagesTr", f"{LABELLED[1]}_0000.mha")
    image = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, path)
    refused = workspace.run("nnunetv2_em", "check", "-d", "934", check=False)
    assert refused.returncode == 2 and path in refused.stderr and "NaN" in refused.stderr
