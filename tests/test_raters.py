"""Per-rater noise models (``estep.raters``): planted raters recovered, the likelihood never decreasing, the
posterior consistent with the single-rater E-step, reviewed truths as complete data, and the input checks. Synthetic
arrays with known truth (the numerics' unit tests; the evidence on real images is the benchmark's)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nnunetv2_em.estep import model as single
from nnunetv2_em.estep import raters

NUM_CLASSES = 3
# planted raters after Zhang et al.'s annotator types: good, over-segmenting (background called foreground),
# under-segmenting (foreground called background)
PLANTED = np.array([
    [[0.97, 0.02, 0.01], [0.03, 0.95, 0.02], [0.02, 0.03, 0.95]],
    [[0.70, 0.20, 0.10], [0.02, 0.96, 0.02], [0.01, 0.03, 0.96]],
    [[0.98, 0.01, 0.01], [0.40, 0.58, 0.02], [0.35, 0.02, 0.63]],
])
CLASS_PRIOR = np.array([0.6, 0.25, 0.15])
TOLERANCE = 0.03  # largest absolute error of a recovered T_r entry with 60,000 voxels


def _planted(seed: int = 0, voxels: int = 60_000, coverage=(1.0, 1.0, 0.5)):
    rng = np.random.default_rng(seed)
    truth = rng.choice(NUM_CLASSES, size=voxels, p=CLASS_PRIOR)
    # an informative but imperfect, calibrated network: features 1.5 * one-hot(truth) + N(0, 1.2²) per class, and
    # logits the Bayes posterior of the truth given them (log prior + 1.5 x / 1.2²)
    features = rng.normal(0.0, 1.2, size=(NUM_CLASSES, voxels))
    features[truth, np.arange(voxels)] += 1.5
    logits = np.log(CLASS_PRIOR)[:, None] + 1.5 * features / 1.2 ** 2
    ratings = np.empty((len(PLANTED), voxels), dtype=np.int64)
    for rater, transition in enumerate(PLANTED):
        cumulative = np.cumsum(transition[truth], axis=1)
        ratings[rater] = (rng.random(voxels)[:, None] > cumulative).sum(axis=1)
        ratings[rater, rng.random(voxels) >= coverage[rater]] = -1  # this rater did not annotate these voxels
    return logits, ratings, truth


def test_planted_raters_are_recovered_and_the_likelihood_never_decreases():
    logits, ratings, _ = _planted()
    fitted = raters.fit_rater_model(logits, ratings)
    assert np.max(np.abs(fitted.transitions - PLANTED)) < TOLERANCE
    assert np.all(np.diff(fitted.trace) >= -1e-12)
    assert fitted.trace[-1] > fitted.trace[0]
    assert fitted.log_likelihood == pytest.approx(raters.rater_log_likelihood(logits, ratings, fitted))
    # the network's logits were made at temperature 1: the fit finds about that
    assert 0.9 < fitted.temperature < 1.1


def test_the_posterior_beats_majority_vote_and_each_rater():
    logits, ratings, truth = _planted(seed=1)
    fitted = raters.fit_rater_model(logits, ratings)
    map_labels = raters.rater_posterior(logits, ratings, fitted).argmax(axis=0)
    votes = np.stack([(ratings == c).sum(axis=0) for c in range(NUM_CLASSES)])
    majority = votes.argmax(axis=0)  # ties to the lower class, as np.argmax does
    accuracy = {"em": np.mean(map_labels == truth), "majority": np.mean(majority == truth)}
    accuracy.update({f"rater_{r}": np.mean(ratings[r][ratings[r] >= 0] == truth[ratings[r] >= 0])
                     for r in range(len(PLANTED))})
    # majority vote is already right on 97.5 % here; EM removes about a third of its errors
    assert accuracy["em"] > max(v for k, v in accuracy.items() if k != "em") + 0.005, accuracy


def _real_raters(count: int = 3):
    """Real Hippocampus labels (the demo subset) cropped to their structures with a 3-voxel margin, and three raters:
    the label itself, a dilating rater (every background voxel touching a structure takes its class) and an eroding
    rater (every structure voxel touching the background becomes background); ``(truths, ratings)``."""
    import SimpleITK as sitk
    from scipy import ndimage

    from nnunetv2_em.demo import DEMO_DATA

    cross = ndimage.generate_binary_structure(3, 1)
    folder = os.path.join(DEMO_DATA, "labelsTr")
    truths, ratings = [], []
    for name in sorted(os.listdir(folder))[:count]:
        label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, name))).astype(np.int64)
        box = tuple(slice(max(0, s.start - 3), s.stop + 3) for s in ndimage.find_objects((label > 0).astype(int))[0])
        label = label[box]
        dilated = np.where(label == 0, ndimage.grey_dilation(label, footprint=cross), label)
        eroded = np.where((label > 0) & ndimage.binary_dilation(label == 0, cross), 0, label)
        truths.append(label)
        ratings.append(np.stack([label, dilated, eroded]))
    return truths, ratings


def _mean_dice(labels, truth) -> float:
    return float(np.mean([2 * np.sum((labels == c) & (truth == c)) / max(np.sum(labels == c) + np.sum(truth == c), 1)
                          for c in range(1, NUM_CLASSES)]))


def _map_dice(model, logits, ratings, truths) -> float:
    """Mean over cases of the posterior MAP's Dice against the truth."""
    return float(np.mean([_mean_dice(raters.rater_posterior(x, r, model).argmax(axis=0), t)
                          for x, r, t in zip(logits, ratings, truths, strict=True)]))


def test_an_uninformative_network_keeps_the_raters_consensus_on_real_labels():
    """The trial that kept raters out of ``run`` (docs/multi_rater.md), at the numerics level: an untrained network
    (flat logits) and a good, a dilating and an eroding rater on real labels. With the prior's class bias fitted
    (Dawid-Skene's class marginal) the posterior's MAP is the consensus, which is the truth here; without it the flat
    prior calls structure as likely as background and the MAP follows the dilating rater."""
    truths, ratings = _real_raters(count=2)
    flat = [np.zeros((NUM_CLASSES, *truth.shape)) for truth in truths]
    logits = np.concatenate([x.reshape(NUM_CLASSES, -1) for x in flat], axis=1)
    stacked = np.concatenate([r.reshape(3, -1) for r in ratings], axis=1)
    dice = {}
    for fit_class_bias in (True, False):
        # flat logits have no temperature to calibrate
        fitted = raters.fit_rater_model(logits, stacked, fit_class_bias=fit_class_bias, calibrate_temperature=False,
                                        max_iterations=30)
        assert np.all(np.diff(fitted.trace) >= -1e-12)
        dice[fit_class_bias] = _map_dice(fitted, flat, ratings, truths)
        if fit_class_bias:
            bands = np.concatenate([raters.rater_bands(r, num_classes=NUM_CLASSES, width=2.0).reshape(3, -1)
                                    for r in ratings], axis=1)
            banded = raters.fit_rater_bands(logits, stacked, bands, fitted, strength=100.0, width=2.0)
            assert np.all(np.diff(banded.trace) >= -1e-12) and banded.log_likelihood >= fitted.log_likelihood - 1e-9
            assert _map_dice(banded, flat, ratings, truths) > 0.99
    dilated_dice = np.mean([_mean_dice(r[1], t) for r, t in zip(ratings, truths, strict=True)])
    assert dice[True] > 0.99, dice
    assert dice[False] < dilated_dice + 0.02, (dice, dilated_dice)


def test_one_rater_gives_the_single_rater_posterior_and_unrated_voxels_the_prior():
    logits, ratings, _ = _planted(seed=2, voxels=2_000)
    transition = PLANTED[1]
    one = raters.RaterModel(transition[None], temperature=1.3)
    expected = single.posterior(logits, ratings[1], single.NoiseModel(transition, 1.3))
    assert np.allclose(raters.rater_posterior(logits, ratings[1:2], one), expected, atol=1e-6)
    unrated = np.full((1, logits.shape[1]), -1)
    assert np.allclose(raters.rater_posterior(logits, unrated, one), single.softmax(logits, 1.3), atol=1e-6)


def test_reviewed_truths_are_complete_data():
    logits, ratings, truth = _planted(seed=3, voxels=5_000)
    known = np.full_like(truth, -1)
    known[:4000] = truth[:4000]
    posterior = raters.rater_posterior(logits, ratings, raters.RaterModel(PLANTED), truths=known)
    assert np.array_equal(posterior[:, :4000].argmax(axis=0), truth[:4000])
    assert np.allclose(posterior[:, :4000].max(axis=0), 1.0)
    # with every voxel known, one update is the empirical confusion of each rater
    updated = raters.update_rater_transitions(logits, ratings, PLANTED, 1.0, truths=truth)
    for rater in range(len(PLANTED)):
        rated = ratings[rater] >= 0
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES))
        np.add.at(confusion, (truth[rated], ratings[rater, rated]), 1.0)
        assert np.allclose(updated[rater], confusion / confusion.sum(axis=1, keepdims=True))
    fitted = raters.fit_rater_model(logits, ratings, truths=known)
    assert np.all(np.diff(fitted.trace) >= -1e-12)


def test_many_confident_raters_do_not_underflow():
    logits, ratings, _ = _planted(seed=4, voxels=500)
    sharp = np.stack([np.full((NUM_CLASSES, NUM_CLASSES), 1e-12) + np.eye(NUM_CLASSES)] * 40)
    sharp /= sharp.sum(axis=2, keepdims=True)
    many = np.concatenate([ratings[:1]] * 40)
    posterior = raters.rater_posterior(logits * 50, many, raters.RaterModel(sharp))
    assert np.all(np.isfinite(posterior)) and np.allclose(posterior.sum(axis=0), 1.0, atol=1e-5)


def test_a_rater_who_rated_nothing_keeps_the_starting_matrix():
    logits, ratings, _ = _planted(seed=5, voxels=3_000)
    ratings[2] = -1
    start = raters.RaterModel(np.stack([single.default_transition(NUM_CLASSES)] * 3))
    fitted = raters.fit_rater_model(logits, ratings, initial=start)
    assert np.allclose(fitted.transitions[2], start.transitions[2])


def test_reliability_reads_sensitivity_and_specificity_off_the_matrices():
    reliability = raters.rater_reliability(raters.RaterModel(PLANTED), [0.6, 0.25, 0.15])
    assert np.allclose(reliability["sensitivity"][2], [0.98, 0.58, 0.63])
    # rater 1 calls class 1 where the truth is 0 (0.20 of 0.6) or 2 (0.03 of 0.15)
    assert reliability["specificity"][1, 1] == pytest.approx(1 - (0.6 * 0.20 + 0.15 * 0.03) / 0.75)


@pytest.mark.parametrize("call, message", [
    (lambda: raters.fit_rater_model(np.zeros((3, 10)), np.zeros((2, 9))), "same voxels"),
    (lambda: raters.fit_rater_model(np.zeros((1, 10)), np.zeros((2, 10))), "at least 2 classes"),
    (lambda: raters.fit_rater_model(np.zeros((3, 10)), np.zeros((2, 10)), weights=-np.ones(10)), "non-negative"),
    (lambda: raters.fit_rater_model(np.zeros((3, 10)), np.zeros((2, 10)),
                                    initial=raters.RaterModel(np.ones((2, 3, 3)))), "probability distribution"),
    (lambda: raters.update_rater_transitions(np.zeros((3, 10)), np.zeros((2, 10)), PLANTED, 1.0), "(R, C, C)"),
    (lambda: raters.rater_reliability(raters.RaterModel(PLANTED), [1.0, 0.0]), "class_prior"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_the_model_round_trips_through_its_record():
    fitted = raters.fit_rater_model(*_planted(seed=6, voxels=2_000)[:2], max_iterations=3)
    again = raters.RaterModel.from_dict(fitted.to_dict())
    assert np.array_equal(again.transitions, fitted.transitions) and again.trace == fitted.trace


def test_disagreement_counts_voxels_two_raters_saw_differently():
    ratings = np.array([[0, 1, 1, -1, 2], [0, 2, 1, 1, -1], [-1, 1, -1, -1, -1]])
    # voxels rated twice or more: 0 (agree), 1 (1/2/1: disagree), 2 (agree) -> 1 of 3
    assert raters.rater_disagreement(ratings, num_classes=3) == pytest.approx(1 / 3)
    assert raters.rater_disagreement(ratings[:1], num_classes=3) == 0.0
    assert raters.disagreement_map(ratings, num_classes=3).tolist() == [False, True, False, False, False]


def test_the_front_door_fits_every_rater_and_refines_with_all_of_them():
    """Cases of a multi-rater dataset through ``EStep``: the decision carries the raters' matrices (and survives
    its record), each case's posterior combines every rater, and its scores say how much they disagree."""
    from nnunetv2_em.estep.pipeline import ArrayCaseInputs, EStep, EStepOptions, RoundDecision
    from nnunetv2_em.settings import EMSettings

    logits, ratings, truth = _planted(seed=7, voxels=8 * 2_000)
    shape = (10, 10, 20)
    cases = [f"c{i}" for i in range(8)]
    part = {case: slice(i * 2_000, (i + 1) * 2_000) for i, case in enumerate(cases)}
    inputs = ArrayCaseInputs(
        logits_of=lambda c: logits[:, part[c]].reshape(NUM_CLASSES, *shape),
        annotation_of=lambda c: np.where(ratings[1, part[c]] >= 0, ratings[1, part[c]], 0).reshape(shape),
        ratings_of=lambda c: ratings[:, part[c]].reshape(len(PLANTED), *shape))
    settings = EMSettings.resolve({"min_model_dice": 0.0, "changes_without_verified_cases": True,
                                   "fit_iterations": 200}, source="test")
    step = EStep(EStepOptions.from_settings(settings), inputs, num_classes=NUM_CLASSES, ignore_label=NUM_CLASSES,
                 round_index=1)
    decision = step.fit(cases)
    assert decision.raters is not None and decision.raters.transitions.shape == (3, NUM_CLASSES, NUM_CLASSES)
    assert np.max(np.abs(decision.raters.transitions - PLANTED)) < 0.06  # 16,000 voxels
    again = RoundDecision.from_dict(decision.to_dict())
    assert np.array_equal(again.raters.transitions, decision.raters.transitions)
    correct = {"annotation": 0, "refined": 0}
    for case in cases:
        result = step.case(case, decision)
        expected = raters.rater_posterior(inputs.logits(case), inputs.ratings(case), decision.raters)
        assert np.allclose(step.case(case, again).labels, result.labels)
        kept = result.labels != NUM_CLASSES  # the ignore label where in doubt
        assert np.array_equal(result.labels[kept & (expected.max(axis=0) >= 0.9)],
                              expected.argmax(axis=0)[kept & (expected.max(axis=0) >= 0.9)])
        assert 0 < result.scores["rater_disagreement"] < 1 and result.scores["raters"] == 3
        case_truth = truth[part[case]].reshape(shape)
        correct["annotation"] += int(np.sum(inputs.annotation(case) == case_truth))
        correct["refined"] += int(np.sum(result.labels == case_truth))
    # the over-segmenting rater's labels in labelsTr, refined with the other two: far more voxels right
    assert correct["refined"] > correct["annotation"] + 0.05 * truth.size, correct
