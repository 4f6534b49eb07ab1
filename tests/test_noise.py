"""Each noise model does what it says on small arrays, reproducibly, and records what it did."""

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_em.benchmark import noise


def _two_boxes():
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[2:8, 2:8, 2:6] = 1
    label[2:8, 2:8, 6:10] = 2
    return label


def test_erode_shrinks_each_class_by_k_voxels():
    label = _two_boxes()
    noisy, record = noise.erode(label, rng=np.random.default_rng(0), k=1)
    assert record == {"model": "erode", "k": 1}
    assert np.count_nonzero(noisy == 1) == 4 * 4 * 2  # 6x6x4 box loses one voxel on every side
    assert np.count_nonzero(noisy == 2) == 4 * 4 * 2
    assert set(np.unique(noisy[noisy != label])) == {0}


def test_dilate_grows_into_background_only():
    label = _two_boxes()
    noisy, _ = noise.dilate(label, rng=np.random.default_rng(0), k=1)
    changed = noisy != label
    assert np.all(label[changed] == 0)
    assert np.count_nonzero(noisy > 0) > np.count_nonzero(label > 0)
    np.testing.assert_array_equal(noisy[label > 0], label[label > 0])


def test_missing_structure_removes_one_whole_class():
    label = _two_boxes()
    noisy, record = noise.missing_structure(label, rng=np.random.default_rng(1))
    assert np.count_nonzero(noisy == record["class"]) == 0
    other = 3 - record["class"]
    np.testing.assert_array_equal(noisy == other, label == other)


def test_missing_component_removes_the_largest_component():
    label = np.zeros((10, 10, 10), dtype=np.uint8)
    label[0:2, 0:2, 0:2] = 1
    label[5:9, 5:9, 5:9] = 1
    noisy, record = noise.missing_component(label, rng=np.random.default_rng(0))
    assert record["voxels"] == 64
    assert np.count_nonzero(noisy) == 8


def test_spurious_blobs_paint_only_background():
    label = _two_boxes()
    noisy, record = noise.spurious_blobs(label, rng=np.random.default_rng(2), count=2, radius=1)
    changed = noisy != label
    assert np.all(label[changed] == 0)
    assert np.count_nonzero(changed) == sum(blob["voxels"] for blob in record["blobs"]) > 0


def test_class_swap_relabels_one_class_as_another():
    label = _two_boxes()
    noisy, record = noise.class_swap(label, rng=np.random.default_rng(0))
    assert {record["from"], record["to"]} == {1, 2}
    assert np.count_nonzero(noisy == record["from"]) == 0
    assert np.count_nonzero(noisy == record["to"]) == np.count_nonzero(label > 0)


def test_dropped_slices_blank_the_recorded_slices():
    label = _two_boxes()
    noisy, record = noise.dropped_slices(label, rng=np.random.default_rng(0), fraction=0.5, axis=0)
    assert len(record["slices"]) == 3  # half of the 6 slices with foreground
    for s in range(12):
        expected = np.zeros_like(label[s]) if s in record["slices"] else label[s]
        np.testing.assert_array_equal(noisy[s], expected)


@pytest.mark.parametrize("name", sorted(noise.SETTINGS))
def test_settings_are_reproducible_and_recorded(name):
    rng = np.random.default_rng(5)
    labels = {f"case_{i}": np.roll(_two_boxes(), int(rng.integers(0, 3)), axis=1) for i in range(10)}
    first = noise.corrupt_cases(labels, noise.SETTINGS[name], seed=3)
    second = noise.corrupt_cases(labels, noise.SETTINGS[name], seed=3)
    noisy, records, corrupted = first
    assert corrupted == second[2] and records == second[1]
    assert len(records) == round(noise.SETTINGS[name].fraction * 10)
    assert corrupted == sorted(case for case, record in records.items() if record["voxels_changed"])
    for case in labels:
        np.testing.assert_array_equal(noisy[case], second[0][case])
        if case in corrupted:
            assert records[case]["voxels_changed"] == np.count_nonzero(noisy[case] != labels[case])
        else:
            assert noisy[case] is labels[case]


def test_clean_control_changes_nothing():
    labels = {f"case_{i}": _two_boxes() for i in range(6)}
    noisy, records, corrupted = noise.corrupt_cases(labels, noise.SETTINGS["clean"], seed=0)
    assert corrupted == [] and records == {}
    assert all(noisy[case] is labels[case] for case in labels)


def _blob(shape=(9, 40, 40), radius=9.0):
    """Two touching discs per slice (classes 1, 2), ~250 voxels each per slice: big enough to erode and dilate."""
    grid = np.indices(shape[1:])
    label = np.zeros(shape, np.uint8)
    for s in range(1, shape[0] - 1):
        label[s][np.hypot(grid[0] - 20, grid[1] - 12) <= radius] = 1
        label[s][np.hypot(grid[0] - 20, grid[1] - 29) <= radius * 0.8] = 2
    return label


@pytest.mark.parametrize("mode", ["under", "over"])
def test_adele_moves_every_structure_one_way_slice_by_slice(mode):
    label = _blob()
    noisy, record = noise.adele(label, rng=np.random.default_rng(0), mode=mode)
    assert 2 <= record["iterations"] <= 4 and record["axis"] == 0
    for c in (1, 2):
        before, after = label == c, noisy == c
        if mode == "under":
            assert not np.any(after & ~before) and after.sum() < before.sum()
        else:
            assert not np.any(before & ~after) and after.sum() > before.sum()
            assert np.all(label[after & ~before] == 0)  # grows into background only
    # slices without foreground stay empty; each foreground slice is processed on its own
    assert not noisy[0].any() and not noisy[-1].any()
    # the size normalisation makes the move relative to the structure: a 4x smaller disc loses a similar share
    small = _blob(radius=4.5)
    shrunk, _ = noise.adele(small, rng=np.random.default_rng(0), mode="under")
    big_share = 1 - (noisy == 1).sum() / (label == 1).sum() if mode == "under" else None
    if big_share is not None:
        small_share = 1 - (shrunk == 1).sum() / (small == 1).sum()
        assert abs(small_share - big_share) < 0.2


def test_adele_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        noise.adele(_blob(), rng=np.random.default_rng(0), mode="sideways")


@pytest.mark.parametrize("p_dilate, grows", [(0.9, True), (0.1, False)])
def test_markov_boundary_drifts_in_the_direction_of_its_bias(p_dilate, grows):
    label = _blob()
    noisy, record = noise.markov_boundary(label, rng=np.random.default_rng(1), steps=20, p_dilate=p_dilate,
                                          p_flip=0.1)
    assert record == {"model": "markov_boundary", "steps": 20, "p_dilate": p_dilate, "p_flip": 0.1}
    for c in (1, 2):
        assert ((noisy == c).sum() > (label == c).sum()) == grows
    changed = noisy != label
    assert changed.any()
    assert np.all(label[changed & (noisy > 0)] == 0)  # grown voxels were background
    # a boundary walk (expected drift ~2 voxels): changes hug the clean boundary, none is far from it
    distance_to_boundary = np.where(label > 0, ndimage.distance_transform_edt(label > 0),
                                    ndimage.distance_transform_edt(label == 0))[changed]
    assert np.median(distance_to_boundary) <= 2 and distance_to_boundary.max() <= 8
    unbiased, _ = noise.markov_boundary(label, rng=np.random.default_rng(1), steps=0)
    np.testing.assert_array_equal(unbiased, label)


@pytest.mark.parametrize("kind", noise.ANNOTATORS)
def test_each_simulated_annotator_acts_on_one_structure(kind):
    label = _blob()
    noisy, record = noise.annotator(label, rng=np.random.default_rng(2), kind=kind)
    assert record["kind"] == kind and record["class"] in (1, 2)
    target, other = record["class"], 3 - record["class"]
    np.testing.assert_array_equal(noisy == other, label == other)  # the other structure is untouched
    before, after = label == target, noisy == target
    if kind == "good":
        np.testing.assert_array_equal(noisy, label)
    elif kind == "blank":
        assert not after.any()
    elif kind == "under":
        assert not np.any(after & ~before) and after.sum() < before.sum()
    elif kind == "over":
        assert not np.any(before & ~after) and after.sum() > before.sum()
    else:  # wrong: grown, then cut by one-voxel planes
        assert len(record["fractures"]) == 3
        for s in record["fractures"]:
            assert not after[s].any()
        kept = [s for s in range(label.shape[0]) if s not in record["fractures"]]
        assert after[kept].sum() > before[kept].sum()


def test_lazy_annotator_blanks_a_contiguous_run_of_one_structures_slices():
    label = _blob(shape=(20, 40, 40))
    noisy, record = noise.lazy_slices(label, rng=np.random.default_rng(3), fraction=0.4)
    c, slices = record["class"], record["slices"]
    assert len(slices) == round(0.4 * 18) and slices == list(range(slices[0], slices[0] + len(slices)))
    for s in range(20):
        if s in slices:
            assert not (noisy[s] == c).any()
            np.testing.assert_array_equal(noisy[s] == 3 - c, label[s] == 3 - c)
        else:
            np.testing.assert_array_equal(noisy[s], label[s])


def test_annotators_setting_records_good_cases_as_chosen_but_not_corrupted():
    labels = {f"case_{i}": _blob(shape=(5, 40, 40)) for i in range(15)}
    _, records, corrupted = noise.corrupt_cases(labels, noise.SETTINGS["annotators"], seed=4)
    kinds = {case: record["kind"] for case, record in records.items()}
    assert len(records) == 15 and "good" in kinds.values()
    assert corrupted == sorted(case for case, kind in kinds.items() if kind != "good")
