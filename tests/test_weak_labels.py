"""The weak-label file: one documented schema, parsed into constraints; every bad row is one clear error."""

import json
import os

import pytest
from conftest import demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em import weak_labels
from nnunetv2_em.errors import EMInputError


@pytest.fixture
def dataset(tmp_path):
    cases = demo_cases(4)
    folder = make_raw_dataset(str(tmp_path), 907, cases)
    os.remove(os.path.join(folder, "labelsTr", f"{cases[3]}.nii.gz"))  # a weak-only case: image, no label
    with open(os.path.join(folder, "dataset.json")) as handle:
        return folder, json.load(handle), cases


def _load(folder, dataset_json, cases, content):
    with open(weak_labels.weak_labels_path(folder), "w") as handle:
        json.dump(content, handle)
    return weak_labels.load_weak_labels(folder, dataset_json, labelled=cases[:3], images=cases)


def test_a_file_with_partial_weak_only_and_tagged_cases_parses_into_constraints(dataset):
    folder, dataset_json, cases = dataset
    shape, spacing = weak_labels.image_information(os.path.join(folder, "imagesTr", f"{cases[1]}_0000.nii.gz"))
    parsed = _load(folder, dataset_json, cases, {"version": 1, "cases": {
        cases[0]: {"annotated_classes": ["Anterior"]},
        cases[1]: {"absent": [2], "count": {"Anterior": 1}, "location": {"1": {"side": "high", "axis": 2}}},
        cases[3]: {"present": ["Anterior", "Posterior"], "volume": {"Posterior": {"min": 0.5, "max": 1.0,
                                                                                 "unit": "ml"}},
                   "location": {"Posterior": {"slices": [2, 20], "axis": 0}}},
    }})
    assert parsed[cases[0]].annotated_classes == {1} and not parsed[cases[0]].weak_only
    assert parsed[cases[0]].unannotated_classes(3) == {2}
    second = parsed[cases[1]]
    assert second.absent == {2} and second.count == {1: 1}
    assert second.region[1][2] == (shape[2] // 2, shape[2]) and second.region[1][0] == (0, shape[0])
    weak = parsed[cases[3]]
    assert weak.weak_only and weak.present == {1, 2} and weak.region[2][0] == (2, 20)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    assert weak.volume[2] == pytest.approx((0.5 / voxel_ml, 1.0 / voxel_ml))
    assert weak_labels.load_weak_labels(str(folder) + "_none", dataset_json, labelled=[], images=[]) == {}


@pytest.mark.parametrize("row, key, fix", [
    ({"present": ["Amygdala"]}, "present", "Anterior"),
    ({"present": [1], "absent": ["Anterior"]}, "constraints", "consistent"),
    ({"count": {"1": -1}}, "count", "component count"),
    ({"count": {"2": 0}, "present": [2]}, "constraints", "consistent"),
    ({"volume": {"1": {"min": 5, "max": 2}}}, "volume", "min <= max"),
    ({"volume": {"1": {"min": 1, "max": 2, "unit": "cc"}}}, "volume", '"ml"'),
    ({"location": {"1": {"box": [[0, 5], [0, 5], [0, 500]]}}}, "location", "inside the image"),
    ({"location": {"1": {"slices": [7, 7], "axis": 0}}}, "location", "inside the image"),
    ({"location": {"1": {"side": "left", "axis": 2}}}, "location", '"low"'),
    ({"location": {"1": {"side": "low", "axis": 5}}}, "location", "0..2"),
    ({"colour": "red"}, "colour", "use only"),
    ({}, "row", "use some of"),
])
def test_a_bad_row_is_one_error_naming_file_case_key_and_fix_and_nothing_is_written(dataset, row, key, fix):
    folder, dataset_json, cases = dataset
    content = {"version": 1, "cases": {cases[0]: {"present": [1]}, cases[1]: row}}
    with open(weak_labels.weak_labels_path(folder), "w") as handle:
        json.dump(content, handle)
    before = tree_snapshot(folder)
    with pytest.raises(EMInputError) as error:
        weak_labels.load_weak_labels(folder, dataset_json, labelled=cases[:3], images=cases)
    message = str(error.value)
    assert weak_labels.weak_labels_path(folder) in message and f"case {cases[1]}, {key}:" in message
    assert "Fix:" in message and fix in message.split("Fix:")[1]
    assert tree_snapshot(folder) == before


def test_unknown_cases_partial_masks_without_labels_and_bad_files_are_rejected(dataset):
    folder, dataset_json, cases = dataset
    for content, expected in (({"cases": {"hippocampus_999": {"present": [1]}}}, "no image in imagesTr"),
                              ({"cases": {cases[3]: {"annotated_classes": [1]}}}, "has no label file"),
                              ({"version": 2, "cases": {}}, "version 2"),
                              ([1, 2], "expected")):
        with pytest.raises(EMInputError, match=expected):
            _load(folder, dataset_json, cases, content)
    with open(weak_labels.weak_labels_path(folder), "w") as handle:
        handle.write("{not json")
    with pytest.raises(EMInputError, match="not valid JSON"):
        weak_labels.load_weak_labels(folder, dataset_json, labelled=cases[:3], images=cases)
