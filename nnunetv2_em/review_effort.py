"""How much a reviewer had to edit a proposed label: pure array functions (no file I/O)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunetv2_em import estep
from nnunetv2_em.surface import surface_scores


def _contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask that touch its outside (4-connectivity)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1),
                                          border_value=0)


def added_path_length(proposal: np.ndarray, reviewed: np.ndarray, *, classes) -> int:
    """Added Path Length (Vaassen et al., 2020) in pixels: the contour of each class in the reviewed label that
    the proposal's contour does not already trace, summed over the 2D slices along the first axis (a reviewer
    draws slice by slice) and over ``classes``.

    Args:
        proposal, reviewed: ``(*spatial)`` integer label maps of the same shape (2D or 3D).
    """
    proposal, reviewed = np.asarray(proposal), np.asarray(reviewed)
    if proposal.shape != reviewed.shape:
        raise ValueError(f"proposal {proposal.shape} and reviewed {reviewed.shape} differ in shape")
    if proposal.ndim == 2:
        proposal, reviewed = proposal[None], reviewed[None]
    added = 0
    for c in classes:
        for before, after in zip(proposal == c, reviewed == c, strict=True):
            if after.any():
                added += int(np.count_nonzero(_contour(after) & ~_contour(before)))
    return added


def edit_effort(proposal: np.ndarray, reviewed: np.ndarray, *, classes, ignore_label: int,
                surfaces: bool = True) -> dict:
    """What a review changed in a proposal: voxels edited (an ignored voxel the reviewer resolved counts), voxels
    the proposal left as ignore, Dice per class (ignore counts as no class), 95 % Hausdorff distance and surface
    Dice (1 voxel) per class (``surface.surface_scores``) and the Added Path Length.

    Args:
        proposal, reviewed: ``(*spatial)`` integer label maps of the same shape. classes: the foreground classes.
    """
    proposal, reviewed = np.asarray(proposal), np.asarray(reviewed)
    if proposal.shape != reviewed.shape:
        raise ValueError(f"proposal {proposal.shape} and reviewed {reviewed.shape} differ in shape")
    result = {"voxels_edited": int(np.count_nonzero(proposal != reviewed)),
              "voxels_ignored_in_proposal": int(np.count_nonzero(proposal == ignore_label)),
              **{f"dice_{c}": estep.dice(reviewed == c, proposal == c) for c in classes},
              "added_path_length": added_path_length(proposal, reviewed, classes=classes)}
    if surfaces:
        result.update(surface_scores(reviewed, np.where(proposal == ignore_label, 0, proposal), classes=classes))
    return result
