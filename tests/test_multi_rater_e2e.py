"""A three-rater dataset through ``nnunetv2_em run`` (2 folds x 1 round, tiny trainer) and ``-tr EMTrainer_tiny``
on real Hippocampus cases: one rater draws the clean labels, one dilates every structure by a voxel, one erodes
them. ``labelsTr`` holds the raters' consensus (their majority vote, which is the clean label here) for half the
cases and the dilating rater's label for the other half. Each round fits one noise model per rater and tells them
apart; the consensus cases stay as they are (do no harm: with one global matrix per rater and no class bias they
fell to the dilating rater's Dice, docs/multi_rater.md) and the dilated cases move toward the clean labels."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REFINE_ALWAYS, TEST_DEVICE, NnUNetWorkspace, demo_cases, make_raw_dataset, update_em_plans
from scipy import ndimage

from nnunetv2_em import multi_rater

pytestmark = pytest.mark.slow

DATASET_ID = 963
DATASET = "Dataset963_Hippo"
CASES = demo_cases(8)
DILATED_IN_LABELS_TR = CASES[1::2]  # the others keep the consensus (= the clean label) in labelsTr
RUN_NAME = "em_run__VanillaTrainer_tiny__nnUNetPlans__2d"


def _dilated(label: np.ndarray) -> np.ndarray:
    out = label.copy()
    for value in (1, 2):
        out[ndimage.binary_dilation(label == value) & (out == 0)] = value
    return out


def _eroded(label: np.ndarray) -> np.ndarray:
    out = label.copy()
    for value in (1, 2):
        mask = label == value
        out[mask & ~ndimage.binary_erosion(mask)] = 0
    return out


def _write_like(reference: str, array: np.ndarray, path: str) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(sitk.ReadImage(reference))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, path, True)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * np.sum((a == c) & (b == c)) / max(np.sum(a == c) + np.sum(b == c), 1)
                          for c in (1, 2)]))


def test_run_fits_a_noise_model_per_rater_and_moves_the_labels_toward_the_clean_ones(tmp_path):
    workspace = NnUNetWorkspace(str(tmp_path))
    folder = make_raw_dataset(workspace.raw, DATASET_ID, CASES)
    clean = {}
    for case in CASES:
        label_file = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
        clean[case] = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
        for rater, array in (("good", clean[case]), ("over", _dilated(clean[case])), ("under", _eroded(clean[case]))):
            _write_like(label_file, array, multi_rater.rater_label_path(folder, rater, case, ".nii.gz"))
        if case in DILATED_IN_LABELS_TR:
            _write_like(label_file, _dilated(clean[case]), label_file)
    with open(multi_rater.raters_path(folder), "w") as handle:
        json.dump({"version": 1, "raters": {"good": CASES, "over": CASES, "under": CASES}}, handle)
    check = workspace.run("nnunetv2_em", "check", "-d", str(DATASET_ID))
    assert "3 raters (good, over, under) on 8 cases" in check.stdout
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d")
    update_em_plans(workspace, DATASET, REFINE_ALWAYS)
    workspace.run("nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1", "--rounds", "1",
                  "--trainer", "VanillaTrainer_tiny", "--device", TEST_DEVICE, "--no-validation", "--seed", "0")

    round_folder = os.path.join(workspace.results, DATASET, RUN_NAME, "round_01")
    with open(os.path.join(round_folder, "fit.json")) as handle:
        transitions = np.asarray(json.load(handle)["raters"]["transitions"])
    good, over, under = transitions
    assert transitions.shape == (3, 3, 3)
    # the dilating rater calls background foreground far more often than the good one; the eroding one the reverse
    assert over[0, 1:].sum() > good[0, 1:].sum() + 0.01
    assert under[1:, 0].sum() > good[1:, 0].sum() + 0.02
    with open(os.path.join(round_folder, "cases.json")) as handle:
        rows = json.load(handle)
    assert sorted(row["case"] for row in rows) == CASES
    assert all(row["raters"] == 3 and 0 < row["rater_disagreement"] < 1 for row in rows)
    refined = {case: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz")))
               for case in CASES}
    # ignored voxels scored as the annotation they replaced (the unflattering label Dice)
    consensus = [_dice(np.where(refined[case] == 3, clean[case], refined[case]), clean[case])
                 for case in CASES if case not in DILATED_IN_LABELS_TR]
    assert min(consensus) > 0.99, consensus
    before = np.mean([_dice(_dilated(clean[case]), clean[case]) for case in DILATED_IN_LABELS_TR])
    after = np.mean([_dice(np.where(refined[case] == 3, _dilated(clean[case]), refined[case]), clean[case])
                     for case in DILATED_IN_LABELS_TR])
    assert after > before + 0.05, (before, after)

    # the review: cases ranked by how much their raters disagree, each rater's label and the disagreement as layers
    exported = tmp_path / "review"
    workspace.run("nnunetv2_em", "review", "export", "-d", str(DATASET_ID), "-o", str(exported), "--top", "2",
                  "--rank-by", "rater_disagreement")
    with open(exported / "export.json") as handle:
        record = json.load(handle)
    most = sorted(rows, key=lambda row: (-row["rater_disagreement"], row["case"]))
    assert list(record["cases"]) == [row["case"] for row in most[:2]]
    case = most[0]["case"]
    layers = record["cases"][case]["rater_layers"]
    assert set(layers) == {"rater good", "rater over", "rater under", "rater disagreement"}
    shown = sitk.GetArrayFromImage(sitk.ReadImage(str(exported / case / layers["rater disagreement"])))
    assert np.array_equal(shown == 1, (_dilated(clean[case]) != clean[case]) | (_eroded(clean[case]) != clean[case]))
    assert layers["rater disagreement"] in (exported / case / f"{case}.itksnap").read_text()
    assert layers["rater over"] in (exported / case / "load_in_slicer.py").read_text()

    # EMTrainer on the same raters (the original labels back first: EMTrainer refuses a run's output)
    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "0")
    workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE)
    fold = os.path.join(workspace.results, DATASET, "EMTrainer_tiny__nnUNetPlans__2d", "fold_0", "em")
    with open(os.path.join(fold, "round_01", "summary.json")) as handle:
        fold_transitions = np.asarray(json.load(handle)["raters"]["transitions"])
    assert fold_transitions.shape == (3, 3, 3)
    assert fold_transitions[1, 0, 1:].sum() > fold_transitions[0, 0, 1:].sum()  # over-segmenting vs good
    with open(os.path.join(fold, "round_01", "cases.json")) as handle:
        assert all(row["raters"] == 3 for row in json.load(handle))
