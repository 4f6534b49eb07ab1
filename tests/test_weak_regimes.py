"""The weak-label benchmark's regimes (pure arrays) and its summary arithmetic."""

import json
import os

import numpy as np
import pytest

from nnunetv2_em import weak_labels
from nnunetv2_em.benchmark import weak_regimes
from nnunetv2_em.demo import DEMO_DATA
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.estep import constraints

NAMES = {1: "Anterior", 2: "Posterior"}


def _mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros((9, 12, 10), np.uint8)
    label[2:6, 3:8, 2:5] = 1
    label[4:8, 6:10, 5:9] = 2
    label[rng.random(label.shape) < 0.05] = 0
    return label


def test_partial_classes_are_balanced_and_seeded():
    cases = [f"case_{i:03d}" for i in range(11)]
    assigned = weak_regimes.assign_partial_classes(cases, [1, 2], seed=3)
    assert sorted(assigned) == cases
    assert sorted(np.bincount(list(assigned.values()))[1:]) == [5, 6]
    assert assigned == weak_regimes.assign_partial_classes(list(reversed(cases)), [1, 2], seed=3)
    assert assigned != weak_regimes.assign_partial_classes(cases, [1, 2], seed=4)
    with pytest.raises(ValueError, match="2 foreground classes"):
        weak_regimes.assign_partial_classes(cases, [1], seed=0)


def test_partial_mask_keeps_only_the_annotated_class():
    label = _mask(0)
    partial = weak_regimes.partial_mask(label, 2)
    assert set(np.unique(partial)) == {0, 2}
    assert np.array_equal(partial == 2, label == 2)
    assert partial.dtype == label.dtype


def test_full_cases_fraction_and_minimum():
    cases = [f"c{i}" for i in range(40)]
    full = weak_regimes.choose_full_cases(cases, fraction=0.25, seed=0)
    assert len(full) == 10 and set(full) <= set(cases)
    assert len(weak_regimes.choose_full_cases(cases[:4], fraction=0.25, seed=0)) == 2  # the cross-fold run needs 2


def test_weak_row_parses_and_the_clean_mask_meets_every_tag():
    label = _mask(1)
    label[label == 2] = 0  # posterior absent
    row = weak_regimes.weak_row_from_mask(label, class_names=NAMES, volume_margin=0.2)
    assert row["present"] == ["Anterior"] and row["absent"] == ["Posterior"]
    parsed = weak_labels.parse_weak_labels({"version": 1, "cases": {"c": row}}, source="w.json",
                                           class_names={v: k for k, v in NAMES.items()}, labelled=set(),
                                           images={"c"}, image_info=lambda case: (label.shape, (1.0, 1.0, 1.0)))
    case = parsed["c"]
    assert case.weak_only and case.present == {1} and case.absent == {2}
    low, high = case.volume[1]
    assert low <= (label == 1).sum() <= high and high - low >= 0.39 * (label == 1).sum()
    box = case.region[1]
    inside = np.zeros(label.shape, bool)
    inside[tuple(slice(a, b) for a, b in box)] = True
    assert not ((label == 1) & ~inside).any()  # the box holds the class
    assert all(b - a < s for (a, b), s in zip(box, label.shape, strict=True))  # and is tight here
    # the truth, as a confident posterior, is left as it is by the projection onto its own tags
    q = np.stack([(label == c) * 0.98 + 0.01 for c in range(3)]).astype(np.float32)
    projected, report = constraints.project_label_map(label.astype(np.int16), q, case)
    assert np.array_equal(projected, label) and not report.get("unmet")


def test_regime_labels_hand_over_what_each_kind_of_case_gets(tmp_path):
    import SimpleITK as sitk

    files = {}
    for index, case in enumerate(("full", "partial", "weak")):
        files[case] = str(tmp_path / f"{case}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(_mask(index)), files[case])
    design = {"full": {"kind": "full"}, "partial": {"kind": "partial", "annotated": 2}, "weak": {"kind": "weak_only"}}
    labels, rows = weak_regimes.regime_labels(design, files, class_names=NAMES, volume_margin=0.2,
                                              presence_only=False)
    assert sorted(labels) == ["full", "partial"] and sorted(rows) == ["partial", "weak"]
    assert np.array_equal(labels["full"], _mask(0))
    assert np.array_equal(labels["partial"], weak_regimes.partial_mask(_mask(1), 2))
    assert rows["partial"] == {"annotated_classes": ["Posterior"]}
    assert rows["weak"] == weak_regimes.weak_row_from_mask(_mask(2), class_names=NAMES, volume_margin=0.2)
    assert "volume" in rows["weak"]
    _, tags_only = weak_regimes.regime_labels(design, files, class_names=NAMES, volume_margin=0.2,
                                              presence_only=True)
    assert "volume" not in tags_only["weak"] and tags_only["weak"]["present"] == rows["weak"]["present"]


def test_label_group_summary_means_over_cases_of_the_class_mean_and_skips_absent_classes():
    rows = [{"dice_kept_1": 0.8, "dice_kept_2": 0.6, "dice_1": 0.7, "dice_2": float("nan"), "fraction_ignored": 0.1},
            {"dice_kept_1": 0.4, "dice_kept_2": 0.2, "dice_1": 0.3, "dice_2": 0.5, "fraction_ignored": 0.3}]
    summary = weak_regimes.summarize_label_group({"cases": 3, "trained": 2, "rows": rows}, classes=[1, 2])
    assert summary["cases"] == 3 and summary["trained"] == 2
    assert summary["dice_kept"] == pytest.approx((0.7 + 0.3) / 2)
    assert summary["dice"] == pytest.approx((0.7 + 0.4) / 2)  # case 1's class 2 is NaN: its mean is class 1's
    assert summary["fraction_ignored"] == pytest.approx(0.2)
    assert summary["per_class_dice_kept"] == {"1": pytest.approx(0.6), "2": pytest.approx(0.4)}
    assert weak_regimes.summarize_label_group({"cases": 4, "trained": 0, "rows": []}, classes=[1, 2]) == \
        {"cases": 4, "trained": 0}


def test_weak_row_rejects_a_bad_margin():
    with pytest.raises(ValueError, match="volume_margin"):
        weak_regimes.weak_row_from_mask(_mask(0), class_names=NAMES, volume_margin=1.5)


def _replicate(regime, seed, arms, offset):
    cases = ["t1", "t2", "t3"]
    rng = np.random.default_rng(seed)
    test = {}
    for arm in arms:
        scores = {c: 0.5 + offset.get(arm, 0.0) + 0.01 * i + 0.001 * rng.random() for i, c in enumerate(cases)}
        test[arm] = {"per_case": scores, "per_class_case": {"1": scores, "2": scores},
                     "foreground": [float(np.mean(list(scores.values())))] * 3}
    quality = {arm: {"partial": {"cases": 3, "trained": 3, "dice_kept": 0.5 + offset.get(arm, 0.0), "dice": 0.6,
                                 "fraction_ignored": 0.1}} for arm in arms if arm != "em_soft"}
    return {"test_dice": test, "label_quality": quality, "kinds": {"partial": 3}}


def test_summary_pairs_each_arm_with_naive_and_clean_per_seed():
    replicates = {}
    for seed in (0, 1):
        replicates[("full", seed)] = _replicate("full", seed, ["clean"], {"clean": 0.2})
        replicates[("partial", seed)] = _replicate("partial", seed, ["naive", "em_map", "em_soft"],
                                                   {"em_map": 0.05 if seed == 0 else -0.01})
    summary = weak_regimes.summarize(replicates)
    em = summary["regimes"]["partial"]["test"]["em_map"]
    expected = np.mean([[replicates[("partial", s)]["test_dice"]["em_map"]["per_case"][c]
                         - replicates[("partial", s)]["test_dice"]["naive"]["per_case"][c] for c in ("t1", "t2", "t3")]
                        for s in (0, 1)])
    assert em["vs_naive"]["difference"][0] == pytest.approx(expected)
    assert em["vs_naive"]["seeds_won"] == 1  # +0.05 on seed 0, -0.01 on seed 1
    assert em["vs_clean"]["difference"][0] == pytest.approx(expected - 0.2, abs=0.01)
    assert "vs_naive" not in summary["regimes"]["partial"]["test"]["naive"]
    assert summary["regimes"]["partial"]["label_quality"]["em_map"]["partial"]["dice_kept"] == pytest.approx(0.52)
    text = weak_regimes.markdown(summary, command="cmd", classes={"1": "Anterior", "2": "Posterior"})
    assert "| em_map |" in text and "1/2" in text and "### full" in text


def test_summary_averages_the_tag_auroc_over_seeds():
    replicates = {}
    for seed, value in ((0, 0.7), (1, 0.9)):
        run = _replicate("tags", seed, ["naive", "multitask"], {})
        run["tag_auroc"] = {"multitask": {"1": {"auroc": value, "slices": 90, "positive": 40},
                                          "2": {"auroc": float("nan"), "slices": 90, "positive": 0}}}
        replicates[("tags", seed)] = run
    entry = weak_regimes.summarize(replicates)["regimes"]["tags"]
    assert entry["tag_auroc"]["multitask"]["1"]["auroc"] == pytest.approx(0.8)
    assert entry["tag_auroc"]["multitask"]["1"]["per_seed"] == [0.7, 0.9]
    text = weak_regimes.markdown({"regimes": {"tags": entry}}, command="cmd", classes={"1": "A", "2": "P"})
    assert "0.800 (40/90 slices hold it)" in text and "n/a (0/90" in text


def _write_plans(folder, batch_size):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "nnUNetPlans.json"), "w") as handle:
        json.dump({"configurations": {"2d": {"batch_size": batch_size, "patch_size": [56, 40]}}}, handle)


def test_tags_arms_train_with_the_clean_plans_batch_size(tmp_path):
    out = str(tmp_path)
    replicate = weak_regimes.RegimeReplicate(DEMO_DATA, "tags", seed=3, profile="cpu",
                                             out=weak_regimes.replicate_folder(out, "tags", 3))
    naive = replicate.workspace.preprocessed("naive")
    _write_plans(naive, 11)  # nnU-Net's plan for the 8 masked cases
    with pytest.raises(EMInputError, match="include full in --regimes"):
        replicate._pin_batch(replicate.workspace, "naive")
    full = weak_regimes.RegimeReplicate(DEMO_DATA, "full", seed=3, profile="cpu",
                                        out=weak_regimes.replicate_folder(out, "full", 3))
    _write_plans(full.workspace.preprocessed("clean"), 54)
    replicate._pin_batch(replicate.workspace, "naive")
    with open(os.path.join(naive, "nnUNetPlans.json")) as handle:
        plans = json.load(handle)
    assert plans["configurations"]["2d"] == {"batch_size": 54, "patch_size": [56, 40]}
    assert replicate.reference_batch_size() == 54 and full.reference_batch_size() is None
    partial = weak_regimes.RegimeReplicate(DEMO_DATA, "partial", seed=3, profile="cpu",
                                           out=weak_regimes.replicate_folder(out, "partial", 3))
    _write_plans(partial.workspace.preprocessed("naive"), 20)
    partial._pin_batch(partial.workspace, "naive")  # regimes whose arms share one dataset size keep nnU-Net's plan
    with open(os.path.join(partial.workspace.preprocessed("naive"), "nnUNetPlans.json")) as handle:
        assert json.load(handle)["configurations"]["2d"]["batch_size"] == 20
