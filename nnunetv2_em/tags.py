"""What the weak-label file says about each voxel, coded so that nnU-Net's augmentation carries it like a label.

The multi-task trainer learns presence tags ("this patch contains the anterior hippocampus") from two sources: the
mask, where a case has one, and the tags of the weak-label file (``present`` / ``absent`` / ``location`` /
``annotated_classes``), where it has none. A patch is cut and deformed by nnU-Net's augmentation, so the tags must
travel with it: they are coded per voxel in one integer map stored as an extra segmentation channel, which every
spatial transform moves exactly as it moves the segmentation (label values are kept, never blended).

Per foreground class ``c`` (bit offset ``3 (c - 1)``), three bits:

* ``MAY``: class ``c`` may be at this voxel (not absent, inside its location);
* ``IS``: class ``c`` is at this voxel's region (present, inside its location; everywhere when no location);
* ``COVERS``: the case's mask annotates class ``c`` (so the mask's background there means "not ``c``").

A patch's tag for ``c`` (``patch_tags``) is positive when the mask shows ``c``, or, where the mask does not cover
``c``, when any voxel has ``IS``; negative
when no voxel has ``MAY``, or when the mask covers ``c``, shows no ``c`` and holds no ignored voxel; otherwise
unknown (left out of the loss). Voxels outside the image code 0, which never makes a tag positive or known. A tag
without a location speaks of the whole case: it tags patches rightly when they cover the case (3d patches of small
structures); for 2d give slice ranges (``location: {"slices": ...}``), which make it a slice-level tag.
"""

from __future__ import annotations

import numpy as np

from nnunetv2_em.estep.constraints import CaseConstraints

BITS_PER_CLASS = 3
MAY, IS, COVERS = 1, 2, 4
MAX_CLASSES = 5  # foreground classes one int16 channel holds (15 bits)


def _bit(flag: int, c: int) -> int:
    return flag << (BITS_PER_CLASS * (c - 1))


def check_num_classes(num_classes: int) -> None:
    """``num_classes`` counts background; raise ValueError when the code does not fit one int16 channel."""
    if not 2 <= num_classes <= MAX_CLASSES + 1:
        raise ValueError(f"tag codes hold 1..{MAX_CLASSES} foreground classes, got {num_classes - 1}")


def default_code(num_classes: int) -> int:
    """A voxel of a case without tags whose mask annotates every class: every class may be there."""
    check_num_classes(num_classes)
    return sum(_bit(MAY | COVERS, c) for c in range(1, num_classes))


def tag_codes(shape: tuple[int, ...], constraints: CaseConstraints | None, *, num_classes: int) -> np.ndarray:
    """The code map ``(*shape)`` int16 of one case from its constraints in the same array (``None``: no tags).

    ``present`` (or ``count >= 1`` or a volume range above 0) sets ``IS`` inside the class's region (everywhere
    without one); ``absent`` clears ``MAY``; a region clears ``MAY`` outside it; ``annotated_classes`` clears
    ``COVERS`` for the classes the mask does not annotate, a weak-only case for all of them.
    """
    check_num_classes(num_classes)
    codes = np.full(shape, default_code(num_classes), dtype=np.int16)
    if constraints is None:
        return codes
    constraints.check(num_classes, tuple(shape))
    unannotated = constraints.unannotated_classes(num_classes)
    for c in range(1, num_classes):
        inside = np.ones(shape, bool)
        if c in constraints.region:
            inside = np.zeros(shape, bool)
            inside[tuple(slice(start, stop) for start, stop in constraints.region[c])] = True
        may = inside & (c not in constraints.absent)
        present = c in constraints.present or constraints.count.get(c, 0) >= 1 or \
            constraints.volume.get(c, (0, 0))[0] > 0
        code = np.where(may, _bit(MAY, c), 0) | np.where(may & present, _bit(IS, c), 0)
        if c not in unannotated:
            code = code | _bit(COVERS, c)
        codes = (codes & ~np.int16(_bit(MAY | IS | COVERS, c))) | code.astype(np.int16)
    return codes


def patch_tags(segmentation: np.ndarray, codes: np.ndarray, *, num_classes: int,
               ignore_label: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Presence tags of patches: ``(targets (B, C - 1) float32, known (B, C - 1) bool)``.

    Args:
        segmentation: ``(B, *spatial)`` labels of the patches (after augmentation; outside voxels 0 or -1).
        codes: ``(B, *spatial)`` their ``tag_codes`` (after the same augmentation).
    The reference for the trainer's torch version (``trainers.multitask.patch_tags_torch``).
    """
    check_num_classes(num_classes)
    segmentation, codes = np.asarray(segmentation), np.asarray(codes).astype(np.int64)
    if segmentation.shape != codes.shape:
        raise ValueError(f"segmentation {segmentation.shape} and codes {codes.shape} differ")
    flat_seg = segmentation.reshape(segmentation.shape[0], -1)
    flat_codes = codes.reshape(codes.shape[0], -1)
    has_ignore = (flat_seg == ignore_label).any(axis=1) if ignore_label is not None else \
        np.zeros(flat_seg.shape[0], bool)
    targets = np.zeros((flat_seg.shape[0], num_classes - 1), np.float32)
    known = np.zeros(targets.shape, bool)
    for c in range(1, num_classes):
        shown = (flat_seg == c).any(axis=1)
        tagged = (flat_codes & _bit(IS, c)).astype(bool).any(axis=1)
        nowhere = ~(flat_codes & _bit(MAY, c)).astype(bool).any(axis=1)
        covered = (flat_codes & _bit(COVERS, c)).astype(bool).any(axis=1) & ~has_ignore
        positive = shown | (tagged & ~covered)  # where the mask covers the class, it decides
        targets[:, c - 1] = positive
        known[:, c - 1] = positive | nowhere | covered
    return targets, known
