"""The E-step's front door (``estep.pipeline``) on synthetic 3-class cases: it runs the stages in the order the
drivers ran them before it existed, honours every E-step setting, and carries a round's decision as a record."""

import dataclasses
import json

import numpy as np
import pytest

from nnunetv2_em import estep
from nnunetv2_em.estep import constraints as constrained
from nnunetv2_em.estep.pipeline import ArrayCaseInputs, EStep, EStepOptions, RoundDecision
from nnunetv2_em.settings import EMSettings

NUM_CLASSES, IGNORE = 3, 3
CASES = [f"case_{i}" for i in range(6)]


def _case(index: int):
    """A 3-class case: a disc and a ring around it, confident logits, an annotation with a flipped wedge."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:24, :24]
    radius = np.hypot(yy - 12, xx - 12)
    truth = np.where(radius < 5, 2, np.where(radius < 9, 1, 0))
    logits = rng.normal(0, 0.5, (NUM_CLASSES, 24, 24))
    logits[truth, yy, xx] += 4.0
    annotation = truth.copy()
    annotation[(truth == 1) & (xx > 12 + index % 3)] = 0  # an under-segmenting annotator
    annotation[0, :] = -1  # outside the image
    return logits.astype(np.float32), annotation.astype(np.int16), truth


ARRAYS = {case: _case(i) for i, case in enumerate(CASES)}


def _inputs(**extra):
    return ArrayCaseInputs(lambda c: ARRAYS[c][0], lambda c: ARRAYS[c][1], **extra)


def _options(**changes):
    settings = EMSettings.resolve({"min_model_dice": 0.0, "changes_without_verified_cases": True},
                                  source="test")
    return dataclasses.replace(EStepOptions.from_settings(settings), **changes)


def test_every_em_setting_is_an_estep_option_or_named_as_something_else():
    """A new ``em`` setting has to be mapped (or declared not the E-step's), so no driver can silently drop it."""
    # the M-step's schedule and patch sampling; the prediction's mirroring
    not_estep = {"rounds", "epochs_per_round", "mirroring", "patch_sampling"}
    mapped_otherwise = {"change_threshold": "thresholds", "keep_threshold": "thresholds",
                        "noise_model": "per_case_prior_strength / band_width", "boundary_band_width": "band_width",
                        "rater_noise_model": "rater_band_width",
                        "case_prior_strength": "band_prior_strength"}
    options = {field.name for field in dataclasses.fields(EStepOptions)}
    for field in dataclasses.fields(EMSettings):
        assert field.name in options | not_estep | set(mapped_otherwise), field.name
    settings = EMSettings.resolve({"noise_model": "boundary_per_case", "second_opinion": "mirror",
                                   "soft_targets": 3, "weak_mode": "sample", "seed": 7}, source="test")
    options = EStepOptions.from_settings(settings)
    assert options.band_width == settings.boundary_band_width == options.rater_band_width
    one_matrix_per_rater = EMSettings.resolve({"rater_noise_model": "global"}, source="test")
    assert EStepOptions.from_settings(one_matrix_per_rater).rater_band_width is None
    assert options.per_case_prior_strength == settings.case_prior_strength
    assert options.second_opinion and options.soft_targets == 3 and options.weak_mode == "sample"
    assert options.seed == 7 and options.thresholds == settings.thresholds


def test_a_round_through_the_front_door_equals_the_stages_run_by_hand():
    """The sequence every driver used to write out: sample, fit, gate, then per case posterior and refinement."""
    options = _options()
    step = EStep(options, _inputs(), num_classes=NUM_CLASSES, ignore_label=IGNORE, round_index=2)
    decision = step.fit(CASES)

    cap = estep.voxels_per_class(options.fit_sample_voxels, num_cases=len(CASES), num_classes=NUM_CLASSES)
    samples = [constrained.fit_sample(ARRAYS[c][0], ARRAYS[c][1], None, max_voxels_per_class=cap,
                                      seed=estep.case_seed(options.seed, 2, c)) for c in CASES]
    fit = estep.fit_round(samples, calibrate_temperature=options.calibrate_temperature,
                          max_iterations=options.fit_iterations, min_model_dice=options.min_model_dice,
                          thresholds=options.thresholds, max_ignored_share=options.max_ignored_share)
    np.testing.assert_array_equal(decision.model.transition, fit.model.transition)
    assert decision.refine and decision.changes_allowed
    for case in CASES:
        logits, annotation, truth = ARRAYS[case]
        expected, scores = estep.refine_case(logits, annotation, fit.model, thresholds=options.thresholds,
                                             ignore_label=IGNORE, case_prior_strength=options.per_case_prior_strength,
                                             seed=estep.case_seed(options.seed, 2, case))
        result = step.case(case, decision)
        np.testing.assert_array_equal(result.labels, expected)
        assert result.scores == scores and result.applied and result.soft_maps is None
        assert result.uncertainty.shape == annotation.shape
        # and the refinement does what it is for: the wedge the annotator dropped comes back
        dropped = (annotation == 0) & (truth == 1)
        assert np.mean(result.labels[dropped] == 1) > 0.9
        assert np.all(result.labels[annotation == -1] == -1)


def test_verified_cases_gate_the_round_and_keep_their_labels():
    verified = CASES[:2]
    step = EStep(_options(), _inputs(), num_classes=NUM_CLASSES, ignore_label=IGNORE, round_index=1)
    decision = step.fit(CASES, verified=[*verified, "not_in_this_round"])
    assert decision.verified == tuple(verified) and decision.gate["kind"] == "precision"
    kept = step.case(verified[0], decision)
    assert not kept.applied
    np.testing.assert_array_equal(kept.labels, ARRAYS[verified[0]][1])
    # the verified cases' annotations are wrong where the wedge is, so every change there is "false": shut
    assert not decision.changes_allowed
    changed = step.case(CASES[3], decision)
    assert not np.any((changed.labels != ARRAYS[CASES[3]][1]) & (changed.labels != IGNORE))
    assert any("verified cases" in note for note in decision.notes())


def test_reviewed_truths_open_the_gate_when_the_changes_agree_with_them():
    truth_of = {case: ARRAYS[case][2] for case in CASES[:2]}
    step = EStep(_options(), _inputs(truth_of=truth_of.get), num_classes=NUM_CLASSES, ignore_label=IGNORE,
                 round_index=1)
    decision = step.fit(CASES, verified=CASES[:2])
    assert decision.gate["kind"] == "precision" and decision.changes_allowed


def test_the_decision_travels_as_a_record():
    step = EStep(_options(), _inputs(), num_classes=NUM_CLASSES, ignore_label=IGNORE, round_index=1)
    decision = step.fit(CASES, verified=CASES[:1])
    record = json.loads(json.dumps(decision.to_dict()))
    again = RoundDecision.from_dict(record)
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(decision.to_dict(), sort_keys=True)
    np.testing.assert_array_equal(step.case(CASES[4], again).labels, step.case(CASES[4], decision).labels)


def test_a_second_opinion_is_read_only_when_asked_for_and_can_veto_changes():
    def opposite(case):  # a second network that believes the annotation everywhere
        annotation = ARRAYS[case][1]
        logits = np.full((NUM_CLASSES, *annotation.shape), -4.0, np.float32)
        for c in range(NUM_CLASSES):
            logits[c][annotation == c] = 4.0
        return logits

    asked = []
    inputs = _inputs(second_opinion_of=lambda c: asked.append(c) or opposite(c))
    without = EStep(_options(), inputs, num_classes=NUM_CLASSES, ignore_label=IGNORE, round_index=1)
    decision = without.fit(CASES)
    plain = without.case(CASES[2], decision)
    assert asked == []
    vetoed = EStep(_options(second_opinion=True), inputs, num_classes=NUM_CLASSES, ignore_label=IGNORE,
                   round_index=1).case(CASES[2], decision)
    assert asked == [CASES[2]]
    annotation = ARRAYS[CASES[2]][1]
    assert np.count_nonzero((plain.labels != annotation) & (plain.labels != IGNORE)) > 0
    assert np.count_nonzero((vetoed.labels != annotation) & (vetoed.labels != IGNORE)) == 0


def test_soft_targets_sample_only_where_the_estep_was_in_doubt():
    step = EStep(_options(soft_targets=5), _inputs(), num_classes=NUM_CLASSES, ignore_label=IGNORE, round_index=1)
    result = step.case(CASES[1], step.fit(CASES))
    annotation = ARRAYS[CASES[1]][1]
    assert result.soft_maps.shape == (5, *annotation.shape)
    certain = result.labels == annotation
    assert np.all(result.soft_maps[:, certain] == result.labels[certain])


def test_an_unlabeled_case_is_pseudo_labelled_inside_the_image():
    pseudo = {"new": np.where(ARRAYS[CASES[0]][1] < 0, -1, 0).astype(np.int16)}
    inputs = ArrayCaseInputs(lambda c: ARRAYS[CASES[0]][0], lambda c: pseudo.get(c, ARRAYS.get(c, (0, 0))[1]))
    step = EStep(_options(), inputs, num_classes=NUM_CLASSES, ignore_label=IGNORE, round_index=1)
    result = step.case("new", step.fit(CASES[:1]), pseudo=True)
    truth = ARRAYS[CASES[0]][2]
    inside = pseudo["new"] == 0
    assert np.all(result.labels[~inside] == -1)
    labelled = inside & (result.labels != IGNORE)
    assert np.mean(result.labels[labelled] == truth[labelled]) > 0.95
    assert result.scores["voxels_annotated"] == 0 and not result.applied


def test_the_round_summary_says_when_em_converged():
    step = EStep(_options(tolerance=0.5), _inputs(previous_of=lambda c: ARRAYS[c][1]), num_classes=NUM_CLASSES,
                 ignore_label=IGNORE, round_index=1)
    decision = step.fit(CASES)
    scores = {case: step.case(case, decision).scores for case in CASES}
    assert step.summary(scores, refine=True)["converged"]  # few voxels changed: below a loose tolerance
    assert not step.summary(scores, refine=False)["converged"]
    strict = EStep(_options(tolerance=0.0), _inputs(previous_of=lambda c: ARRAYS[c][1]), num_classes=NUM_CLASSES,
                   ignore_label=IGNORE, round_index=1)
    assert not strict.summary(scores, refine=True)["converged"]
    assert [row["case"] for row in step.ranking(scores)] == [row["case"] for row in estep.rank_cases(scores)]


def test_an_ignore_label_among_the_classes_is_refused():
    with pytest.raises(ValueError, match="ignore_label"):
        EStep(_options(), _inputs(), num_classes=NUM_CLASSES, ignore_label=2, round_index=1)
