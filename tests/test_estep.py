"""E-step array functions against hand-computed answers and synthetic annotators with known noise."""

import numpy as np
import pytest

from nnunetv2_em import estep
from nnunetv2_em.estep import NoiseModel, RefinementThresholds


def _synthetic_annotator(transition, *, n=200_000, logit_scale=1.0, seed=0):
    """Calibrated 2-class network scores, true labels drawn from them, annotations flipped by ``transition``."""
    rng = np.random.default_rng(seed)
    score = rng.normal(0.0, 3.0, n)
    true = (rng.random(n) < 1.0 / (1.0 + np.exp(-score))).astype(np.int64)
    flip_to_one = rng.random(n) < transition[true, 1]
    annotations = flip_to_one.astype(np.int64)
    logits = np.stack([np.zeros(n), score * logit_scale])  # logit_scale != 1: a miscalibrated network
    return logits, annotations, true


def test_posterior_matches_hand_computation():
    logits = np.array([[0.0, 0.0], [np.log(3.0), np.log(3.0)]])  # p = [0.25, 0.75] for both voxels
    model = NoiseModel(np.array([[0.9, 0.1], [0.2, 0.8]]), 1.0)
    q = estep.posterior(logits, np.array([0, 1]), model)
    # annotated 0: [0.25*0.9, 0.75*0.2] = [0.225, 0.15] -> [0.6, 0.4]
    # annotated 1: [0.25*0.1, 0.75*0.8] = [0.025, 0.6]  -> [0.04, 0.96]
    np.testing.assert_allclose(q[:, 0], [0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(q[:, 1], [0.04, 0.96], atol=1e-6)


def test_posterior_of_unannotated_voxels_is_the_calibrated_prior():
    logits = np.array([[0.0], [2.0]])
    model = NoiseModel(np.array([[0.5, 0.5], [0.1, 0.9]]), 2.0)
    q = estep.posterior(logits, np.array([3]), model)  # 3 = ignore label
    np.testing.assert_allclose(q[:, 0], [1 / (1 + np.e), np.e / (1 + np.e)], atol=1e-6)


def test_update_transition_matches_hand_computation():
    probs = np.array([[0.25, 0.25, 1.0], [0.75, 0.75, 0.0]])
    annotations = np.array([0, 1, 0])
    transition = np.array([[0.9, 0.1], [0.2, 0.8]])
    # posteriors: voxel0 [0.6, 0.4]; voxel1 [0.04, 0.96]; voxel2 [1, 0]
    # row 0: annotated-0 mass 0.6 + 1 = 1.6, annotated-1 mass 0.04 -> [1.6, 0.04] / 1.64
    # row 1: annotated-0 mass 0.4,          annotated-1 mass 0.96 -> [0.4, 0.96] / 1.36
    expected = np.array([[1.6 / 1.64, 0.04 / 1.64], [0.4 / 1.36, 0.96 / 1.36]])
    np.testing.assert_allclose(estep.update_transition(probs, annotations, transition), expected, atol=1e-9)


def test_recovers_known_flip_rates_of_a_two_class_annotator():
    true_transition = np.array([[0.9, 0.1], [0.25, 0.75]])
    logits, annotations, _ = _synthetic_annotator(true_transition)
    model = estep.fit_noise_model(logits, annotations, calibrate_temperature=False, max_iterations=500,
                                  tolerance=1e-10)
    np.testing.assert_allclose(model.transition, true_transition, atol=0.02)


def test_recovers_flip_rates_and_temperature_of_an_overconfident_network():
    true_transition = np.array([[0.95, 0.05], [0.2, 0.8]])
    logits, annotations, _ = _synthetic_annotator(true_transition, logit_scale=2.5, seed=1)
    model = estep.fit_noise_model(logits, annotations, max_iterations=500, tolerance=1e-10)
    assert model.temperature == pytest.approx(2.5, rel=0.1)
    np.testing.assert_allclose(model.transition, true_transition, atol=0.03)


def test_marginal_likelihood_never_decreases_across_fitting_steps():
    true_transition = np.array([[0.85, 0.1, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    rng = np.random.default_rng(3)
    n = 30_000
    logits = rng.normal(0, 2.0, (3, n)) * 1.7
    true = np.array([rng.choice(3, p=p) for p in estep.softmax(logits / 1.7).T])
    annotations = np.array([rng.choice(3, p=true_transition[t]) for t in true])
    model = estep.fit_noise_model(logits, annotations, max_iterations=40, tolerance=0.0)
    assert len(model.trace) > 10
    assert np.all(np.diff(model.trace) >= -1e-12)
    assert model.trace[-1] > model.trace[0]
    assert model.log_likelihood == model.trace[-1]


def test_sampling_weights_restore_class_counts_and_cap_memory():
    rng = np.random.default_rng(0)
    annotations = np.zeros((20, 20, 20), dtype=np.int16)
    annotations[:5] = 1
    annotations[0, 0, :3] = 2
    annotations[19] = 3  # ignore label: never sampled
    logits = rng.normal(size=(3, 20, 20, 20))
    sampled_logits, sampled_annotations, weights = estep.sample_voxels(logits, annotations, max_voxels_per_class=100,
                                                                       rng=rng)
    for label, count in ((0, 14 * 400), (1, 5 * 400 - 3), (2, 3)):
        assert weights[sampled_annotations == label].sum() == pytest.approx(count)
        assert np.count_nonzero(sampled_annotations == label) == min(count, 100)
    assert sampled_logits.shape == (3, 203)
    flat = logits.reshape(3, -1)
    first = np.flatnonzero(annotations.reshape(-1) == 2)[0]
    np.testing.assert_allclose(sampled_logits[:, sampled_annotations == 2][:, 0], flat[:, first], rtol=1e-6)


def test_refine_labels_changes_keeps_and_ignores_by_thresholds():
    # posteriors for 5 voxels over 3 classes; annotations; ignore label 3
    q = np.array([
        [0.95, 0.05, 0.60, 0.30, 0.10],
        [0.03, 0.90, 0.30, 0.40, 0.10],
        [0.02, 0.05, 0.10, 0.30, 0.80],
    ])
    annotations = np.array([1, 1, 0, 0, 3])
    refined = estep.refine_labels(q, annotations, thresholds=RefinementThresholds(0.9, 0.5), ignore_label=3)
    # voxel0: argmax 0 at 0.95 >= 0.9 -> changed to 0; voxel1: keeps 1 (0.9); voxel2: q[a]=0.6 -> kept;
    # voxel3: argmax 1 at 0.4 < 0.9 and q[a]=0.3 < 0.5 -> ignored; voxel4: unannotated -> untouched
    np.testing.assert_array_equal(refined, [0, 1, 0, 3, 3])


def test_refine_labels_never_touches_voxels_outside_the_mask():
    q = np.array([[0.0, 0.0], [1.0, 1.0]])
    annotations = np.array([-1, 0], dtype=np.int8)
    refined = estep.refine_labels(q, annotations, thresholds=RefinementThresholds(), ignore_label=2)
    np.testing.assert_array_equal(refined, [-1, 1])
    assert refined.dtype == np.int8


def test_refine_labels_rejects_ignore_label_inside_class_range():
    with pytest.raises(ValueError, match="collides"):
        estep.refine_labels(np.ones((3, 2)) / 3, np.array([0, 1]), thresholds=RefinementThresholds(), ignore_label=2)


def test_component_changes_counts_added_and_removed_blobs():
    original = np.zeros((1, 10, 10), dtype=np.int8)
    original[0, 1:3, 1:3] = 1
    original[0, 6:8, 6:8] = 1
    refined = original.copy()
    refined[0, 6:8, 6:8] = 0  # blob removed
    refined[0, 1:3, 6:8] = 1  # blob added
    refined[0, 4, 4] = 2  # class-2 blob added
    assert estep.component_changes(original, refined, foreground_classes=[1, 2]) == (2, 1)


def test_score_case_counts_and_dice():
    annotations = np.array([[0, 1, 1, 1, 2, 0]])
    refined = np.array([[0, 1, 1, 0, 3, 0]])  # one change 1->0, one voxel ignored (3)
    prediction = np.array([[0, 1, 1, 0, 0, 0]])
    q = np.zeros((3, 1, 6))
    q[annotations[0], 0, np.arange(6)] = 1.0
    q[:, 0, 3] = [0.95, 0.05, 0.0]
    q[:, 0, 4] = [0.5, 0.0, 0.5]
    scores = estep.score_case(annotations, refined, q, prediction, ignore_label=3)
    assert scores["voxels_annotated"] == 6
    assert scores["voxels_changed"] == 1
    assert scores["voxels_ignored"] == 1
    assert scores["dice_1"] == pytest.approx(2 * 2 / (3 + 2))
    assert scores["dice_2"] == pytest.approx(0.0)
    assert scores["expected_errors"] == pytest.approx(0.95 + 0.5)
    assert scores["review_score"] == pytest.approx((0.95 + 0.5) / 4)  # fg extent: voxels 1..4
    assert scores["mean_entropy"] == pytest.approx((-0.95 * np.log(0.95) - 0.05 * np.log(0.05) + np.log(2)) / 6)


def test_rank_cases_orders_by_review_score_then_case():
    ranked = estep.rank_cases({"b": {"review_score": 0.1}, "a": {"review_score": 0.1}, "c": {"review_score": 0.5}})
    assert [(r["rank"], r["case"]) for r in ranked] == [(1, "c"), (2, "a"), (3, "b")]


def test_temperature_search_never_returns_a_worse_value():
    logits, annotations, _ = _synthetic_annotator(np.array([[0.9, 0.1], [0.1, 0.9]]), n=5000)
    transition = np.array([[0.9, 0.1], [0.1, 0.9]])
    best = estep.fit_temperature(logits, annotations, transition)
    at_best = estep.mean_log_likelihood(logits, annotations, transition, best)
    assert at_best >= estep.mean_log_likelihood(logits, annotations, transition, 1.0)
    assert estep.fit_temperature(logits, annotations, transition, current=best) == pytest.approx(best, rel=1e-3)


def test_fitting_inputs_are_checked():
    with pytest.raises(ValueError, match="annotated"):
        estep.fit_noise_model(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="expected logits"):
        estep.fit_noise_model(np.zeros((2, 3)), np.array([0, 1]))


def test_case_samples_do_not_depend_on_processing_order():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 6, 6))
    annotations = rng.integers(0, 3, size=(6, 6, 6))
    first = estep.sample_case(logits, annotations, max_voxels_per_class=10, seed=estep.case_seed(0, 1, "case_a"))
    estep.sample_case(logits, annotations, max_voxels_per_class=10, seed=estep.case_seed(0, 1, "case_b"))
    again = estep.sample_case(logits, annotations, max_voxels_per_class=10, seed=estep.case_seed(0, 1, "case_a"))
    np.testing.assert_array_equal(first.logits, again.logits)
    assert estep.case_seed(0, 1, "case_a") != estep.case_seed(0, 2, "case_a")
    assert estep.voxels_per_class(1000, num_cases=10, num_classes=3) == 33


def test_fit_round_refines_only_when_the_network_agrees_with_the_annotation():
    annotations = np.zeros((4, 4, 4), dtype=np.int64)
    annotations[1:3, 1:3, 1:3] = 1
    good = np.stack([np.where(annotations == 0, 4.0, -4.0), np.where(annotations == 1, 4.0, -4.0)])
    bad = np.stack([np.full((4, 4, 4), 4.0), np.full((4, 4, 4), -4.0)])  # predicts background everywhere
    for logits, expected in ((good, True), (bad, False)):
        sample = estep.sample_case(logits, annotations, max_voxels_per_class=100, seed=0)
        fit = estep.fit_round([sample], calibrate_temperature=False, max_iterations=5, min_model_dice=0.5)
        assert fit.refine is expected
        assert fit.model_dice == pytest.approx(1.0 if expected else 0.0)


def test_pseudo_label_keeps_confident_voxels_and_ignores_the_rest():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.2], [0.0, 0.0, 0.0]])
    model = NoiseModel(estep.default_transition(3), 1.0)
    labels = estep.pseudo_label(logits, model, thresholds=RefinementThresholds(0.9, 0.5), ignore_label=3,
                                outside=np.array([False, False, True]))
    np.testing.assert_array_equal(labels, [0, 1, -1])
    uncertain = estep.pseudo_label(np.zeros((3, 2)), model, thresholds=RefinementThresholds(), ignore_label=3)
    np.testing.assert_array_equal(uncertain, [3, 3])
    scores = estep.score_pseudo_label(logits, labels, model, ignore_label=3)
    assert scores["voxels_pseudo_labelled"] == 2 and scores["voxels_ignored"] == 0


def _case(seed=0):
    annotations = np.zeros((6, 6, 6), dtype=np.int64)
    annotations[1:4, 1:4, 1:4] = 1
    logits = np.stack([np.where(annotations == 0, 3.0, -3.0), np.where(annotations == 1, 3.0, -3.0)])
    logits += np.random.default_rng(seed).normal(0, 0.5, logits.shape)
    return logits, annotations


def test_a_degenerate_fit_is_refused_and_says_why():
    logits, annotations = _case()
    sample = estep.sample_case(logits, annotations, max_voxels_per_class=500, seed=0)
    thresholds = RefinementThresholds(0.9, 0.5)
    sensible = NoiseModel(np.array([[0.95, 0.05], [0.05, 0.95]]), 1.0)
    assert estep.degenerate_fit([sample], sensible, thresholds=thresholds) is None
    at_bound = NoiseModel(sensible.transition, estep.TEMPERATURE_BOUNDS[1])
    assert "at the bound" in estep.degenerate_fit([sample], at_bound, thresholds=thresholds)
    # a noise model that doubts the annotation more than the (flattened) network would ignore most voxels
    doubtful = NoiseModel(np.array([[0.3, 0.7], [0.7, 0.3]]), 10.0)
    reason = estep.degenerate_fit([sample], doubtful, thresholds=thresholds, max_ignored_share=0.25)
    assert reason is not None and "would become ignore" in reason
    assert estep.degenerate_fit([sample], doubtful, thresholds=thresholds, max_ignored_share=1.0) is None


def test_fit_round_keeps_the_labels_when_an_untrained_network_would_explain_them_away():
    _, annotations = _case()
    untrained = np.random.default_rng(0).normal(0, 2.0, (2, *annotations.shape))  # confident and unrelated
    sample = estep.sample_case(untrained, annotations, max_voxels_per_class=500, seed=0)
    fit = estep.fit_round([sample], calibrate_temperature=True, max_iterations=10, min_model_dice=0.0,
                          thresholds=RefinementThresholds(0.9, 0.5))
    assert fit.refine is False and "at the bound" in fit.refused
    logits, annotations = _case()
    trained = estep.sample_case(logits, annotations, max_voxels_per_class=500, seed=0)
    fit = estep.fit_round([trained], calibrate_temperature=True, max_iterations=10, min_model_dice=0.0,
                          thresholds=RefinementThresholds(0.9, 0.5))
    assert fit.refine is True and fit.refused is None


def test_the_posterior_does_not_underflow_where_float32_products_would():
    # class 0 is certain to the network; the annotation says 2, which T says class 0 never produces and classes 1-2
    # are ~1e-52 likely: every product p_k * T[k, 2] underflows in float32; the posterior must still favour 2
    logits = np.array([[120.0], [0.0], [0.0]])
    transition = np.array([[1.0, 0.0, 0.0], [0.0, 0.99, 0.01], [0.0, 0.01, 0.99]])
    q = estep.posterior(logits, np.array([2]), NoiseModel(transition, 1.0))
    assert np.isfinite(q).all() and q[:, 0].sum() == pytest.approx(1.0)
    assert q[2, 0] == pytest.approx(0.99, abs=1e-6)
    refined = estep.refine_labels(q, np.array([2]), thresholds=RefinementThresholds(0.9, 0.5), ignore_label=3)
    assert refined[0] == 2  # kept, not ignored
    # an annotated class that no true class produces (a T column of zeros) falls back to the network's prior
    impossible = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.5, 0.5, 0.0]])
    q = estep.posterior(np.array([[2.0], [0.0], [0.0]]), np.array([2]), NoiseModel(impossible, 1.0))
    np.testing.assert_allclose(q[:, 0], estep.softmax(np.array([[2.0], [0.0], [0.0]]))[:, 0], rtol=1e-5)


def test_the_stored_noise_model_keeps_full_precision():
    transition = np.array([[1 - 3e-10, 3e-10], [0.25, 0.75]])
    stored = NoiseModel(transition, 1.3).to_dict()
    assert stored["transition"][0][1] == 3e-10
    np.testing.assert_array_equal(np.asarray(stored["transition"]), transition)


def test_per_case_transitions_recover_planted_cases_and_shrink_toward_the_dataset():
    # two cases annotated by different annotators: one drops 30 % of the foreground, one is clean
    planted = {"under": np.array([[0.98, 0.02], [0.3, 0.7]]), "clean": np.array([[0.98, 0.02], [0.02, 0.98]])}
    cases = {name: _synthetic_annotator(t, n=100_000, seed=i) for i, (name, t) in enumerate(planted.items())}
    logits = np.concatenate([c[0] for c in cases.values()], axis=1)
    annotations = np.concatenate([c[1] for c in cases.values()])
    dataset = estep.fit_noise_model(logits, annotations, calibrate_temperature=False, max_iterations=300,
                                    tolerance=1e-10)
    assert 0.1 < dataset.transition[1, 0] < 0.22  # the dataset's model averages the two annotators
    for name, (case_logits, case_annotations, _) in cases.items():
        case = estep.fit_case_transition(case_logits, case_annotations, dataset, strength=100.0, max_iterations=300,
                                         tolerance=1e-12)
        np.testing.assert_allclose(case.transition, planted[name], atol=0.03)
        assert np.all(np.diff(case.trace) >= -1e-12)  # MAP-EM: the penalised objective never decreases
        assert case.temperature == dataset.temperature
        # a strong prior keeps the dataset's matrix; none gives the case's own maximum-likelihood fit
        strong = estep.fit_case_transition(case_logits, case_annotations, dataset, strength=1e9)
        np.testing.assert_allclose(strong.transition, dataset.transition, atol=1e-3)
        free = estep.fit_case_transition(case_logits, case_annotations, dataset, strength=0.0, max_iterations=300,
                                         tolerance=1e-12)
        own = estep.fit_noise_model(case_logits, case_annotations, initial=dataset, calibrate_temperature=False,
                                    max_iterations=300, tolerance=1e-12)
        np.testing.assert_allclose(free.transition, own.transition, atol=2e-3)
    with pytest.raises(ValueError, match="strength"):
        estep.fit_case_transition(logits, annotations, dataset, strength=-1.0)


def test_a_per_case_model_corrects_a_corrupted_case_that_the_dataset_model_only_ignores():
    rng = np.random.default_rng(7)
    shape = (20, 20, 20)
    truth = np.zeros(shape, np.int64)
    truth[5:15, 5:15, 5:15] = 1
    # a mostly right network: logit +-4, and 3 % of voxels wrong with less confidence (logit -+1.5)
    network_wrong = rng.random(shape) < 0.03
    network = np.where(truth == 1, 4.0, -4.0) * np.where(network_wrong, -1.5 / 4.0, 1.0)
    logits = np.stack([np.zeros(shape), network])
    eroded = truth.copy()
    eroded[5:15, 5:15, 5:8] = 0  # under-segmented: 30 % of the foreground annotated as background
    dataset = NoiseModel(np.array([[0.97, 0.03], [0.15, 0.85]]), 1.0)  # what a mixed dataset would fit
    outcome = {}
    for name, annotation in (("eroded", eroded), ("clean", truth)):
        for strength in (None, 100.0):
            refined, scores = estep.refine_case(logits, annotation, dataset, thresholds=RefinementThresholds(),
                                                ignore_label=2, case_prior_strength=strength, seed=0)
            changed = refined != annotation
            outcome[name, strength] = {"right": np.count_nonzero(changed & (refined == truth)),
                                       "wrong": np.count_nonzero(changed & (refined != truth) & (refined != 2)),
                                       "ignored": scores["voxels_ignored"],
                                       "flip_rate": scores.get("case_flip_rate")}
    mislabelled = np.count_nonzero(eroded != truth)
    # the dataset's T is too mild for this case: nothing corrected; the case's own T corrects nearly all of it
    assert outcome["eroded", None]["right"] == 0
    assert outcome["eroded", 100.0]["right"] >= 0.9 * mislabelled
    assert outcome["eroded", 100.0]["wrong"] == outcome["clean", 100.0]["wrong"] == 0
    # the clean case: its own T is cleaner than the dataset's, and nothing is changed or ignored
    assert outcome["clean", 100.0] | {"flip_rate": None} == {"right": 0, "wrong": 0, "ignored": 0, "flip_rate": None}
    assert outcome["eroded", 100.0]["flip_rate"] > 2 * outcome["clean", 100.0]["flip_rate"]


def test_change_precision_from_verified_cases():
    # verified cases: 10 false changes in 100,000 annotated voxels -> 1e-4 per voxel
    verified = [(4, 50_000), (6, 50_000)]
    # unverified: 200 changes in 1,000,000 voxels -> 100 expected false -> precision 0.5
    estimate = estep.change_precision(verified, [(150, 500_000), (50, 500_000)], seed=0)
    assert estimate.false_change_rate == pytest.approx(1e-4)
    assert estimate.precision == pytest.approx(0.5)
    assert estimate.lower_bound <= estimate.precision
    assert (estimate.verified_cases, estimate.changes) == (2, 200)
    # clean data: changes everywhere at the verified rate -> precision 0, the gate must stay closed
    clean = estep.change_precision(verified, [(100, 1_000_000)])
    assert clean.precision == 0.0 and clean.lower_bound == 0.0
    # corrupted data with changes concentrated where the noise is -> high precision
    noisy = estep.change_precision(verified, [(5_000, 500_000), (10, 500_000)])
    assert noisy.precision > 0.98 and noisy.lower_bound > 0.95
    # one clumpy verified case widens the interval: a lower bound well below the point estimate
    clumpy = estep.change_precision([(0, 50_000), (0, 50_000), (0, 50_000), (40, 50_000)], [(500, 1_000_000)])
    assert clumpy.precision == pytest.approx(0.6) and clumpy.lower_bound < 0.3
    nothing = estep.change_precision(verified, [(0, 1_000_000)])
    assert np.isnan(nothing.precision) and np.isnan(nothing.lower_bound)
    with pytest.raises(ValueError, match="verified"):
        estep.change_precision([], [(1, 10)])


def _eroded_cube(seed=3):
    """A cube the network sees clearly, and an annotation that misses a third of it: (truth, logits, eroded)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((12, 12, 12), np.int64)
    truth[3:9, 3:9, 3:9] = 1
    logits = np.stack([np.zeros(truth.shape), np.where(truth == 1, 4.0, -4.0) + rng.normal(0, 0.1, truth.shape)])
    eroded = truth.copy()
    eroded[3:9, 3:9, 3:5] = 0
    return truth, logits, eroded


def test_gate_round_keeps_the_fits_decision_without_verified_cases_and_asks_them_otherwise():
    truth, logits, eroded = _eroded_cube()
    arrays = {"clean_a": (logits, truth), "clean_b": (logits, truth), "eroded": (logits, eroded)}
    fit = estep.RoundFit(NoiseModel(np.array([[0.9, 0.1], [0.3, 0.7]]), 1.0), model_dice=0.4, refine=False)
    options = dict(thresholds=RefinementThresholds(), ignore_label=2, case_prior_strength=None,
                   min_change_precision=0.8, min_model_dice=0.5, seed=0, round_index=1)
    refine, gate = estep.gate_round(fit, list(arrays), [], arrays.__getitem__, **options)
    assert (refine, gate) == (False, {"kind": "model_dice", "model_dice": 0.4, "min_model_dice": 0.5,
                                      "changes_allowed": False})
    usable = estep.RoundFit(fit.model, model_dice=0.9, refine=True)
    # without verified cases a usable fit refines, but nothing establishes that changes are right: ignore only
    refine, gate = estep.gate_round(usable, list(arrays), [], arrays.__getitem__, **options)
    assert refine and not gate["changes_allowed"]
    assert estep.gate_round(usable, list(arrays), [], arrays.__getitem__, **options,
                            changes_without_verified_cases=True)[1]["changes_allowed"]
    # the verified clean cases change nothing: every change on the eroded case counts as right -> changes allowed
    refine, gate = estep.gate_round(usable, list(arrays), ["clean_a", "clean_b", "not_in_round"],
                                    arrays.__getitem__, **options)
    assert refine and gate["changes_allowed"]
    assert gate["kind"] == "precision" and gate["verified_cases"] == 2 and gate["lower_bound"] == 1.0
    # a verified case the refinement would change: the precision is not established, changes become ignore
    twins = {**arrays, "eroded_b": (logits, eroded)}
    refine, gate = estep.gate_round(usable, list(twins), ["eroded"], twins.__getitem__, **options)
    assert refine and not gate["changes_allowed"] and gate["lower_bound"] < 0.8
    # a degenerate fit stays refused whatever the verified cases say
    refused = estep.RoundFit(fit.model, model_dice=0.9, refine=False, refused="temperature at its bound")
    assert estep.gate_round(refused, list(arrays), ["clean_a"], arrays.__getitem__, **options)[0] is False


def test_without_allowed_changes_no_class_is_written_that_the_annotator_did_not():
    rng = np.random.default_rng(5)
    annotations = rng.integers(0, 3, (6, 6, 6))
    annotations[0, 0, 0] = -1
    posterior_probs = rng.dirichlet(np.full(3, 0.3), size=annotations.shape).transpose(3, 0, 1, 2)
    thresholds = RefinementThresholds(change_threshold=0.6, keep_threshold=0.5)
    corrected = estep.refine_labels(posterior_probs, annotations, thresholds=thresholds, ignore_label=3)
    cautious = estep.refine_labels(posterior_probs, annotations, thresholds=thresholds, ignore_label=3,
                                   allow_changes=False)
    changed = (corrected != annotations) & (corrected != 3)
    assert changed.any()
    assert np.all(cautious[changed] == 3)  # each change became ignore
    np.testing.assert_array_equal(cautious[~changed], corrected[~changed])
    assert np.all((cautious == annotations) | (cautious == 3))


# ------------------------------------------------------------------------------------ boundary-aware noise model
def test_boundary_bands_measure_the_distance_to_another_annotated_class_on_both_sides():
    annotations = np.zeros((7, 7), np.int64)
    annotations[2:5, 2:5] = 1
    annotations[6, 6] = 3  # ignore label: not annotated, not a boundary
    bands = estep.boundary_bands(annotations, num_classes=2, width=2.0)
    assert bands[6, 6] == -1
    assert bands[2, 2] == bands[1, 3] == bands[3, 1] == 0  # touching the boundary, inside and outside
    assert bands[3, 3] == 1 and bands[0, 3] == 1  # 2 voxels from it, inside and outside
    assert bands[0, 0] == 2  # sqrt(8) from the square
    assert set(np.unique(estep.boundary_bands(np.ones((3, 3), np.int64), num_classes=2, width=2.0))) == {2}
    with pytest.raises(ValueError, match="width"):
        estep.boundary_bands(annotations, num_classes=2, width=0.0)


def test_band_transitions_recover_planted_boundary_noise_that_one_matrix_averages_away():
    rng = np.random.default_rng(3)
    n = 300_000
    bands = rng.integers(0, estep.NUM_BANDS, n)
    planted = np.array([[[0.7, 0.3], [0.25, 0.75]],  # at the boundary: over- and under-segmentation
                        [[0.9, 0.1], [0.05, 0.95]],
                        [[0.99, 0.01], [0.01, 0.99]]])  # far from it: nearly clean
    score = rng.normal(0.0, 3.0, n)
    true = (rng.random(n) < 1.0 / (1.0 + np.exp(-score))).astype(np.int64)
    annotations = (rng.random(n) < planted[bands, true, 1]).astype(np.int64)
    logits = np.stack([np.zeros(n), score])
    single = estep.fit_noise_model(logits, annotations, calibrate_temperature=False, max_iterations=300,
                                   tolerance=1e-10)
    banded = estep.fit_band_transitions(logits, annotations, bands, single, strength=0.0, width=2.0)
    np.testing.assert_allclose(banded.band_transitions, planted, atol=0.03)
    assert banded.trace[1] >= banded.trace[0] == pytest.approx(single.log_likelihood)
    assert banded.log_likelihood > single.log_likelihood + 0.01
    assert banded.temperature == single.temperature and banded.band_width == 2.0
    # a strong prior keeps every band at the single matrix
    strong = estep.fit_band_transitions(logits, annotations, bands, single, strength=1e9, width=2.0)
    np.testing.assert_allclose(strong.band_transitions, np.repeat(single.transition[None], 3, 0), atol=1e-3)
    restored = NoiseModel.from_dict(banded.to_dict())
    np.testing.assert_array_equal(restored.band_transitions, banded.band_transitions)
    assert restored.band_width == 2.0 and restored.temperature == banded.temperature
    with pytest.raises(ValueError, match="bands"):
        estep.fit_band_transitions(logits, annotations, bands + 5, single, strength=0.0, width=2.0)


def test_the_posterior_reads_the_transition_of_the_voxels_band():
    annotations = np.zeros((9, 9), np.int64)
    annotations[2:7, 2:7] = 1
    logits = np.stack([np.zeros((9, 9)), np.full((9, 9), np.log(0.3 / 0.7))])  # the network: 30 % foreground
    bands = estep.boundary_bands(annotations, num_classes=2, width=2.0)
    over_at_boundary = np.array([[[0.5, 0.5], [0.02, 0.98]],  # band 0: background often annotated foreground
                                 [[0.98, 0.02], [0.02, 0.98]], [[0.98, 0.02], [0.02, 0.98]]])
    model = NoiseModel(np.array([[0.98, 0.02], [0.02, 0.98]]), 1.0, band_transitions=over_at_boundary,
                       band_width=2.0)
    q = estep.posterior(logits, annotations, model)
    expected_rim = 0.7 * 0.5 / (0.7 * 0.5 + 0.3 * 0.98)
    expected_core = 0.7 * 0.02 / (0.7 * 0.02 + 0.3 * 0.98)
    np.testing.assert_allclose(q[0][(annotations == 1) & (bands == 0)], expected_rim, rtol=1e-5)
    np.testing.assert_allclose(q[0][(annotations == 1) & (bands == 1)], expected_core, rtol=1e-5)
    np.testing.assert_allclose(q, estep.posterior(logits, annotations, model, bands=bands))


def _dilated_ball_cases(seed=0):
    """3D balls, a mostly right network, and annotations: half of the cases dilated by 2 voxels."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.indices((24, 24, 24)) - 11.5
    cases = {}
    for index in range(6):
        radius = 5.0 + rng.random() * 2
        truth = (np.sqrt((grid ** 2).sum(0)) <= radius).astype(np.int64)
        boundary_blur = ndimage.gaussian_filter(truth.astype(float), 1.0)  # the network is unsure at the boundary
        network = 8.0 * (boundary_blur - 0.5) + rng.normal(0.0, 0.5, truth.shape)
        logits = np.stack([np.zeros(truth.shape), network])
        annotation = truth.copy()
        if index % 2 == 0:
            annotation = ndimage.binary_dilation(truth, iterations=2).astype(np.int64)
        cases[f"case_{index}"] = (logits, annotation, truth)
    return cases


@pytest.mark.parametrize("boundary", [False, True])
def test_boundary_per_case_model_corrects_dilation_that_the_single_matrix_leaves(boundary):
    cases = _dilated_ball_cases()
    width = 2.0 if boundary else None
    samples = [estep.sample_case(logits, annotation, max_voxels_per_class=5000, seed=[0, 1, i], band_width=width)
               for i, (logits, annotation, _) in enumerate(cases.values())]
    fit = estep.fit_round(samples, calibrate_temperature=True, max_iterations=30, min_model_dice=0.0,
                          thresholds=RefinementThresholds(), band_width=width)
    assert np.all(np.diff(fit.model.trace) >= -1e-9)
    assert (fit.model.band_transitions is not None) == boundary
    right = wrong = mislabelled = 0
    for logits, annotation, truth in cases.values():
        refined, _ = estep.refine_case(logits, annotation, fit.model, thresholds=RefinementThresholds(),
                                       ignore_label=2, case_prior_strength=100.0, seed=0)
        changed = (refined != annotation) & (refined != 2)
        right += np.count_nonzero(changed & (refined == truth))
        wrong += np.count_nonzero(changed & (refined != truth))
        mislabelled += np.count_nonzero(annotation != truth)
    assert wrong == 0  # no false change, in dilated or clean cases
    if boundary:  # measured: 37 % corrected, 44 % more ignored
        assert right >= 0.3 * mislabelled
    else:  # one matrix: a 2-voxel dilation is a small share of all background; measured: nothing corrected
        assert right < 0.05 * mislabelled


def test_soft_label_maps_sample_the_posterior_only_where_asked():
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(3), size=(6, 6)).transpose(2, 0, 1)
    refined = rng.integers(0, 3, (6, 6))
    refined[0, 0] = -1
    where = np.zeros((6, 6), bool)
    where[2:5, 2:5] = True
    maps = estep.soft_label_maps(q, refined, sample_where=where, samples=400, seed=1)
    assert maps.shape == (400, 6, 6) and maps.dtype == np.int16
    assert np.all(maps[:, ~where] == refined[~where])
    frequencies = np.stack([(maps[:, where] == c).mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(frequencies, q[:, where], atol=0.08)  # the maps' average is the posterior
    np.testing.assert_array_equal(maps, estep.soft_label_maps(q, refined, sample_where=where, samples=400, seed=1))


def test_the_precision_gate_stays_closed_on_clean_labels_whatever_the_network_gets_wrong():
    rng = np.random.default_rng(4)
    arrays = {}
    for index in range(6):
        truth = np.zeros((12, 12, 12), np.int64)
        truth[3:9, 3:9, 3:9] = 1
        truth[1, 1, 1:3] = 1  # a small real structure the network misses, confidently
        network = np.where(truth == 1, 4.0, -4.0) + rng.normal(0, 0.3, truth.shape)
        network[1, 1, 1:3] = -8.0
        arrays[f"case_{index}"] = (np.stack([np.zeros(truth.shape), network]), truth)
    model = NoiseModel(np.array([[0.97, 0.03], [0.2, 0.8]]), 1.0)  # a fit that absorbed the network's misses
    usable = estep.RoundFit(model, model_dice=0.95, refine=True)
    options = dict(thresholds=RefinementThresholds(), ignore_label=2, case_prior_strength=None,
                   min_change_precision=0.8, min_model_dice=0.5, seed=0, round_index=1)
    refine, gate = estep.gate_round(usable, list(arrays), ["case_0", "case_1"], arrays.__getitem__, **options)
    assert gate["changes"] > 0  # the E-step would change real structures into background...
    assert refine and not gate["changes_allowed"]  # ...and the verified clean cases keep it from doing so


def test_a_change_the_second_opinion_does_not_confirm_becomes_ignore():
    annotations = np.array([0, 0, 1, 1, 1, 2])
    refined = np.array([1, 0, 0, 3, 1, 1])  # changes at 0, 2, 5; voxel 3 ignored; 1 and 4 kept
    second = np.array([[0.05, 0.9, 0.95, 0.2, 0.1, 0.5],  # confirms voxel 2's change to 0
                       [0.95, 0.05, 0.05, 0.6, 0.9, 0.45],  # confirms voxel 0's change to 1, not voxel 5's (0.45)
                       [0.0, 0.05, 0.0, 0.2, 0.0, 0.05]])
    agreed = estep.agree_on_changes(refined, annotations, second, thresholds=RefinementThresholds(),
                                    ignore_label=3)
    np.testing.assert_array_equal(agreed, [1, 0, 0, 3, 1, 3])
    truth, logits = np.zeros((10, 10, 10), np.int64), np.zeros((2, 10, 10, 10))
    truth[2:8, 2:8, 2:8] = 1
    logits[1] = np.where(truth == 1, 6.0, -6.0)
    annotation = truth.copy()
    annotation[2:8, 2:8, 2:4] = 0  # under-segmented
    model = NoiseModel(np.array([[0.95, 0.05], [0.3, 0.7]]), 1.0)
    alone, _ = estep.refine_case(logits, annotation, model, thresholds=RefinementThresholds(), ignore_label=2)
    confirmed, _ = estep.refine_case(logits, annotation, model, thresholds=RefinementThresholds(), ignore_label=2,
                                     second_opinion=logits)
    np.testing.assert_array_equal(alone, confirmed)  # the same opinion twice confirms every change
    doubted, _ = estep.refine_case(logits, annotation, model, thresholds=RefinementThresholds(), ignore_label=2,
                                   second_opinion=np.zeros_like(logits))  # a second model with no opinion
    assert np.all(doubted[alone != annotation] == 2) and np.any(alone != annotation)


def test_with_every_true_class_known_the_fit_of_T_is_the_count_of_true_annotated_pairs():
    true_transition = np.array([[0.85, 0.1, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    rng = np.random.default_rng(4)
    n = 20_000
    logits = rng.normal(0, 2.0, (3, n))
    true = np.array([rng.choice(3, p=p) for p in estep.softmax(logits).T])
    annotations = np.array([rng.choice(3, p=true_transition[t]) for t in true])
    weights = rng.uniform(0.5, 2.0, n)
    counts = np.zeros((3, 3))
    np.add.at(counts, (true, annotations), weights)
    model = estep.fit_noise_model(logits, annotations, weights=weights, calibrate_temperature=False, truths=true)
    np.testing.assert_allclose(model.transition, counts / counts.sum(axis=1, keepdims=True), atol=1e-12)
    # the complete-data temperature maximises the likelihood of the true classes alone: 1 for calibrated logits
    calibrated = estep.fit_noise_model(logits, annotations, weights=weights, truths=true)
    assert calibrated.temperature == pytest.approx(1.0, rel=0.05)


def test_a_few_reviewed_voxels_sharpen_T_and_the_combined_likelihood_never_decreases():
    # a network biased toward class 1: the marginal alone blames part of its bias on the annotator
    true_transition = np.array([[0.9, 0.1], [0.3, 0.7]])
    for seed in range(3):
        logits, annotations, true = _synthetic_annotator(true_transition, n=4_000, seed=seed)
        logits[1] += 1.5
        truths = np.where(np.arange(true.size) < 1_000, true, -1)  # a quarter of the voxels reviewed
        marginal = estep.fit_noise_model(logits, annotations, max_iterations=300, tolerance=1e-10)
        reviewed = estep.fit_noise_model(logits, annotations, max_iterations=300, tolerance=1e-10, truths=truths)
        assert np.all(np.diff(reviewed.trace) >= -1e-12) and reviewed.trace[-1] > reviewed.trace[0]
        error = [np.abs(m.transition - true_transition).max() for m in (marginal, reviewed)]
        assert error[1] < error[0] - 0.005
    # truths outside 0..C-1 (ignore, outside the image) are unknown, not an error
    same = estep.fit_noise_model(logits, annotations, max_iterations=300, tolerance=1e-10,
                                 truths=np.where(truths < 0, 5, truths))
    np.testing.assert_allclose(same.transition, reviewed.transition)


def test_a_case_sample_carries_the_reviewed_truth_of_its_voxels_into_the_round_fit():
    rng = np.random.default_rng(0)
    annotations = rng.integers(0, 2, (10, 10))
    truth = np.where(rng.random((10, 10)) < 0.2, 1 - annotations, annotations)
    truth[0, 0] = 2  # the ignore label: unknown
    logits = rng.normal(0, 1, (2, 10, 10))
    sample = estep.sample_case(logits, annotations, max_voxels_per_class=1000, seed=1, truth=truth)
    flat_truth = truth.reshape(-1)
    assert sample.truths is not None and sample.truths.shape == sample.annotations.shape
    assert np.count_nonzero(sample.truths == -1) == 1
    known = sample.truths[sample.truths >= 0]
    assert set(np.unique(sample.truths)) <= {-1, 0, 1} and known.sum() == np.sum(flat_truth[flat_truth < 2])
    plain = estep.sample_case(logits, annotations, max_voxels_per_class=1000, seed=1)
    fits = [estep.fit_round(s, calibrate_temperature=False, max_iterations=50, min_model_dice=0.0)
            for s in ([plain, plain], [plain, sample])]
    assert not np.allclose(fits[0].model.transition, fits[1].model.transition)


def test_a_change_on_a_reviewed_case_is_false_only_where_it_disagrees_with_the_reviewed_labels():
    annotations = np.array([0, 0, 1, 1, 0, -1])
    refined = np.array([1, 1, 0, 1, 2, 1])  # 2 = ignore: not a change; -1: outside the annotation
    truth = np.array([1, 0, 0, 1, 0, 1])
    assert estep.false_changes(annotations, refined, truth, ignore_label=2) == 1
    with pytest.raises(ValueError, match="shapes differ"):
        estep.false_changes(annotations, refined, truth[:3], ignore_label=2)


def test_a_reviewed_case_whose_corrections_the_refinement_repeats_opens_the_precision_gate():
    truth, logits, eroded = _eroded_cube()
    arrays = {"reviewed": (logits, eroded), "eroded_b": (logits, eroded)}
    usable = estep.RoundFit(NoiseModel(np.array([[0.9, 0.1], [0.3, 0.7]]), 1.0), model_dice=0.9, refine=True)
    options = dict(thresholds=RefinementThresholds(), ignore_label=2, case_prior_strength=None,
                   min_change_precision=0.8, min_model_dice=0.5, seed=0, round_index=1)
    # taken as annotated right, every change on it is false: closed
    _, gate = estep.gate_round(usable, list(arrays), ["reviewed"], arrays.__getitem__, **options)
    assert not gate["changes_allowed"]
    # its reviewed labels say the changes restore the truth: none of them is false, open
    _, gate = estep.gate_round(usable, list(arrays), ["reviewed"], arrays.__getitem__, **options,
                               truth_of={"reviewed": truth}.get)
    assert gate["changes_allowed"] and gate["false_change_rate"] == 0.0


def test_a_posterior_handed_over_gives_the_same_refinement_and_scores_as_one_computed_inside():
    truth, logits, eroded = _eroded_cube(seed=4)
    model = NoiseModel(np.array([[0.9, 0.1], [0.3, 0.7]]), 1.0)
    options = dict(thresholds=RefinementThresholds(), ignore_label=2, case_prior_strength=100.0, seed=[0, 1, 2])
    inside = estep.refine_case(logits, eroded, model, **options)
    posterior = estep.case_posterior(logits, eroded, model, case_prior_strength=100.0, seed=[0, 1, 2])
    handed = estep.refine_case(logits, eroded, model, **options, known_posterior=posterior)
    assert np.array_equal(inside[0], handed[0]) and inside[1] == handed[1]
    assert "case_flip_rate" in handed[1]
    with pytest.raises(ValueError, match="does not match"):
        estep.refine_case(logits, eroded, model, **options, known_posterior=(posterior[0][:, :4], None))
