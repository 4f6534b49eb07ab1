"""Bad input: one clear error naming the problem and the fix, and nothing on disk changes."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em import checks, label_conventions, planning
from nnunetv2_em.errors import EMInputError

CASES = demo_cases(4)


def _label_path(folder, case):
    return os.path.join(folder, "labelsTr", f"{case}.nii.gz")


def _rewrite_label(path, change):
    image = sitk.ReadImage(path)
    new = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    new.SetSpacing(image.GetSpacing())
    new.SetOrigin(image.GetOrigin())
    new.SetDirection(image.GetDirection())
    sitk.WriteImage(new, path, True)


def _break_without_labels(folder):
    shutil.rmtree(os.path.join(folder, "labelsTr"))
    return "no label files"


def _break_label_values(folder):
    def add_unknown_class(array):
        array[0, 0, 0] = 7
        return array

    _rewrite_label(_label_path(folder, CASES[1]), add_unknown_class)
    return "label values [7]"


def _break_geometry(folder):
    path = _label_path(folder, CASES[2])
    image = sitk.ReadImage(path)
    image.SetSpacing([2.0, 1.0, 1.0])
    sitk.WriteImage(image, path, True)
    return "spacing"


def _break_shape(folder):
    _rewrite_label(_label_path(folder, CASES[0]), lambda array: array[:-1].copy())
    return "shape"


def _break_regions(folder):
    path = os.path.join(folder, "dataset.json")
    with open(path) as handle:
        dataset_json = json.load(handle)
    dataset_json["labels"] = {"background": 0, "whole": [1, 2], "posterior": 2}
    dataset_json["regions_class_order"] = [1, 2]
    with open(path, "w") as handle:
        json.dump(dataset_json, handle)
    return "region-based"


@pytest.mark.parametrize("breaker", [_break_without_labels, _break_label_values, _break_geometry, _break_shape,
                                     _break_regions])
def test_plan_rejects_bad_raw_data_and_writes_nothing(nnunet_env, breaker):
    folder = make_raw_dataset(nnunet_env.raw, 991, CASES)
    expected = breaker(folder)
    before = tree_snapshot(nnunet_env.root)
    with pytest.raises(EMInputError) as error:
        planning.plan_and_preprocess(991)
    message = str(error.value)
    assert expected in message
    assert "Fix:" in message
    assert tree_snapshot(nnunet_env.root) == before


def test_the_error_names_the_offending_file(nnunet_env):
    folder = make_raw_dataset(nnunet_env.raw, 992, CASES)
    _break_label_values(folder)
    with pytest.raises(EMInputError, match=_label_path(folder, CASES[1])):
        checks.check_raw_dataset(folder)


def test_missing_environment_variables_are_named(monkeypatch):
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.setenv("nnUNet_raw", "/somewhere")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(EMInputError) as error:
        checks.require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    assert "nnUNet_preprocessed, nnUNet_results" in str(error.value)
    assert "export nnUNet_preprocessed=" in str(error.value)


def test_unknown_dataset_is_named(nnunet_env):
    with pytest.raises(EMInputError, match="dataset 123 not found"):
        planning.plan_and_preprocess(123)


def test_planner_rejects_bad_data_before_planning(nnunet_env):
    from nnunetv2_em.planners.em_planner import EMPlanner

    folder = make_raw_dataset(nnunet_env.raw, 993, CASES)
    _break_label_values(folder)
    before = tree_snapshot(nnunet_env.root)
    with pytest.raises(EMInputError, match="label values"):
        EMPlanner(993)
    assert tree_snapshot(nnunet_env.root) == before


def test_ignore_label_must_be_max_plus_one():
    with pytest.raises(EMInputError, match="max label \\+ 1"):
        checks.label_values({"labels": {"background": 0, "a": 1, "ignore": 5}}, "dataset.json")
    assert label_conventions.with_ignore_label({"labels": {"background": 0, "a": 1}})["labels"]["ignore"] == 2
    assert np.array_equal(checks.label_values({"labels": {"background": 0, "a": 1, "b": 2}}, "x"), [0, 1, 2])


@pytest.mark.parametrize("change, expected", [
    ({"trainer": "NoSuchTrainer"}, "no such nnU-Net trainer"),
    ({"trainer": "EMTrainer_tiny"}, "needs a plain trainer"),
    ({"folds": (0, 0)}, "distinct fold numbers"),
    ({"rounds": 0}, "--rounds 0"),
    ({"warm_fraction": 1.5}, "--warm-fraction"),
    ({"seed": -1}, "--seed -1"),
    ({"unlabeled": "/no/such/folder"}, "not a folder"),
])
def test_cross_fold_run_rejects_bad_options_and_writes_nothing(nnunet_env, change, expected):
    from nnunetv2_em.crossfold import CrossFoldRun, RunOptions

    make_raw_dataset(nnunet_env.raw, 994, CASES)
    before = tree_snapshot(nnunet_env.root)
    options = RunOptions(dataset="994", trainer="VanillaTrainer_tiny", device="cpu", folds=(0, 1))
    with pytest.raises(EMInputError, match=expected):
        CrossFoldRun(dataclasses.replace(options, **change))
    assert tree_snapshot(nnunet_env.root) == before


# --------------------------------------------------------------------------- the bad-input catalogue (README)
def _truncate(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
    return path


def _bad_truncated_label(folder, extra):
    return _truncate(_label_path(folder, CASES[1])), "truncated or corrupt"


def _bad_float_label(folder, extra):
    path = _label_path(folder, CASES[0])
    _rewrite_label(path, lambda array: np.where(array == 1, 1.5, array).astype(np.float32))
    return path, "non-integer label values [1.5]"


def _bad_truncated_image(folder, extra):
    return _truncate(os.path.join(folder, "imagesTr", f"{CASES[2]}_0000.nii.gz")), "truncated or corrupt"


def _bad_empty_label(folder, extra):
    path = _label_path(folder, CASES[3])
    open(path, "wb").close()
    return path, "empty file"


def _bad_label_without_image(folder, extra):
    os.remove(os.path.join(folder, "imagesTr", f"{CASES[3]}_0000.nii.gz"))
    return _label_path(folder, CASES[3]), "a label without an image"


def _bad_no_channel_names(folder, extra):
    path = os.path.join(folder, "dataset.json")
    with open(path) as handle:
        dataset_json = json.load(handle)
    del dataset_json["channel_names"]
    with open(path, "w") as handle:
        json.dump(dataset_json, handle)
    return path, "missing key 'channel_names'"


def _bad_channel_mismatch(folder, extra):
    path = os.path.join(folder, "dataset.json")
    with open(path) as handle:
        dataset_json = json.load(handle)
    dataset_json["channel_names"] = {"0": "MRI", "1": "T2"}
    with open(path, "w") as handle:
        json.dump(dataset_json, handle)
    return CASES[0], "image channel(s)"


def _bad_dangling_label_link(folder, extra):
    path = _label_path(folder, CASES[2])
    os.remove(path)
    os.symlink("/mnt/unmounted/share/label.nii.gz", path)
    return path, "dangling link"


def _bad_2d_unlabeled_image(folder, extra):
    image = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{CASES[0]}_0000.nii.gz"))
    path = os.path.join(extra, "new_001_0000.nii.gz")
    sitk.WriteImage(image[:, :, image.GetSize()[2] // 2], path, True)
    return path, "a 2D image"


def _bad_unlabeled_channels(folder, extra):
    for channel in ("0000", "0001"):
        shutil.copy(os.path.join(folder, "imagesTr", f"{CASES[0]}_0000.nii.gz"),
                    os.path.join(extra, f"new_001_{channel}.nii.gz"))
    return "--unlabeled", "has 2 image channel(s)"


def _bad_unwritable_versions(folder, extra):
    path = os.path.join(folder, "em_labels")
    with open(path, "w") as handle:  # a file where the version folder belongs (as root, the one way to deny writes)
        handle.write("")
    return path, "not writable"


def _bad_verified_case(folder, extra):
    path = os.path.join(folder, "em_verified_cases.json")
    with open(path, "w") as handle:
        json.dump([CASES[0], "hippocampus_999"], handle)
    return path, "hippocampus_999 not labelled cases"


def _bad_verified_json(folder, extra):
    path = os.path.join(folder, "em_verified_cases.json")
    with open(path, "w") as handle:
        handle.write('["hippocampus_001",')
    return path, "not valid JSON"


CATALOGUE = [  # (what is wrong, how to make it, command, arguments)
    ("truncated label .nii.gz", _bad_truncated_label, "plan", []),
    ("float label values (1.5)", _bad_float_label, "plan", []),
    ("truncated image .nii.gz", _bad_truncated_image, "plan", []),
    ("empty label file", _bad_empty_label, "plan", []),
    ("label without an image", _bad_label_without_image, "plan", []),
    ("dataset.json without channel_names", _bad_no_channel_names, "plan", []),
    ("dataset.json channels != image files", _bad_channel_mismatch, "plan", []),
    ("dangling label symlink", _bad_dangling_label_link, "check", []),
    ("2D image in --unlabeled", _bad_2d_unlabeled_image, "run", ["--folds", "0", "1"]),
    ("wrong channel count in --unlabeled", _bad_unlabeled_channels, "run", ["--folds", "0", "1"]),
    ("em_labels not writable", _bad_unwritable_versions, "run", ["--folds", "0", "1"]),
    ("unknown case in em_verified_cases.json", _bad_verified_case, "run", ["--folds", "0", "1"]),
    ("em_verified_cases.json not JSON", _bad_verified_json, "run", ["--folds", "0", "1"]),
]


@pytest.mark.parametrize("name, breaker, command, arguments", CATALOGUE, ids=[row[0] for row in CATALOGUE])
def test_bad_input_catalogue(nnunet_env, capsys, name, breaker, command, arguments):
    from nnunetv2_em import cli

    folder = make_raw_dataset(nnunet_env.raw, 995, CASES)
    extra = os.path.join(nnunet_env.root, "extra")
    os.makedirs(extra)
    culprit, expected = breaker(folder, extra)
    before = tree_snapshot(nnunet_env.root)
    argv = [command, "-d", "995"]
    if command == "plan":
        argv += ["-c", "2d", "-np", "1"]
    if command == "run":
        argv += ["-c", "2d", "--trainer", "VanillaTrainer_tiny", "--device", "cpu", *arguments]
        argv += ["--unlabeled", extra] if os.listdir(extra) else []
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("nnunetv2_em: error: ")
    assert expected in message and culprit in message and "Fix:" in message
    assert tree_snapshot(nnunet_env.root) == before


@pytest.mark.parametrize("cases, folds", [(3, ["0", "1", "2", "3"]), (1, ["0", "1"])], ids=["more folds than cases",
                                                                                             "a 1-case dataset"])
def test_too_few_cases_for_the_folds(nnunet_env, capsys, cases, folds):
    from nnunetv2_em import cli

    make_raw_dataset(nnunet_env.raw, 996, CASES[:cases])
    before = tree_snapshot(nnunet_env.root)
    assert cli.main(["run", "-d", "996", "-c", "2d", "--trainer", "VanillaTrainer_tiny", "--device", "cpu",
                     "--folds", *folds]) == 2
    message = capsys.readouterr().err
    assert f"{cases} labelled case(s) for {len(folds)} folds" in message and "Fix:" in message
    assert tree_snapshot(nnunet_env.root) == before


def test_an_unreachable_scheduler_is_one_message_and_nothing_written(nnunet_env, capsys):
    from nnunetv2_em import cli

    make_raw_dataset(nnunet_env.raw, 997, CASES)
    before = tree_snapshot(nnunet_env.root)
    assert cli.main(["run", "-d", "997", "-c", "2d", "--trainer", "VanillaTrainer_tiny", "--device", "cpu",
                     "--folds", "0", "1", "--scheduler", "tcp://127.0.0.1:9"]) == 2
    message = capsys.readouterr().err
    assert "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered" in message and "Fix:" in message
    assert tree_snapshot(nnunet_env.root) == before
