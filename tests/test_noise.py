"""Each noise model does what it says on small arrays, reproducibly, and records what it did."""

import numpy as np
import pytest

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
    assert len(corrupted) == round(noise.SETTINGS[name].fraction * 10)
    for case in labels:
        np.testing.assert_array_equal(noisy[case], second[0][case])
        if case in corrupted:
            assert records[case]["voxels_changed"] == np.count_nonzero(noisy[case] != labels[case])
        else:
            assert noisy[case] is labels[case]
