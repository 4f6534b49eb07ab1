"""Bad input: one clear error naming the problem and the fix, and nothing on disk changes."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em import checks, planning
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
    assert checks.with_ignore_label({"labels": {"background": 0, "a": 1}})["labels"]["ignore"] == 2
    assert np.array_equal(checks.label_values({"labels": {"background": 0, "a": 1, "b": 2}}, "x"), [0, 1, 2])


@pytest.mark.parametrize("change, expected", [
    ({"trainer": "NoSuchTrainer"}, "no such nnU-Net trainer"),
    ({"trainer": "EMTrainer_tiny"}, "needs a plain trainer"),
    ({"folds": (0, 0)}, "distinct fold numbers"),
    ({"rounds": 0}, "--rounds 0"),
    ({"warm_fraction": 1.5}, "--warm-fraction"),
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
