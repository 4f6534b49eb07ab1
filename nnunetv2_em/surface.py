"""Surface distances between two label maps: 95 % Hausdorff distance and surface Dice, in voxels (numpy/scipy).

The definitions are MONAI's (``monai.metrics``, no spacing): a mask's edge is the mask minus its erosion (3^d cross,
outside the image counts as background); each edge voxel's distance is the Euclidean distance to the nearest edge
voxel of the other mask; HD95 is the larger of the two directed 95th percentiles, surface Dice the share of edge
voxels of both masks within ``tolerance`` of the other edge. ``tests/test_surface.py`` checks equality with MONAI.
Here so that the product (``review import``'s edit effort) needs no MONAI, which is only a benchmark extra.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SURFACE_TOLERANCE_VOXELS = 1.0


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union grown by one voxel: every edge voxel lies inside it, and
    the erosion treats outside the array as background either way, so nothing changes but the cost."""
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    box = tuple(slice(max(0, side.start - 1), side.stop + 1) for side in box)
    return a[box], b[box]


def surface_scores(reference: np.ndarray, labels: np.ndarray, *, classes,
                   tolerance: float = SURFACE_TOLERANCE_VOXELS) -> dict:
    """95 % Hausdorff distance and surface Dice at ``tolerance`` (voxels) per class.

    Both maps empty for a class: HD95 0 and surface Dice 1 (nothing to miss). One empty: HD95 NaN (undefined) and
    surface Dice 0.

    Args:
        reference, labels: ``(*spatial)`` integer maps of the same shape. classes: the classes to score.

    Returns:
        ``{"hd95_<c>": float, "surface_dice_<c>": float}`` for every ``c`` in ``classes``.
    """
    reference, labels = np.asarray(reference), np.asarray(labels)
    if reference.shape != labels.shape:
        raise ValueError(f"reference {reference.shape} and labels {labels.shape} differ in shape")
    result = {}
    for c in classes:
        truth, guess = reference == c, labels == c
        if not truth.any() and not guess.any():
            result[f"hd95_{c}"], result[f"surface_dice_{c}"] = 0.0, 1.0
            continue
        if not truth.any() or not guess.any():
            result[f"hd95_{c}"], result[f"surface_dice_{c}"] = float("nan"), 0.0
            continue
        truth, guess = _crop_to_union(truth, guess)
        truth_edges, guess_edges = _edges(truth), _edges(guess)
        guess_to_truth = ndimage.distance_transform_edt(~truth_edges)[guess_edges]
        truth_to_guess = ndimage.distance_transform_edt(~guess_edges)[truth_edges]
        result[f"hd95_{c}"] = float(max(np.percentile(guess_to_truth, 95), np.percentile(truth_to_guess, 95)))
        result[f"surface_dice_{c}"] = float((np.count_nonzero(guess_to_truth <= tolerance) +
                                             np.count_nonzero(truth_to_guess <= tolerance)) /
                                            (guess_to_truth.size + truth_to_guess.size))
    return result
