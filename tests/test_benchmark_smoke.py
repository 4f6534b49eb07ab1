"""A smoke run of the whole benchmark harness on a handful of real Hippocampus cases with a tiny budget."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import NNUNET_TEST_ENV, demo_cases, make_raw_dataset

from nnunetv2_em.benchmark import harness as benchmark

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    source = make_raw_dataset(str(root / "source"), 970, demo_cases(14), name="Clean")
    out = str(root / "out")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in NNUNET_TEST_ENV.items():
            patch.setenv(key, value)
        results = benchmark.run_benchmark(source, "mix", seed=3, profile="smoke", out=out, command="smoke",
                                          training_seed=0)
    return source, out, results


def test_split_and_corruption_are_recorded_and_only_training_labels_change(smoke):
    source, out, results = smoke
    with open(os.path.join(out, "split.json")) as handle:
        split = json.load(handle)
    assert (len(split["train"]), len(split["test"])) == (8, 3)
    assert not set(split["train"]) & set(split["test"])
    with open(os.path.join(out, "corruption", "records.json")) as handle:
        records = json.load(handle)
    assert len(records["corrupted_cases"]) == 4  # mix: half of the 8 training cases
    noisy_raw = os.path.join(out, "nnunet", "raw", "Dataset961_BenchNoisy", "labelsTr")
    for case in split["train"]:
        clean = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(source, "labelsTr", f"{case}.nii.gz")))
        noisy = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(noisy_raw, f"{case}.nii.gz")))
        if case in records["corrupted_cases"]:
            mask = np.load(os.path.join(out, "corruption", f"{case}.npz"))["corrupted_voxels"]
            np.testing.assert_array_equal(mask, noisy != clean)
            assert records["records"][case]["voxels_changed"] == int(mask.sum())
        else:
            np.testing.assert_array_equal(noisy, clean)
    for case in split["test"]:  # the test reference is the clean label
        with open(os.path.join(source, "labelsTr", f"{case}.nii.gz"), "rb") as a, \
                open(os.path.join(out, "test", "labels", f"{case}.nii.gz"), "rb") as b:
            assert a.read() == b.read()


def test_every_arm_is_trained_evaluated_and_reported(smoke):
    _, out, results = smoke
    for arm in ("noisy", "em", "clean"):
        assert results["test_dice"][arm]["cases"] == 3
        assert results["arms"][arm]["wall_minutes"] > 0 and results["arms"][arm]["peak_rss_mib"] > 0
        assert os.path.isfile(os.path.join(out, "predictions", arm, "summary.json"))
    # the vanilla arms were planned by nnU-Net's own planner, the EM arm by EMPlanner
    for arm, planner in (("Dataset961_BenchNoisy", "ExperimentPlanner"), ("Dataset962_BenchEm", "EMPlanner"),
                         ("Dataset963_BenchClean", "ExperimentPlanner")):
        with open(os.path.join(out, "nnunet", "preprocessed", arm, "nnUNetPlans.json")) as handle:
            assert json.load(handle)["experiment_planner_used"] == planner
    # every training of every arm ran with the same training seed
    for arm in ("Dataset961_BenchNoisy", "Dataset962_BenchEm", "Dataset963_BenchClean"):
        with open(os.path.join(out, "nnunet", "results", arm, "VanillaTrainer_tiny__nnUNetPlans__2d", "fold_all",
                               "em_mstep_done.json")) as handle:
            assert json.load(handle)["seed"] == 0
    assert results["training_seed"] == 0
    assert [row["round"] for row in results["label_quality"]] == [0, 1]
    assert results["label_quality"][0]["mean_fraction_ignored"] == 0.0
    # round 0 is the annotation itself: both label Dice variants agree there
    assert results["label_quality"][0]["mean_foreground_dice_ignored_kept"] == \
        pytest.approx(results["label_quality"][0]["mean_foreground_dice"])
    assert [row["round"] for row in results["em_rounds"]] == [1]
    assert results["em_rounds"][0]["min_model_dice"] == 0.0  # the smoke profile opens the gate
    for method in ("em", "cleanlab"):
        voxels = results["detection"]["voxels"][method]
        assert voxels["true"] > 0 and 0.0 <= voxels["precision"] <= 1.0 and 0.0 <= voxels["recall"] <= 1.0
    assert results["detection"]["cases"]["corrupted"] == 4
    with open(os.path.join(out, "report.md")) as handle:
        report = handle.read()
    assert "## Test Dice" in report and "cleanlab" in report
    for name in ("label_dice_per_round.png", "test_dice_per_arm.png", "overlays.png"):
        assert os.path.getsize(os.path.join(out, "plots", name)) > 1000
    with open(os.path.join(out, "results.json")) as handle:
        saved = json.load(handle)
    assert saved["test_dice"]["em"]["foreground"] == pytest.approx(list(results["test_dice"]["em"]["foreground"]),
                                                                   nan_ok=True)
