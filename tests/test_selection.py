"""EXAMINE scores (fast path against exact leave-one-out), their invariances, and the diversity baseline."""

import numpy as np
import pytest

from nnunetv2_em import selection


@pytest.mark.parametrize("shape, rank", [((60, 20), None), ((15, 40), None), ((50, 30), 3), ((40, 8), 1)])
def test_the_one_svd_path_equals_exact_leave_one_out(shape, rank):
    rng = np.random.default_rng(sum(shape))
    z = rng.normal(size=shape) + 0.5  # a dominant direction, as pooled features have
    if rank is not None:
        z = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))
    fast = selection.leave_one_out_top_singular_values(z)
    exact = selection.leave_one_out_top_singular_values(z, exact=True)
    np.testing.assert_allclose(fast, exact, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(selection.examine_scores(z), selection.examine_scores(z, exact=True), rtol=1e-9)


def test_duplicates_orthogonal_rows_and_a_single_row():
    z = np.array([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    # leaving out one of the duplicates: σ1 from 3√2 to 3; leaving out the orthogonal row: unchanged
    np.testing.assert_allclose(selection.leave_one_out_top_singular_values(z), [3.0, 3.0, 3 * np.sqrt(2)])
    assert selection.leave_one_out_top_singular_values(np.ones((1, 4)))[0] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        selection.examine_scores(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        selection.examine_scores(np.array([[np.nan, 1.0]]))


def test_scores_follow_their_rows_and_ignore_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 12)) + 1.0
    scores = selection.examine_scores(z)
    assert np.all(scores >= 1.0)
    order = rng.permutation(30)
    np.testing.assert_allclose(selection.examine_scores(z[order]), scores[order], rtol=1e-10)
    np.testing.assert_allclose(selection.examine_scores(7.5 * z), scores, rtol=1e-10)
    per_row = z * rng.uniform(0.1, 10, (30, 1))  # unit-length rows: each case's own scale is gone too
    np.testing.assert_allclose(selection.examine_scores(per_row), scores, rtol=1e-10)
    # without normalisation a larger row carries more of σ1
    raw = selection.examine_scores(np.vstack([z[:1] * 10, z[1:]]), normalize=False)
    assert np.argmax(raw) == 0


def test_k_center_greedy_takes_the_farthest_case_each_time():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    assert selection.k_center_greedy(points, 2, selected=[0], normalize=False) == [2, 3]
    assert selection.k_center_greedy(points, 3, selected=[0], normalize=False) == [2, 3, 1]
    with pytest.raises(ValueError, match="count"):
        selection.k_center_greedy(points, 4, selected=[0], normalize=False)


def test_mean_entropy():
    uniform = np.full((2, 3, 3), 0.5)
    certain = np.stack([np.ones((3, 3)), np.zeros((3, 3))])
    assert selection.mean_entropy(uniform) == pytest.approx(np.log(2))
    assert selection.mean_entropy(certain) == pytest.approx(0.0, abs=1e-12)
    mixed = np.concatenate([uniform, certain], axis=2)
    mask = np.zeros((3, 6), bool)
    mask[:, :3] = True
    assert selection.mean_entropy(mixed, mask=mask) == pytest.approx(np.log(2))


def test_case_features_keep_the_order_and_preprocess_once_per_distinct_network(monkeypatch):
    from nnunetv2_em import rank_unlabeled

    preprocessed = []
    monkeypatch.setattr(rank_unlabeled, "preprocess_case",
                        lambda network, files: preprocessed.append((network, files[0])) or np.full(2, len(files[0])))
    monkeypatch.setattr(rank_unlabeled, "case_embedding", lambda network, data: np.array([data[0], 1.0]))
    monkeypatch.setattr(rank_unlabeled, "case_prediction_stats",
                        lambda network, data: {"network": network, "size": int(data[0])})
    seg, ssl = object(), object()  # two networks, told apart by identity
    images = {"b": ["bb.nii"], "a": ["a.nii"]}
    embeddings, stats = rank_unlabeled.case_features(images, embedder=seg, predictor=seg)
    np.testing.assert_array_equal(embeddings, [[6, 1], [5, 1]])
    assert stats == [{"network": seg, "size": 6}, {"network": seg, "size": 5}]
    assert preprocessed == [(seg, "bb.nii"), (seg, "a.nii")]
    preprocessed.clear()
    embeddings, stats = rank_unlabeled.case_features(images, embedder=ssl, predictor=seg)
    assert preprocessed == [(ssl, "bb.nii"), (seg, "bb.nii"), (ssl, "a.nii"), (seg, "a.nii")]
    assert [s["network"] for s in stats] == [seg, seg]
    embeddings, stats = rank_unlabeled.case_features(images, embedder=ssl)
    assert embeddings.shape == (2, 2) and stats == [{}, {}]
    embeddings, stats = rank_unlabeled.case_features(images, predictor=seg)
    assert embeddings is None and len(stats) == 2
    with pytest.raises(ValueError, match="embedder"):
        rank_unlabeled.case_features(images)
