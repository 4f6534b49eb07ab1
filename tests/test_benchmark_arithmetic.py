"""The benchmark report's arithmetic on hand-made results."""

import math

import numpy as np
import pytest

from nnunetv2_em.benchmark import harness as benchmark
from nnunetv2_em.benchmark import report as benchmark_report


def test_recovery_share():
    assert benchmark.recovery_share(0.70, 0.76, 0.80) == pytest.approx(0.6)
    assert benchmark.recovery_share(0.70, 0.65, 0.80) == pytest.approx(-0.5)  # EM worse than vanilla
    assert math.isnan(benchmark.recovery_share(0.8, 0.8, 0.8))


def test_bootstrap_interval_contains_the_mean_and_ignores_nan():
    mean, low, high = benchmark.bootstrap_ci([0.5, 0.7, 0.9, float("nan")], seed=1)
    assert mean == pytest.approx(0.7)
    assert 0.5 <= low < mean < high <= 0.9
    assert benchmark.bootstrap_ci([0.8, 0.8, 0.8]) == pytest.approx((0.8, 0.8, 0.8))


def test_detection_scores():
    truth = np.array([1, 1, 1, 0, 0, 0], bool)
    flagged = np.array([1, 1, 0, 1, 0, 0], bool)
    scores = benchmark.detection_scores(truth, flagged)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert benchmark.detection_scores(truth, np.zeros(6, bool))["f1"] == 0.0


def test_ranking_scores():
    ranked = [{"case": c, "review_score": s} for c, s in
              (("a", 0.9), ("b", 0.5), ("c", 0.1), ("d", 0.1), ("e", 0.05))]
    scores = benchmark.ranking_scores(ranked, {"a", "c"})
    # median 0.1: flagged a (0.9) and b (0.5) -> precision 1/2, recall 1/2
    assert (scores["flagged"], scores["precision"], scores["recall"]) == (2, 0.5, 0.5)
    assert scores["precision_at_k"] == 0.5  # top-2 = a, b
    assert scores["average_precision"] == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_label_dice_leaves_ignored_voxels_out():
    reference = np.array([0, 1, 1, 1, 2, 2])
    labels = np.array([0, 1, 3, 0, 2, 3])
    result = benchmark.label_dice(reference, labels, classes=[1, 2], ignore_label=3)
    assert result["dice_1"] == pytest.approx(2 * 1 / (2 + 1))  # kept voxels: 0,1,3,4
    assert result["dice_2"] == pytest.approx(1.0)
    assert result["fraction_ignored"] == pytest.approx(2 / 6)
    # scored as the annotation it replaced: voxel 2 was annotated 0 (a miss), voxel 5 was annotated 2 (a hit)
    annotation = np.array([0, 1, 0, 0, 2, 2])
    kept = benchmark.label_dice(reference, labels, classes=[1, 2], ignore_label=3, annotation=annotation)
    assert kept["dice_kept_1"] == pytest.approx(2 * 1 / (3 + 1))
    assert kept["dice_kept_2"] == pytest.approx(1.0)
    assert kept["dice_1"] == result["dice_1"]


def _results(em_dice):
    arm = lambda d: {"per_class": {"1": (d, d - 0.01, d + 0.01), "2": (d, d - 0.02, d + 0.02)},  # noqa: E731
                     "foreground": (d, d - 0.01, d + 0.01), "cases": 3}
    return {"noise": {"name": "erode2", "description": "eroded"}, "profile": "cpu", "seed": 0, "train_cases": 4,
            "test_cases": 3, "command": "nnunetv2_em benchmark ...",
            "test_dice": {"noisy": arm(0.70), "em": arm(em_dice), "clean": arm(0.80)},
            "recovery_share": benchmark.recovery_share(0.70, em_dice, 0.80),
            "label_quality": [{"round": 0, "mean_foreground_dice": 0.8, "mean_foreground_dice_ignored_kept": 0.8,
                               "mean_fraction_ignored": 0.0},
                              {"round": 1, "mean_foreground_dice": 0.85, "mean_foreground_dice_ignored_kept": 0.83,
                               "mean_fraction_ignored": 0.01}],
            "detection": {"cases": {"corrupted": 2, "flagged": 2, "precision": 1.0, "recall": 1.0, "k": 2,
                                    "precision_at_k": 1.0, "average_precision": 1.0},
                          "voxels": {m: {"precision": 0.5, "recall": 0.4, "f1": 0.44, "flagged": 10, "true": 12}
                                     for m in ("em", "cleanlab")}},
            "arms": {a: {"wall_minutes": 1.0, "peak_rss_mib": 100.0} for a in ("noisy", "em", "clean")},
            "em_rounds": [{"round": 1, "model_dice": 0.72, "min_model_dice": 0.5, "refinement_applied": True,
                           "fraction_changed": 0.02, "fraction_ignored": 0.01}]}


def test_report_states_the_result_either_way():
    better = benchmark_report.markdown(_results(0.76))
    assert "**0.60**" in better and "did **not**" not in better
    assert "0.760 [0.750, 0.770]" in better
    worse = benchmark_report.markdown(_results(0.65))
    assert "**-0.50**" in worse and "EM did **not** beat vanilla" in worse
    assert "| 1 | 0.8300 | 0.8500 | 1.000% |" in worse  # ignored kept at annotation first
    no_drop = _results(0.75)
    no_drop["test_dice"]["clean"] = no_drop["test_dice"]["noisy"]
    no_drop["recovery_share"] = float("nan")
    assert "no noise-induced drop" in benchmark_report.markdown(no_drop)


def test_report_says_when_the_gate_kept_every_label():
    refined = benchmark_report.markdown(_results(0.76))
    assert "| 1 | 0.720 | 0.50 | yes | 2.000% | 1.000% |" in refined
    assert "gate stayed closed" not in refined
    gated = _results(0.65)
    gated["em_rounds"] = [{"round": 1, "model_dice": 0.44, "min_model_dice": 0.5, "refinement_applied": False,
                           "fraction_changed": 0.0, "fraction_ignored": 0.0}]
    report = benchmark_report.markdown(gated)
    assert "| 1 | 0.440 | 0.50 | no | 0.000% | 0.000% |" in report
    assert "gate stayed closed in every round" in report and "run-to-run spread" in report
