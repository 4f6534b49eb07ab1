"""Partial and weak labels as E-step constraints, on small arrays with known answers."""

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_em.estep import NoiseModel, RefinementThresholds
from nnunetv2_em.estep import constraints as con

THRESHOLDS = RefinementThresholds()
MODEL3 = NoiseModel(np.array([[0.96, 0.02, 0.02], [0.05, 0.95, 0.0], [0.05, 0.0, 0.95]]), 1.0)


def _blobs(shape=(16, 16, 16), centres=((4, 4, 4), (11, 11, 11), (4, 11, 8)), radius=2.5, classes=(1, 1, 2)):
    """A label map of balls and logits of a network that sees them (confident inside, unsure at the rim)."""
    grid = np.indices(shape)
    truth = np.zeros(shape, np.int64)
    for centre, c in zip(centres, classes, strict=True):
        distance = np.sqrt(sum((g - x) ** 2 for g, x in zip(grid, centre, strict=True)))
        truth[distance <= radius] = c
    logits = np.zeros((3, *shape))
    for c in (1, 2):
        logits[c] = 8.0 * (ndimage.gaussian_filter((truth == c).astype(float), 0.8) - 0.5)
    return truth, logits


def test_a_set_valued_observation_never_moves_a_voxel_outside_its_set():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (3, 8, 8, 8))
    annotations = rng.integers(0, 2, (8, 8, 8))  # this case annotates class 1 only: 0 means "0 or 2"
    partial = con.CaseConstraints(annotated_classes=frozenset({1}))
    q = con.observation_posterior(logits, annotations, MODEL3, partial)
    np.testing.assert_allclose(q.sum(axis=0), 1.0, rtol=1e-5)
    assert np.all(q[1][annotations == 0] == 0)  # class 1 was annotated: where it was not drawn, it is not there
    assert np.any(q[2][annotations == 0] > 0.9)  # the unannotated class is learned from the network
    for mode in con.MODES:
        labels, _ = con.constrained_labels(logits, annotations, MODEL3, partial, thresholds=THRESHOLDS,
                                           ignore_label=3, mode=mode, seed=1)
        assert set(np.unique(labels[annotations == 0])) <= {0, 2, 3}
    # the same background in a fully annotated case is a singleton observation: class 2 only through T
    full = con.observation_posterior(logits, annotations, MODEL3, con.CaseConstraints())
    assert np.all(full[2][annotations == 0] < q[2][annotations == 0] + 1e-6)


def test_a_network_sure_of_a_class_outside_the_set_does_not_underflow_the_posterior():
    """float32: with the network certain of class 1 (annotated, so not in S = {0, 2}), the priors of 0 and 2
    underflow; the posterior must still be restricted to S and follow the network's preference within it."""
    logits = np.zeros((3, 4))
    logits[1] = 200.0  # exp(-200) is 0 in float32
    logits[2] = [60.0, 60.0, -60.0, -60.0]  # within S: class 2 on the first two voxels, background on the others
    partial = con.CaseConstraints(annotated_classes=frozenset({1}))
    q = con.observation_posterior(logits, np.zeros(4, np.int64), MODEL3, partial)
    assert np.all(np.isfinite(q)) and np.allclose(q.sum(axis=0), 1.0)
    assert np.all(q[1] == 0)
    np.testing.assert_array_equal(q.argmax(axis=0), [2, 2, 0, 0])
    # and a region that excludes the only class left standing hands the voxel to the network's next choice
    region = con.CaseConstraints(annotated_classes=frozenset({1}), region={2: ((2, 4),)})
    q = con.observation_posterior(logits, np.zeros(4, np.int64), MODEL3, region)
    np.testing.assert_array_equal(q.argmax(axis=0), [0, 0, 0, 0])
    assert np.all(q[2][:2] == 0) and np.allclose(q.sum(axis=0), 1.0)
    # a degenerate T (every true class annotated as 1) leaves the set's voxels to the network, still inside the set
    degenerate = NoiseModel(np.array([[0.0, 1.0, 0.0]] * 3), 1.0)
    q = con.observation_posterior(logits, np.zeros(4, np.int64), degenerate, partial)
    assert np.all(q[1] == 0) and np.allclose(q.sum(axis=0), 1.0)
    np.testing.assert_array_equal(q.argmax(axis=0), [2, 2, 0, 0])


@pytest.mark.parametrize("mode", con.MODES)
def test_absent_and_region_remove_a_class_where_it_cannot_be(mode):
    truth, logits = _blobs()
    case = con.CaseConstraints(weak_only=True, absent=frozenset({2}), region={1: ((0, 8), (0, 16), (0, 16))})
    labels, _ = con.constrained_labels(logits, np.zeros(truth.shape, np.int64), MODEL3, case, thresholds=THRESHOLDS,
                                       ignore_label=3, mode=mode, seed=0)
    assert not np.any(labels == 2)
    assert not np.any(labels[8:] == 1) and np.any(labels[:8] == 1)


def test_count_keeps_the_most_probable_components_and_present_adds_a_weak_one():
    truth, logits = _blobs()
    second = np.indices(truth.shape)[0] > 8
    logits[1][second] = np.minimum(logits[1][second], 3.5)  # the second ball: confident, less so than the first
    weak_only = np.zeros(truth.shape, np.int64)
    unconstrained, _ = con.constrained_labels(logits, weak_only, MODEL3, con.CaseConstraints(weak_only=True),
                                              thresholds=THRESHOLDS, ignore_label=3)
    assert ndimage.label(unconstrained == 1)[1] == 2
    labels, report = con.constrained_labels(logits, weak_only, MODEL3, con.CaseConstraints(
        weak_only=True, count={1: 1}), thresholds=THRESHOLDS, ignore_label=3)
    components, found = ndimage.label(labels == 1)
    assert found == 1 and labels[4, 4, 4] == 1 and labels[11, 11, 11] != 1  # the more probable ball stays
    assert report["shaped_by"] == ["count 1: 1 of 2 components removed"]
    # class 2 is invisible to a network that never fires for it; "present" takes its most probable region
    logits[2] = -6.0
    logits[2][10:13, 2:5, 2:5] = -0.5
    labels, report = con.constrained_labels(logits, weak_only, MODEL3, con.CaseConstraints(
        weak_only=True, present=frozenset({2})), thresholds=THRESHOLDS, ignore_label=3)
    assert np.any(labels == 2) and np.all(labels[11, 3, 3] == 2)
    assert any(entry.startswith("present 2") for entry in report["shaped_by"])
    # more components asked for than exist: reported, not invented
    _, report = con.project_label_map(np.zeros((4, 4), np.int64), np.stack([np.ones((4, 4)), np.zeros((4, 4)),
                                                                             np.zeros((4, 4))]),
                                      con.CaseConstraints(count={1: 2}))
    assert any("count 1" in entry or "present 1" in entry for entry in report["unmet"])


def test_volume_moves_the_threshold_until_the_volume_is_in_range():
    truth, logits = _blobs()
    annotations = np.zeros(truth.shape, np.int64)
    q = con.observation_posterior(logits, annotations, MODEL3, con.CaseConstraints(weak_only=True))
    base = np.where(q.max(axis=0) >= 0.5, q.argmax(axis=0), 0)
    volume = int(np.count_nonzero(base == 1))
    for low, high in ((volume + 40, volume + 60), (volume - 60, volume - 40), (volume - 5, volume + 5)):
        labels, report = con.project_label_map(base, q, con.CaseConstraints(volume={1: (low, high)}))
        assert low <= np.count_nonzero(labels == 1) <= high
        grown_or_shrunk = labels != base
        if grown_or_shrunk.any():  # the voxels moved are the most (least) probable ones
            moved = q[1][grown_or_shrunk]
            kept = q[1][(labels == 1) & ~grown_or_shrunk]
            if low > volume:
                assert moved.min() >= q[1][(labels != 1) & (base != 1)].max() - 1e-6
            else:
                assert moved.max() <= kept.min() + 1e-6


def test_map_and_sample_agree_on_confident_voxels_and_sampling_ignores_doubt():
    truth, logits = _blobs()
    annotations = np.zeros(truth.shape, np.int64)
    case = con.CaseConstraints(weak_only=True)
    by_map, _ = con.constrained_labels(logits, annotations, MODEL3, case, thresholds=THRESHOLDS, ignore_label=3)
    sampled, report = con.constrained_labels(logits, annotations, MODEL3, case, thresholds=THRESHOLDS,
                                             ignore_label=3, mode="sample", samples=32, seed=0)
    confident = con.observation_posterior(logits, annotations, MODEL3, case).max(axis=0) >= 0.99
    np.testing.assert_array_equal(by_map[confident], sampled[confident])
    assert report["mode"] == "sample" and np.any(sampled == 3)
    with pytest.raises(ValueError, match="mode"):
        con.constrained_labels(logits, annotations, MODEL3, case, thresholds=THRESHOLDS, ignore_label=3,
                               mode="mean")


@pytest.mark.parametrize("case, message", [
    (con.CaseConstraints(present=frozenset({1}), absent=frozenset({1})), "both present and absent"),
    (con.CaseConstraints(absent=frozenset({5})), "not a foreground class"),
    (con.CaseConstraints(count={1: 0}, present=frozenset({1})), "contradicts"),
    (con.CaseConstraints(volume={1: (10, 5)}), "empty range"),
    (con.CaseConstraints(region={1: ((0, 9), (0, 4), (0, 4))}), "outside the image"),
    (con.CaseConstraints(region={1: ((0, 4), (0, 4))}), "axes"),
])
def test_impossible_constraints_are_rejected(case, message):
    with pytest.raises(ValueError, match=message):
        case.check(3, (8, 8, 8))


def test_the_fit_sees_only_singleton_observations_and_the_annotated_classes_dice():
    truth, logits = _blobs()
    partial_annotation = np.where(truth == 2, 0, truth)  # class 2 not drawn
    partial = con.CaseConstraints(annotated_classes=frozenset({1}))
    sample = con.fit_sample(logits, partial_annotation, partial, max_voxels_per_class=10_000, seed=0)
    assert set(np.unique(sample.annotations)) == {1}  # the background of a partial case is no annotation
    assert np.isnan(sample.dice[1]) and sample.dice[0] > 0.5
    full = con.fit_sample(logits, truth, None, max_voxels_per_class=10_000, seed=0)
    assert set(np.unique(full.annotations)) == {0, 1, 2} and not np.isnan(full.dice).any()


def test_the_labelled_case_step_is_refine_case_without_weak_labels():
    truth, logits = _blobs()
    options = dict(thresholds=THRESHOLDS, ignore_label=3, case_prior_strength=100.0, seed=0)
    from nnunetv2_em import estep

    expected = estep.refine_case(logits, truth, MODEL3, **options)
    refined, scores = con.refine_labelled_case(logits, truth, MODEL3, None, **options)
    np.testing.assert_array_equal(refined, expected[0])
    assert scores == expected[1]
    partial = con.CaseConstraints(annotated_classes=frozenset({1}))
    refined, scores = con.refine_labelled_case(logits, np.where(truth == 2, 0, truth), MODEL3, partial, **options)
    assert scores["weak_labels"]["kind"] == "partial" and np.any(refined == 2)  # the undrawn class is learned
