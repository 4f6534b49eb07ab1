"""The benchmark's metrics, paired intervals, suite summary and report on hand-made arrays and results."""

import math

import numpy as np
import pytest

from nnunetv2_em.benchmark import metrics, suite
from nnunetv2_em.benchmark import report as benchmark_report


def test_recovery_share():
    assert metrics.recovery_share(0.70, 0.76, 0.80) == pytest.approx(0.6)
    assert metrics.recovery_share(0.70, 0.65, 0.80) == pytest.approx(-0.5)  # EM worse than vanilla
    assert math.isnan(metrics.recovery_share(0.8, 0.8, 0.8))


def test_bootstrap_interval_contains_the_mean_and_ignores_nan():
    mean, low, high = metrics.bootstrap_ci([0.5, 0.7, 0.9, float("nan")], seed=1)
    assert mean == pytest.approx(0.7)
    assert 0.5 <= low < mean < high <= 0.9
    assert metrics.bootstrap_ci([0.8, 0.8, 0.8]) == pytest.approx((0.8, 0.8, 0.8))


def test_paired_bootstrap_carries_the_spread_between_seeds():
    rng = np.random.default_rng(0)
    cases = rng.normal(0.0, 0.01, 20)
    # every seed shifts all cases: +0.05, -0.04, +0.02 -> a mean of +0.01 that the seeds do not support
    seed_effects = np.array([0.05, -0.04, 0.02])[:, None]
    mean, low, high = metrics.paired_bootstrap(seed_effects + cases, seed=1)
    assert mean == pytest.approx(0.01 + cases.mean())
    assert low < 0 < high
    # the same mean with consistent seeds excludes 0
    mean, low, high = metrics.paired_bootstrap(np.full((3, 1), 0.01) + cases, seed=1)
    assert 0 < low < mean < high
    # one seed: an interval over cases only
    single = metrics.paired_bootstrap((0.05 + cases)[None], seed=1)
    assert single[1] > 0
    with pytest.raises(ValueError, match="NaN"):
        metrics.paired_bootstrap([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="seeds, cases"):
        metrics.paired_bootstrap([0.1, 0.2])


def test_detection_scores():
    truth = np.array([1, 1, 1, 0, 0, 0], bool)
    flagged = np.array([1, 1, 0, 1, 0, 0], bool)
    scores = metrics.detection_scores(truth, flagged)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert metrics.detection_scores(truth, np.zeros(6, bool))["f1"] == 0.0


def test_ranking_scores():
    ranked = [{"case": c, "review_score": s} for c, s in
              (("a", 0.9), ("b", 0.5), ("c", 0.1), ("d", 0.1), ("e", 0.05))]
    scores = metrics.ranking_scores(ranked, {"a", "c"})
    # median 0.1: flagged a (0.9) and b (0.5) -> precision 1/2, recall 1/2
    assert (scores["flagged"], scores["precision"], scores["recall"]) == (2, 0.5, 0.5)
    assert scores["precision_at_k"] == 0.5  # top-2 = a, b
    assert scores["average_precision"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    # 5 % and 10 % of 5 cases: the top case is reviewed
    assert scores["precision_at_5pct"] == scores["precision_at_10pct"] == 1.0
    long = [{"case": f"c{i}", "review_score": 1.0 - i / 40} for i in range(40)]
    scores = metrics.ranking_scores(long, {"c0", "c3", "c39"})
    assert scores["precision_at_5pct"] == pytest.approx(1 / 2)  # top 2: c0, c1
    assert scores["precision_at_10pct"] == pytest.approx(2 / 4)  # top 4: c0..c3
    nothing = metrics.ranking_scores(long, set())
    assert math.isnan(nothing["average_precision"]) and math.isnan(nothing["precision_at_5pct"])


def test_label_scores_leave_ignored_voxels_out_or_keep_the_annotation():
    reference = np.array([0, 1, 1, 1, 2, 2])
    labels = np.array([0, 1, 3, 0, 2, 3])
    result = metrics.label_scores(reference, labels, classes=[1, 2], ignore_label=3)
    assert result["dice_1"] == pytest.approx(2 * 1 / (2 + 1))  # kept voxels: 0,1,3,4
    assert result["dice_2"] == pytest.approx(1.0)
    assert result["fraction_ignored"] == pytest.approx(2 / 6)
    # scored as the annotation it replaced: voxel 2 was annotated 0 (a miss), voxel 5 was annotated 2 (a hit)
    annotation = np.array([0, 1, 0, 0, 2, 2])
    kept = metrics.label_scores(reference, labels, classes=[1, 2], ignore_label=3, annotation=annotation)
    assert kept["dice_kept_1"] == pytest.approx(2 * 1 / (3 + 1))
    assert kept["dice_kept_2"] == pytest.approx(1.0)
    assert kept["dice_1"] == result["dice_1"]
    assert result["fraction_wrong"] == pytest.approx(1 / 6)  # voxel 3; the ignored ones cannot be wrong
    assert kept["fraction_wrong"] == pytest.approx(2 / 6)  # voxels 2 (annotated 0) and 3
    with pytest.raises(ValueError, match="annotation"):
        metrics.label_scores(reference, labels, classes=[1, 2], ignore_label=3, surfaces=True)


def _cube(shift=0, size=8, shape=(20, 20, 20)):
    label = np.zeros(shape, np.uint8)
    label[5 + shift:5 + shift + size, 5:5 + size, 5:5 + size] = 1
    return label


def test_group_summaries_split_corrupted_and_untouched_cases_and_count_undefined_hd95():
    nan = float("nan")
    per_case = {"a": {"dice_1": 0.5, "dice_2": 0.7, "hd95_1": 2.0, "hd95_2": nan, "fraction_ignored": 0.1},
                "b": {"dice_1": 0.9, "dice_2": 0.9, "hd95_1": 1.0, "hd95_2": 3.0, "fraction_ignored": 0.0},
                "c": {"dice_1": nan, "dice_2": 0.2, "hd95_1": nan, "hd95_2": nan, "fraction_ignored": 0.5}}
    summary = metrics.summarize_groups(per_case, {"a", "c"}, classes=[1, 2])
    assert summary["all"]["cases"] == 3 and summary["corrupted"]["cases"] == 2 and summary["untouched"]["cases"] == 1
    assert summary["corrupted"]["dice"] == pytest.approx((0.6 + 0.2) / 2)
    assert summary["untouched"]["dice"] == pytest.approx(0.9)
    assert summary["corrupted"]["hd95"] == pytest.approx(2.0)  # c has no defined HD95: its class mean is NaN
    assert summary["corrupted"]["hd95_undefined"] == 3
    assert summary["all"]["fraction_ignored"] == pytest.approx(0.2)
    assert "surface_dice" not in summary["all"] and "fraction_wrong" not in summary["all"]
    assert metrics.summarize_groups({"b": per_case["b"]}, set(), classes=[1, 2])["corrupted"] == {"cases": 0}


def test_surface_scores_on_shifted_cubes():
    reference = _cube()
    same = metrics.surface_scores(reference, reference, classes=[1])
    assert same == {"hd95_1": 0.0, "surface_dice_1": 1.0}
    one = metrics.surface_scores(reference, _cube(shift=1), classes=[1])
    assert one["hd95_1"] == pytest.approx(1.0) and one["surface_dice_1"] == pytest.approx(1.0)  # within tolerance
    three = metrics.surface_scores(reference, _cube(shift=3), classes=[1])
    assert three["hd95_1"] == pytest.approx(3.0)
    assert 0.0 < three["surface_dice_1"] < 1.0  # the side faces still agree, the shifted caps do not
    # a structure missing from one map: HD95 undefined, surface Dice 0; absent from both: perfect
    missing = metrics.surface_scores(reference, np.zeros_like(reference), classes=[1, 2])
    assert math.isnan(missing["hd95_1"]) and missing["surface_dice_1"] == 0.0
    assert missing["hd95_2"] == 0.0 and missing["surface_dice_2"] == 1.0


def _label_rows(noisy, em, cleanlab_left_out, ignored=0.0):
    group = lambda kept, left_out, ignored_share: {  # noqa: E731
        "cases": 4, "dice": left_out, "dice_kept": kept, "hd95": 2.0, "surface_dice": 0.8, "hd95_undefined": 0,
        "fraction_ignored": ignored_share}
    return {"noisy": {g: group(noisy, noisy, 0.0) for g in ("all", "corrupted", "untouched")},
            "em": {g: group(em, em + 0.01, ignored) for g in ("all", "corrupted", "untouched")},
            "cleanlab": {g: group(noisy, cleanlab_left_out, 0.05) for g in ("all", "corrupted", "untouched")}}


def _replicate(setting, em_label, test_noisy, test_em, cases=6):
    versions = _label_rows(0.8, em_label, 0.85)
    rng = np.random.default_rng(len(setting))
    noise_per_case = rng.normal(0, 0.005, cases)
    per_case = lambda value: {f"t{i}": value + noise_per_case[i] for i in range(cases)}  # noqa: E731
    arm = lambda value: {"per_case": per_case(value), "foreground": (value, value - 0.01, value + 0.01)}  # noqa: E731
    return {
        "noise": {"name": setting, "description": setting}, "train_cases": 8, "dataset": "/data",
        "label_quality": {"corrupted_cases": ["a", "b"] if setting != "clean" else [],
                          "versions": {"noisy": versions["noisy"], "em_round_1": versions["em"],
                                       "cleanlab": versions["cleanlab"]}},
        "em_rounds": [{"round": 1, "model_dice": 0.6, "min_model_dice": 0.5, "refinement_applied": True,
                       "fraction_changed": 0.01, "fraction_ignored": 0.02}],
        "detection": {"cases": {"corrupted": 2, "average_precision": 0.9, "precision_at_5pct": 1.0,
                                "precision_at_10pct": 1.0},
                      "voxels": {m: {"precision": 0.5, "recall": 0.4, "f1": 0.44, "flagged": 10, "true": 12}
                                 for m in ("em", "cleanlab")}},
        "arms": {}, "test_dice": {"noisy": arm(test_noisy), "em": arm(test_em), "cleanlab": arm(test_noisy)},
    }


def test_suite_pairs_arms_per_seed_and_reports_what_is_established():
    seeds = [0, 1, 2]
    replicates = {}
    for seed, (em_gain, em_label) in enumerate(((0.02, 0.85), (0.03, 0.86), (0.025, 0.84))):
        replicates[("mix", seed)] = _replicate("mix", em_label, 0.70, 0.70 + em_gain)
        replicates[("clean", seed)] = _replicate("clean", 0.8, 0.80, 0.80)
    summary = suite.summarize(replicates, settings=["clean", "mix"], seeds=seeds)
    mix = summary["settings"]["mix"]
    assert mix["paired"]["em - noisy"]["mean"] == pytest.approx(0.025)
    assert mix["paired"]["em - noisy"]["excludes_zero"] and mix["paired"]["em - noisy"]["seeds_won"] == 3
    assert not mix["paired"]["cleanlab - noisy"]["excludes_zero"]
    assert mix["paired"]["clean - noisy"]["mean"] == pytest.approx(0.10, abs=0.01)
    assert mix["recovery_share"] == pytest.approx(0.25, abs=0.05)
    assert mix["labels"]["em"]["all"]["dice_kept"] == pytest.approx(0.85)
    summary.update({"profile": "cpu", "corruption_seed": 0, "label_quality_only": False, "command": "x"})
    text = benchmark_report.markdown(summary)
    assert "| mix | EM (last round) | 0.8500 | 0.8600 |" in text
    assert "+0.025 [" in text and "3 of 3" in text
    assert "`clean`: EM left the clean labels unchanged" in text
    assert "Test Dice, EM − vanilla +0.025 [+0.020, +0.030]: established." in text
    # a seed that lost, or EM losing on clean labels, is said in so many words
    # (4 seeds: with 3, one losing seed already puts 0 inside the interval, as 1/27 of the resamples draw it alone)
    seeds = [0, 1, 2, 3]
    replicates[("mix", 3)] = _replicate("mix", 0.84, 0.70, 0.698)
    for seed in seeds:
        replicates[("clean", seed)] = _replicate("clean", 0.8, 0.80, 0.79)
    summary = suite.summarize(replicates, settings=["clean", "mix"], seeds=seeds)
    assert summary["settings"]["mix"]["paired"]["em - noisy"]["excludes_zero"]
    summary.update({"profile": "cpu", "corruption_seed": 0, "label_quality_only": False, "command": "x"})
    text = benchmark_report.markdown(summary)
    assert "the seeds disagree in sign (3 of 4 higher): not established" in text
    assert "established: the do-no-harm control fails on test Dice" in text


def test_report_does_not_claim_what_one_seed_or_a_harmed_control_shows():
    replicates = {("mix", 0): _replicate("mix", 0.79, 0.70, 0.69), ("clean", 0): _replicate("clean", 0.78, 0.8, 0.8)}
    summary = suite.summarize(replicates, settings=["clean", "mix"], seeds=[0])
    summary.update({"profile": "cpu", "corruption_seed": 0, "label_quality_only": False, "command": None})
    text = benchmark_report.markdown(summary)
    assert "do-no-harm control failed" in text
    assert "not established" in text and "fewer than 3 seeds" in text
    assert "lower in 1 of 1 seeds" in text
    # one seed's interval excludes 0 (every test case lost 0.01) yet holds no training spread: no claim
    assert "excludes 0 over 1 seed(s)" in text and "]: established" not in text


def test_suite_rejects_unknown_settings_and_bad_seeds():
    with pytest.raises(Exception, match="unknown"):
        suite.check_suite(["mix", "nope"], [0], "cpu")
    with pytest.raises(Exception, match="distinct"):
        suite.check_suite(["mix"], [0, 0], "cpu")
    assert suite.check_suite(["mix", "mix", "clean"], [2, 1], "cpu") == (["mix", "clean"], [2, 1])


def test_a_label_quality_replicate_rerun_in_full_adds_only_the_final_trainings(tmp_path, monkeypatch):
    from conftest import demo_cases, make_raw_dataset

    from nnunetv2_em.benchmark.harness import Benchmark

    source = make_raw_dataset(str(tmp_path / "raw"), 4, demo_cases(11))
    calls = []
    for step in ("_plan", "_train_final", "_predict_test"):
        monkeypatch.setattr(Benchmark, step, lambda self, arm, step=step: calls.append((step, arm)) or {})
    monkeypatch.setattr(Benchmark, "_run_em", lambda self: calls.append(("_run_em", "em")) or {})
    monkeypatch.setattr(Benchmark, "filter_with_cleanlab", lambda self, split: {})
    monkeypatch.setattr(Benchmark, "_write_dataset", lambda self, arm, cases, label_files=None: None)

    def replicate(label_quality_only):
        return Benchmark(source, "mix", seed=0, profile="smoke", out=str(tmp_path / "rep"), training_seed=0,
                         label_quality_only=label_quality_only)

    replicate(True).run_arms({"train": [], "test": []})
    assert calls == [("_plan", "em"), ("_run_em", "em")]
    calls.clear()
    replicate(True).run_arms({"train": [], "test": []})
    assert calls == []  # finished label-quality-only: nothing reruns
    timings = replicate(False).run_arms({"train": [], "test": []})
    steps = [step for step, _ in calls]
    assert ("_train_final", "em") in calls and ("_predict_test", "em") in calls
    assert {arm for _, arm in calls} == {"noisy", "em", "cleanlab"}
    assert steps.count("_train_final") == 3
    assert all(timings[arm]["final_training"] for arm in ("noisy", "em", "cleanlab"))
    calls.clear()
    replicate(False).run_arms({"train": [], "test": []})
    assert calls == []


def test_seed_records_measure_only_missing_seeds_and_report_what_belongs(tmp_path):
    from nnunetv2_em.benchmark.records import seed_records

    measured = []

    def measure(seed):
        measured.append(seed)
        return {"training_seed": seed, "profile": "cpu-long" if seed < 2 else "cpu"}

    first = seed_records(str(tmp_path), [0, 1], measure, belongs=lambda r: r["profile"] == "cpu-long")
    again = seed_records(str(tmp_path), [0, 1, 2], measure, belongs=lambda r: r["profile"] == "cpu-long")
    assert measured == [0, 1, 2]  # seeds 0 and 1 were not measured twice
    assert [r["training_seed"] for r in first] == [r["training_seed"] for r in again] == [0, 1]
    assert seed_records(str(tmp_path), [], measure, belongs=lambda r: True)[-1]["profile"] == "cpu"
