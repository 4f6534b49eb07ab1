"""``nnunetv2_em run`` with a weak-label file on real Hippocampus cases: full, partial (one structure drawn),
tagged and weak-only (image only) cases in one dataset, 2 folds x 1 round with the tiny trainer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TEST_DEVICE, NnUNetWorkspace, demo_cases, make_raw_dataset
from scipy import ndimage

pytestmark = pytest.mark.slow

DATASET_ID = 909
DATASET = "Dataset909_Weak"
ALL = demo_cases(12)
FULL, PARTIAL, TAGGED, WEAK_ONLY = ALL[:5], ALL[5:8], ALL[8:10], ALL[10:]


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    workspace = NnUNetWorkspace(str(tmp_path_factory.mktemp("weak")))
    folder = make_raw_dataset(workspace.raw, DATASET_ID, ALL, name="Weak")
    originals = {}
    for case in PARTIAL:  # only the anterior structure was drawn: the posterior one is left as background
        path = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
        array[array == 2] = 0
        partial = sitk.GetImageFromArray(array)
        partial.CopyInformation(image)
        sitk.WriteImage(partial, path)
    for case in WEAK_ONLY:
        os.remove(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    for case in [*FULL, *PARTIAL, *TAGGED]:
        originals[case] = _read(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    shape = _read(os.path.join(folder, "imagesTr", f"{WEAK_ONLY[1]}_0000.nii.gz")).shape
    box = [[0, shape[0]], [0, shape[1]], [0, shape[2] // 2]]  # z, y, x of the raw array: the low half of x
    weak = {"version": 1, "cases": {
        **{case: {"annotated_classes": ["Anterior"]} for case in PARTIAL},
        **{case: {"count": {"Anterior": 1}} for case in TAGGED},
        WEAK_ONLY[0]: {"absent": ["Posterior"], "present": ["Anterior"]},
        WEAK_ONLY[1]: {"present": ["Anterior"], "location": {"Anterior": {"box": box}}},
    }}
    with open(os.path.join(folder, "em_weak_labels.json"), "w") as handle:
        json.dump(weak, handle)
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d")
    plans_file = os.path.join(workspace.preprocessed, DATASET, "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    plans["em"].update({"min_model_dice": 0.0, "mirroring": False, "max_ignored_share": 1.0,
                        "calibrate_temperature": False, "changes_without_verified_cases": True, "soft_targets": 3})
    with open(plans_file, "w") as handle:
        json.dump(plans, handle)
    result = workspace.run("nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1",
                           "--rounds", "1", "--trainer", "VanillaTrainer_tiny", "--device", TEST_DEVICE,
                           "--no-validation")
    run_folder = os.path.join(workspace.results, DATASET, "em_run__VanillaTrainer_tiny__nnUNetPlans__2d")
    with open(os.path.join(run_folder, "round_01", "cases.json")) as handle:
        rows = {row["case"]: row for row in json.load(handle)}
    return {"folder": folder, "rows": rows, "originals": originals, "result": result, "box": box,
            "workspace": workspace}


def test_every_weak_or_partial_case_records_the_constraints_that_shaped_it(weak_run):
    rows = weak_run["rows"]
    assert sorted(rows) == sorted(ALL)  # weak-only cases joined the run as pseudo-labelled cases
    for case in PARTIAL:
        assert rows[case]["weak_labels"]["kind"] == "partial"
    for case in TAGGED:
        assert rows[case]["weak_labels"]["kind"] == "tagged"
    for case in WEAK_ONLY:
        assert rows[case]["weak_labels"]["kind"] == "weak_only"
        assert rows[case]["provenance"] == "pseudo"
    for case in FULL:
        assert "weak_labels" not in rows[case]


def test_partial_cases_never_get_the_class_they_annotate_where_it_was_not_drawn(weak_run):
    for case in PARTIAL:
        refined = _read(os.path.join(weak_run["folder"], "labelsTr", f"{case}.nii.gz"))
        original = weak_run["originals"][case]
        assert refined.shape == original.shape
        assert not np.any(refined[original == 0] == 1)


def test_constraints_hold_in_the_raw_labels_of_weak_only_and_tagged_cases(weak_run):
    folder = weak_run["folder"]
    first = _read(os.path.join(folder, "labelsTr", f"{WEAK_ONLY[0]}.nii.gz"))
    assert not np.any(first == 2) and np.any(first == 1)  # absent and present
    second = _read(os.path.join(folder, "labelsTr", f"{WEAK_ONLY[1]}.nii.gz"))
    inside = np.zeros(second.shape, bool)
    inside[tuple(slice(a, b) for a, b in weak_run["box"])] = True
    assert np.any(second[inside] == 1) and not np.any(second[~inside] == 1)  # present, inside its box only
    for case in TAGGED:
        refined = _read(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        assert ndimage.label(refined == 1)[1] <= 1


def test_em_trainer_judges_held_out_partial_cases_under_their_constraints(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    workspace = NnUNetWorkspace(str(tmp_path))
    cases = demo_cases(10)
    folder = make_raw_dataset(workspace.raw, 910, cases, name="Partial")
    held_out = sorted(generate_crossval_split(sorted(cases), seed=12345, n_splits=5)[0]["val"])
    partial = [*held_out, *[c for c in cases if c not in held_out][:4]]
    originals = {}
    for case in partial:
        path = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
        array[array == 2] = 0
        originals[case] = array
        edited = sitk.GetImageFromArray(array)
        edited.CopyInformation(image)
        sitk.WriteImage(edited, path)
    with open(os.path.join(folder, "em_weak_labels.json"), "w") as handle:
        json.dump({"version": 1, "cases": {case: {"annotated_classes": ["Anterior"]} for case in partial}}, handle)
    workspace.run("nnunetv2_em", "plan", "-d", "910", "-c", "2d")
    workspace.run("nnUNetv2_train", "910", "2d", "0", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE)
    fold = os.path.join(workspace.results, "Dataset910_Partial", "EMTrainer_tiny__nnUNetPlans__2d", "fold_0")
    with open(os.path.join(fold, "em", "round_02", "cases.json")) as handle:
        rows = {row["case"]: row for row in json.load(handle)}
    assert sorted(rows) == held_out
    for case in held_out:
        assert rows[case]["weak_labels"]["kind"] == "partial"
        refined = _read(os.path.join(fold, "em", "round_02", "labelsTr", f"{case}.nii.gz"))
        assert not np.any(refined[originals[case] == 0] == 1)


def test_sampled_maps_travel_with_the_version_and_the_soft_target_trainer_trains_on_them(weak_run):
    from nnunetv2_em import storage

    workspace = weak_run["workspace"]
    live = os.path.join(workspace.preprocessed, DATASET, "nnUNetPlans_2d")
    versions = storage.dataset_versions(weak_run["folder"], os.path.join(workspace.preprocessed, DATASET))
    for case in ALL:
        maps = storage.read_seg_b2nd(storage.soft_maps_path(live, case))
        seg = storage.read_seg_b2nd(os.path.join(live, f"{case}_seg.b2nd"))[0]
        assert maps.shape == (3, *seg.shape)
        sure = seg != 3  # the hard labels everywhere the E-step was sure: not ignored, not changed
        if case not in WEAK_ONLY:
            sure &= seg == versions.read_original_segmentation(case)[0]
        assert np.all(maps[:, sure] == seg[sure])
        assert set(np.unique(maps)) <= {-1, 0, 1, 2, 3}
    doubted = [case for case in WEAK_ONLY
               if np.any(storage.read_seg_b2nd(os.path.join(live, f"{case}_seg.b2nd")) == 3)]
    assert doubted and all(not np.all(storage.read_seg_b2nd(storage.soft_maps_path(live, case)) == 3)
                           for case in doubted)  # the ignored voxels became a distribution
    workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "SoftTargetTrainer_tiny", "-device", TEST_DEVICE)
    assert os.path.isfile(os.path.join(workspace.results, DATASET, "SoftTargetTrainer_tiny__nnUNetPlans__2d",
                                       "fold_0", "checkpoint_final.pth"))
    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "0")
    assert not any(os.path.isfile(storage.soft_maps_path(live, case)) for case in ALL)  # no stale maps
