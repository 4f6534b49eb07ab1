"""The multi-rater dataset layout (``em_raters.json`` + ``em_raters/<rater>/<case>``) on real Hippocampus cases:
``nnunetv2_em check`` accepts it and reports the raters, the ratings of a case come back as one array, and every bad
input is one error naming the file and the fix, with nothing written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em import multi_rater

CASES = demo_cases(3)


def _write_like(reference: str, array: np.ndarray, path: str) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(sitk.ReadImage(reference))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, path, True)


@pytest.fixture
def dataset(nnunet_env):
    """Three raters: ana annotated every case, ben two, cy one, with the ignore label where ben skipped a slab."""
    folder = make_raw_dataset(nnunet_env.raw, 961, CASES)
    with open(os.path.join(folder, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    dataset_json["labels"]["ignore"] = 3
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(dataset_json, handle)
    coverage = {"ana": CASES, "ben": CASES[:2], "cy": CASES[2:]}
    for rater, cases in coverage.items():
        for case in cases:
            label = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
            array = sitk.GetArrayFromImage(sitk.ReadImage(label))
            if rater == "ben":
                array = np.where(array == 2, 0, array)  # misses the posterior
                array[:2] = 3  # did not annotate the first two slices
            _write_like(label, array, multi_rater.rater_label_path(folder, rater, case, ".nii.gz"))
    with open(multi_rater.raters_path(folder), "w") as handle:
        json.dump({"version": 1, "raters": coverage}, handle)
    return nnunet_env, folder


def _cases(folder):
    from nnunetv2_em.checks import check_raw_dataset

    return check_raw_dataset(folder)


def test_a_multi_rater_dataset_loads_and_its_ratings_read_as_one_array(dataset, capsys):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_em.checks import load_dataset_json
    from nnunetv2_em.cli import main

    _, folder = dataset
    rater_set = multi_rater.load_raters(folder, load_dataset_json(os.path.join(folder, "dataset.json")),
                                        _cases(folder))
    assert rater_set.raters == ("ana", "ben", "cy")
    assert rater_set.coverage() == {CASES[0]: 2, CASES[1]: 2, CASES[2]: 2}
    ratings = multi_rater.read_ratings(rater_set, CASES[0], SimpleITKIO(), ignore_label=3)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", f"{CASES[0]}.nii.gz")))
    assert ratings.shape == (3, *truth.shape)
    assert np.array_equal(ratings[0], truth)
    assert np.all(ratings[1, :2] == -1) and not np.any(ratings[1] == 2)  # ignored slab, missed class
    assert np.all(ratings[2] == -1)  # cy did not rate this case
    assert main(["check", "-d", "961"]) == 0
    assert "3 raters (ana, ben, cy) on 3 cases, 3 of them with several raters" in capsys.readouterr().out


def _edit_json(folder, edit):
    path = multi_rater.raters_path(folder)
    with open(path) as handle:
        content = json.load(handle)
    edit(content)
    with open(path, "w") as handle:
        json.dump(content, handle)


def _break(kind, folder):
    """Returns the file the error must name."""
    ana = multi_rater.rater_label_path(folder, "ana", CASES[0], ".nii.gz")
    if kind == "not json":
        with open(multi_rater.raters_path(folder), "w") as handle:
            handle.write("{raters: ")
    elif kind == "version":
        _edit_json(folder, lambda c: c.update(version=2))
    elif kind == "unknown case":
        _edit_json(folder, lambda c: c["raters"]["ana"].append("hippocampus_999"))
    elif kind == "rater name":
        _edit_json(folder, lambda c: c["raters"].update({"../x": [CASES[0]]}))
    elif kind == "missing file":
        os.remove(ana)
        return ana
    elif kind == "unlisted file":
        _edit_json(folder, lambda c: c["raters"].update(cy=[CASES[2]], ana=CASES[1:]))
        return ana
    elif kind == "label value":
        _write_like(ana, np.full(sitk.GetArrayFromImage(sitk.ReadImage(ana)).shape, 7), ana)
        return ana
    elif kind == "geometry":
        _write_like(ana, sitk.GetArrayFromImage(sitk.ReadImage(ana)), ana)
        image = sitk.ReadImage(ana)
        image.SetSpacing([s * 2 for s in image.GetSpacing()])
        sitk.WriteImage(image, ana, True)
        return ana
    return multi_rater.raters_path(folder)


@pytest.mark.parametrize("kind, message", [
    ("not json", "not valid JSON"), ("version", "expected"), ("unknown case", "is not in the dataset's imagesTr"),
    ("rater name", "not a plain folder name"), ("missing file", "missing"), ("unlisted file", "not listed"),
    ("label value", "label values [7]"), ("geometry", "spacing"),
])
def test_bad_multi_rater_input_is_one_error_naming_the_file_and_nothing_changes(dataset, kind, message, capsys):
    from nnunetv2_em.cli import main

    workspace, folder = dataset
    named = _break(kind, folder)
    before = tree_snapshot(workspace.root)
    assert main(["check", "-d", "961"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and message in error and "Fix:" in error, error
    assert tree_snapshot(workspace.root) == before


def test_a_dataset_without_raters_is_not_multi_rater(nnunet_env):
    folder = make_raw_dataset(nnunet_env.raw, 962, CASES)
    from nnunetv2_em.checks import load_dataset_json

    assert multi_rater.load_raters(folder, load_dataset_json(os.path.join(folder, "dataset.json")),
                                   _cases(folder)) is None
    shutil.rmtree(folder)


def test_majority_vote_and_staple_on_arrays():
    from nnunetv2_em import fusion

    ratings = np.array([[0, 1, 1, 2, -1], [0, 1, 2, 2, -1], [1, 0, 2, 0, -1]])
    assert fusion.majority_vote(ratings, num_classes=3).tolist() == [0, 1, 2, 2, -1]
    assert fusion.majority_vote(np.array([[0, 1], [1, 0]]), num_classes=2).tolist() == [0, 0]  # ties: lowest class
    complete = np.array([[[0, 1, 1, 2, 0, 0]], [[0, 1, 2, 2, 0, 1]], [[0, 1, 2, 2, 0, 0]]])
    assert fusion.staple(complete, num_classes=3).tolist() == [[0, 1, 2, 2, 0, 0]]
    alone = np.stack([complete[0], np.full_like(complete[0], -1)])
    assert np.array_equal(fusion.staple(alone, num_classes=3), complete[0])  # the only rater
    with pytest.raises(ValueError, match="STAPLE needs complete maps"):
        fusion.staple(np.stack([complete[0], np.where(complete[1] == 2, -1, complete[1])]), num_classes=3)
    assert np.array_equal(fusion.fuse(alone[::-1], method="first", num_classes=3), complete[0])


@pytest.mark.parametrize("method", ["majority", "staple", "first"])
def test_fuse_writes_a_dataset_vanilla_nnunet_can_train(dataset, method, capsys):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_em import fusion
    from nnunetv2_em.checks import check_raw_dataset
    from nnunetv2_em.cli import main

    workspace, folder = dataset
    if method == "staple":  # ben left slices unrated: STAPLE refuses, nothing is written
        before = tree_snapshot(workspace.root)
        assert main(["fuse", "-d", "961", "-o", "Dataset963_Fused", "--method", "staple"]) == 2
        assert "STAPLE needs complete maps. Fix: fuse with --method majority" in capsys.readouterr().err
        assert tree_snapshot(workspace.root) == before
        for case in CASES[:2]:
            path = multi_rater.rater_label_path(folder, "ben", case, ".nii.gz")
            array = sitk.GetArrayFromImage(sitk.ReadImage(path))
            _write_like(path, np.where(array == 3, 0, array), path)
    assert main(["fuse", "-d", "961", "-o", "Dataset963_Fused", "--method", method, "--link"]) == 0
    assert "3 cases, 3 fused by" in capsys.readouterr().out
    fused = os.path.join(workspace.raw, "Dataset963_Fused")
    assert sorted(check_raw_dataset(fused)) == CASES  # a valid raw dataset: labels, values, geometry
    from nnunetv2_em.checks import load_dataset_json

    rater_set = multi_rater.load_raters(folder, load_dataset_json(os.path.join(folder, "dataset.json")),
                                        _cases(folder))
    for case in CASES:
        ratings = multi_rater.read_ratings(rater_set, case, SimpleITKIO(), ignore_label=3)
        expected = fusion.fuse(ratings, method=method, num_classes=3)
        written = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(fused, "labelsTr", f"{case}.nii.gz")))
        assert np.array_equal(written, np.where(expected < 0, 3, expected))
    refused = main(["fuse", "-d", "961", "-o", "Dataset963_Again"])
    assert refused == 2 and "dataset id 963 is taken" in capsys.readouterr().err
