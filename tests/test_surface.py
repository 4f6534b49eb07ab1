"""Surface distances without MONAI (``nnunetv2_em.surface``) against MONAI's own functions, on shapes where they
are easy to get wrong: shifted and touching-the-border objects, 2D and 3D, thin structures, random blobs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_em.surface import surface_scores


def _monai(reference, labels, c, tolerance=1.0):
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    truth, guess = reference == c, labels == c
    one_hot = [torch.from_numpy(np.stack([~m, m])[None]) for m in (guess, truth)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (float(compute_hausdorff_distance(*one_hot, include_background=False, percentile=95)[0, 0]),
                float(compute_surface_dice(*one_hot, class_thresholds=[tolerance], include_background=False)[0, 0]))


def _blobs(shape, seed, classes=2):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2)
    labels = np.zeros(shape, np.int16)
    for c in range(1, classes + 1):
        labels[field > np.quantile(field, 1 - 0.15 * c)] = c
    return labels


def _cases():
    cube = np.zeros((20, 24, 22), np.int16)
    cube[5:12, 6:14, 4:10] = 1
    shifted = np.roll(cube, (2, -1, 3), axis=(0, 1, 2))
    border = np.zeros((16, 18), np.int16)
    border[:6, :7] = 1  # touches the image border
    grown = ndimage.binary_dilation(border == 1, iterations=2).astype(np.int16)
    thin = np.zeros((12, 30, 9), np.int16)
    thin[6, 3:27, 4] = 1
    thin_moved = np.roll(thin, 1, axis=2)
    return [("shifted cube", cube, shifted), ("border, dilated", border, grown), ("thin line", thin, thin_moved),
            ("blobs 3d", _blobs((18, 22, 20), 0), _blobs((18, 22, 20), 1)),
            ("blobs 2d", _blobs((40, 36), 2), _blobs((40, 36), 3))]


@pytest.mark.parametrize("name, reference, labels", _cases(), ids=[case[0] for case in _cases()])
@pytest.mark.parametrize("tolerance", [1.0, 2.0])
def test_surface_scores_equal_monai(name, reference, labels, tolerance):
    pytest.importorskip("monai")
    ours = surface_scores(reference, labels, classes=[1, 2], tolerance=tolerance)
    for c in (1, 2):
        if not (reference == c).any() or not (labels == c).any():
            continue
        hd95, nsd = _monai(reference, labels, c, tolerance)
        assert ours[f"hd95_{c}"] == pytest.approx(hd95, abs=1e-5), name
        assert ours[f"surface_dice_{c}"] == pytest.approx(nsd, abs=1e-6), name


def test_surface_scores_on_hand_made_shapes():
    square = np.zeros((10, 10), np.int16)
    square[2:6, 2:6] = 1
    same = surface_scores(square, square, classes=[1])
    assert same == {"hd95_1": 0.0, "surface_dice_1": 1.0}
    moved = np.roll(square, 3, axis=0)  # every edge pixel 3 rows away from the nearest other edge, or less
    scores = surface_scores(square, moved, classes=[1])
    assert scores["hd95_1"] == pytest.approx(3.0) and 0 < scores["surface_dice_1"] < 1
    assert surface_scores(square, np.zeros_like(square), classes=[1])["surface_dice_1"] == 0.0
    assert np.isnan(surface_scores(square, np.zeros_like(square), classes=[1])["hd95_1"])
    assert surface_scores(np.zeros_like(square), np.zeros_like(square), classes=[1]) == {"hd95_1": 0.0,
                                                                                        "surface_dice_1": 1.0}
    with pytest.raises(ValueError, match="differ in shape"):
        surface_scores(square, square[:5], classes=[1])


def test_the_product_imports_neither_the_benchmark_nor_monai():
    """``pip install nnunetv2-em`` has no MONAI (a benchmark extra): every product module imports without it, and
    ``review import``'s edit effort (surface distances included) computes without it."""
    import subprocess
    import sys

    code = """
import importlib, pathlib, sys
sys.modules["monai"] = None  # as if not installed: any import of it fails
import nnunetv2_em
root = pathlib.Path(nnunetv2_em.__file__).parent
for path in sorted(root.rglob("*.py")):
    name = ".".join(("nnunetv2_em", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
    if not name.startswith(("nnunetv2_em.benchmark", "nnunetv2_em.__main__")):
        importlib.import_module(name)
assert not any(name.startswith("nnunetv2_em.benchmark") for name in sys.modules), "the product imported the benchmark"
import numpy as np
from nnunetv2_em.review_effort import edit_effort
proposal = np.zeros((6, 8, 8), np.int16); proposal[2:4, 2:6, 2:6] = 1
reviewed = proposal.copy(); reviewed[2:4, 2:6, 6] = 1
effort = edit_effort(proposal, reviewed, classes=[1], ignore_label=2)
assert effort["voxels_edited"] == 8 and effort["hd95_1"] == 1.0, effort
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
