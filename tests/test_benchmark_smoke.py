"""A smoke run of the whole benchmark suite on a handful of real Hippocampus cases with a tiny budget:
one noise setting plus the clean control, one training seed, every arm trained, predicted and reported."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import NNUNET_TEST_ENV, demo_cases, make_raw_dataset

from nnunetv2_em.benchmark import suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    source = make_raw_dataset(str(root / "source"), 970, demo_cases(14), name="Clean")
    out = str(root / "out")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in NNUNET_TEST_ENV.items():
            patch.setenv(key, value)
        summary = suite.run_suite(source, ["mix"], seeds=[0], corruption_seed=3, profile="smoke", out=out,
                                  command="smoke")
    return source, out, summary


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _replicate(out, setting):
    return os.path.join(out, setting, "seed_0")


def test_split_and_corruption_are_recorded_and_only_training_labels_change(smoke):
    source, out, _ = smoke
    folder = _replicate(out, "mix")
    with open(os.path.join(folder, "split.json")) as handle:
        split = json.load(handle)
    assert (len(split["train"]), len(split["test"])) == (8, 3)
    assert not set(split["train"]) & set(split["test"])
    with open(os.path.join(_replicate(out, "clean"), "split.json")) as handle:
        assert json.load(handle) == split  # every replicate of a suite has the same split
    with open(os.path.join(folder, "corruption", "records.json")) as handle:
        records = json.load(handle)
    assert 1 <= len(records["corrupted_cases"]) <= 4  # mix: half of the 8 training cases chosen
    noisy_raw = os.path.join(folder, "nnunet", "raw", "Dataset961_BenchNoisy", "labelsTr")
    for case in split["train"]:
        clean = _read(os.path.join(source, "labelsTr", f"{case}.nii.gz"))
        noisy = _read(os.path.join(noisy_raw, f"{case}.nii.gz"))
        if case in records["corrupted_cases"]:
            mask = np.load(os.path.join(folder, "corruption", f"{case}.npz"))["corrupted_voxels"]
            np.testing.assert_array_equal(mask, noisy != clean)
            assert records["records"][case]["voxels_changed"] == int(mask.sum())
        else:
            np.testing.assert_array_equal(noisy, clean)
    for case in split["test"]:  # the test reference is the clean label
        with open(os.path.join(source, "labelsTr", f"{case}.nii.gz"), "rb") as a, \
                open(os.path.join(folder, "test", "labels", f"{case}.nii.gz"), "rb") as b:
            assert a.read() == b.read()


def test_every_arm_trains_with_the_replicates_seed_and_the_planner_it_should(smoke):
    _, out, _ = smoke
    for setting in ("clean", "mix"):
        folder = _replicate(out, setting)
        for dataset, planner in (("Dataset961_BenchNoisy", "ExperimentPlanner"), ("Dataset962_BenchEm", "EMPlanner"),
                                 ("Dataset964_BenchCleanlab", "ExperimentPlanner")):
            with open(os.path.join(folder, "nnunet", "preprocessed", dataset, "nnUNetPlans.json")) as handle:
                assert json.load(handle)["experiment_planner_used"] == planner
            with open(os.path.join(folder, "nnunet", "results", dataset, "VanillaTrainer_tiny__nnUNetPlans__2d",
                                   "fold_all", "em_mstep_done.json")) as handle:
                assert json.load(handle)["seed"] == 0
        with open(os.path.join(folder, "results.json")) as handle:
            results = json.load(handle)
        assert results["training_seed"] == 0 and results["seed"] == 3
        for arm in ("noisy", "em", "cleanlab"):
            assert len(results["test_dice"][arm]["per_case"]) == 3
            assert os.path.isfile(os.path.join(folder, "predictions", arm, "summary.json"))


def test_cleanlab_arm_trains_on_the_noisy_labels_with_its_flags_ignored(smoke):
    _, out, _ = smoke
    folder = _replicate(out, "mix")
    raw = os.path.join(folder, "nnunet", "raw")
    with open(os.path.join(raw, "Dataset964_BenchCleanlab", "dataset.json")) as handle:
        assert json.load(handle)["labels"]["ignore"] == 3
    with open(os.path.join(folder, "cleanlab", "flags.json")) as handle:
        flagged = json.load(handle)
    assert sum(flagged.values()) > 0
    for case, count in flagged.items():
        noisy = _read(os.path.join(raw, "Dataset961_BenchNoisy", "labelsTr", f"{case}.nii.gz"))
        peer = _read(os.path.join(raw, "Dataset964_BenchCleanlab", "labelsTr", f"{case}.nii.gz"))
        assert int((peer == 3).sum()) == count  # Hippocampus: preprocessing neither crops nor resamples the flags
        np.testing.assert_array_equal(peer[peer != 3], noisy[peer != 3])


def test_label_quality_splits_corrupted_and_untouched_cases(smoke):
    _, out, _ = smoke
    with open(os.path.join(_replicate(out, "mix"), "results.json")) as handle:
        results = json.load(handle)
    quality = results["label_quality"]
    assert set(quality["versions"]) == {"noisy", "em_round_1", "cleanlab"}
    noisy = quality["versions"]["noisy"]
    corrupted = len(quality["corrupted_cases"])
    assert (noisy["corrupted"]["cases"], noisy["untouched"]["cases"]) == (corrupted, 8 - corrupted)
    # untouched cases are the clean labels; corrupted ones are not
    assert noisy["untouched"]["dice_kept"] == pytest.approx(1.0) and noisy["untouched"]["hd95"] == 0.0
    assert noisy["corrupted"]["dice_kept"] < 1.0
    assert noisy["all"]["fraction_ignored"] == 0.0
    for version in quality["versions"].values():
        assert 0.0 <= version["all"]["surface_dice"] <= 1.0
    # cleanlab only ignores: with ignored voxels kept at the annotation it is the noisy input
    assert quality["versions"]["cleanlab"]["all"]["dice_kept"] == pytest.approx(noisy["all"]["dice_kept"])
    assert quality["versions"]["cleanlab"]["all"]["fraction_ignored"] > 0.0
    # the smoke profile makes the E-step refine: EM changed or ignored something
    assert results["em_rounds"][0]["refinement_applied"]
    assert results["detection"]["voxels"]["em"]["flagged"] > 0
    assert results["detection"]["voxels"]["em"]["true"] == sum(
        r["voxels_changed"] for c, r in json.load(open(os.path.join(_replicate(out, "mix"), "corruption",
                                                                    "records.json")))["records"].items()
        if c in quality["corrupted_cases"])
    assert {"average_precision", "precision_at_5pct", "precision_at_10pct"} <= set(results["detection"]["cases"])


def test_suite_report_pairs_the_arms_and_rerunning_trains_nothing(smoke):
    source, out, summary = smoke
    mix = summary["settings"]["mix"]
    assert set(mix["paired"]) == {"em - noisy", "cleanlab - noisy", "clean - noisy"}
    assert mix["paired"]["em - noisy"]["seeds"] == 1
    assert "paired" in summary["settings"]["clean"] and "clean - noisy" not in summary["settings"]["clean"]["paired"]
    with open(os.path.join(out, "report.md")) as handle:
        report = handle.read()
    assert "## Training labels against the clean labels" in report and "## Test Dice" in report
    assert "fewer than 3 seeds" in report
    assert os.path.getsize(os.path.join(out, "plots", "label_dice.png")) > 1000
    assert os.path.getsize(os.path.join(out, "plots", "paired_test_differences.png")) > 1000
    with open(os.path.join(out, "suite.json")) as handle:
        assert json.load(handle)["settings"]["mix"]["paired"]["em - noisy"]["mean"] == \
            pytest.approx(mix["paired"]["em - noisy"]["mean"])
    # a rerun continues: everything is done, so nothing trains and the figures are the same
    logs = os.path.join(_replicate(out, "mix"), "logs")
    sizes = {name: os.path.getsize(os.path.join(logs, name)) for name in os.listdir(logs)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in NNUNET_TEST_ENV.items():
            patch.setenv(key, value)
        again = suite.run_suite(source, ["mix"], seeds=[0], corruption_seed=3, profile="smoke", out=out)
    assert {name: os.path.getsize(os.path.join(logs, name)) for name in os.listdir(logs)} == sizes
    assert again["settings"]["mix"]["paired"]["em - noisy"]["mean"] == mix["paired"]["em - noisy"]["mean"]
    report_only = suite.report_finished(out, ["mix", "clean"], seeds=[0, 1], profile="smoke", corruption_seed=3)
    assert report_only["seeds"] == [0]  # seed 1 was never run
