"""Where nnU-Net centres its training patches once a dataset declares an ignore label, and the choice to keep
sampling as vanilla nnU-Net does.

Without an ignore label, nnU-Net's data loader draws a patch that is not forced to hold foreground as a uniformly
random box. With one (``nnUNetDataLoader.get_bbox``, its ``has_ignore`` branch) it centres that patch on a random
*annotated* voxel instead, which suits sparse annotations (scribbles) where most voxels are unlabelled. EM adds an
ignore label for its doubt about a few tenths of a percent of the voxels, so its trainings would sample differently
from vanilla nnU-Net for that reason alone (measured: ``scripts/measure_sampler_confound.py``).
``em.patch_sampling``: ``"nnunet"`` (nnU-Net's behaviour; still the default: declaring an unused ignore label costs
vanilla nnU-Net -0.0067 test Dice on clean Hippocampus labels over 5 seeds, but EM on uniform patches is not yet
benchmarked, and a dataset whose own labels use the ignore label for sparse annotation wants nnU-Net's) or
``"uniform"`` (uniform boxes, as vanilla nnU-Net samples the same dataset without an ignore label; foreground
oversampling is unchanged).

Which *cases* a batch holds: nnU-Net draws them uniformly, so with many tag-only cases (``MultiTaskTrainer``) few
patches carry a mask. ``masked_share`` makes a fixed share of every batch come from cases with a mask
(``multitask.masked_share`` in the plans).
"""

from __future__ import annotations

import contextlib

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

PATCH_SAMPLING = ("nnunet", "uniform")


class UniformBoxDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader, drawing the patches that are not forced to hold foreground as uniform boxes even when
    the dataset declares an ignore label (the forced-foreground patches are nnU-Net's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.has_ignore = False  # get_bbox's only use of it: the branch that centres patches on annotated voxels


@contextlib.contextmanager
def patch_sampling(mode: str):
    """Within the block, the trainers' ``get_dataloaders`` build ``UniformBoxDataLoader`` (``mode="uniform"``) or
    nnU-Net's own loader (``"nnunet"``: nothing changes). nnU-Net builds its loaders inside ``get_dataloaders`` by the
    name its trainer module imported, so that name is what is swapped, and restored after."""
    if mode not in PATCH_SAMPLING:
        raise ValueError(f"patch sampling {mode!r}: one of {PATCH_SAMPLING}")
    if mode == "nnunet":
        yield
        return
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = UniformBoxDataLoader
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original


def balanced_draw(cases, masked, *, share: float, batch_size: int) -> list:
    """One batch's cases: ``round(share * batch_size)`` drawn from those in ``masked`` and the rest from the others,
    each uniformly with replacement (nnU-Net draws every case uniformly), in random order; nnU-Net's uniform draw
    when either group is empty. Uses ``np.random`` as nnU-Net's loaders do (seeded per worker)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"masked share {share}: must be in (0, 1]")
    with_mask = [case for case in cases if case in masked]
    without = [case for case in cases if case not in masked]
    if not with_mask or not without:
        return list(np.random.choice(cases, batch_size, replace=True))
    n_masked = min(batch_size, max(1, int(round(share * batch_size))))
    drawn = list(np.random.choice(with_mask, n_masked, replace=True))
    drawn += list(np.random.choice(without, batch_size - n_masked, replace=True))
    return [drawn[i] for i in np.random.permutation(batch_size)]


class _MaskBalanced:
    """Loader mixin: each batch's cases from ``balanced_draw``. The masked cases and the share are copied onto the
    instance when it is built, so they travel with it to nnU-Net's augmentation workers (pickled under spawn)."""

    masked_cases: frozenset = frozenset()
    masked_share_of_batch: float = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masked_cases = type(self).masked_cases
        self.masked_share_of_batch = type(self).masked_share_of_batch

    def get_indices(self):
        return balanced_draw(list(self.indices), self.masked_cases, share=self.masked_share_of_batch,
                             batch_size=self.batch_size)


class MaskBalancedDataLoader(_MaskBalanced, nnUNetDataLoader):
    """nnU-Net's data loader with a fixed share of cases with a mask in every batch."""


class MaskBalancedUniformBoxDataLoader(_MaskBalanced, UniformBoxDataLoader):
    """``UniformBoxDataLoader`` with a fixed share of cases with a mask in every batch."""


@contextlib.contextmanager
def masked_share(masked, share: float):
    """Within the block, the trainers' ``get_dataloaders`` build loaders whose batches hold a fixed share of cases
    with a mask (``balanced_draw``), on top of the loader in place (nnU-Net's, or ``patch_sampling``'s uniform one)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    balanced = {nnUNetDataLoader: MaskBalancedDataLoader, UniformBoxDataLoader: MaskBalancedUniformBoxDataLoader}
    if original not in balanced:
        raise RuntimeError(f"masked_share: nnU-Net's trainer builds {original.__name__}, expected nnU-Net's loader or "
                           f"UniformBoxDataLoader")
    loader_class = balanced[original]
    loader_class.masked_cases, loader_class.masked_share_of_batch = frozenset(masked), float(share)
    trainer_module.nnUNetDataLoader = loader_class
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original
        loader_class.masked_cases, loader_class.masked_share_of_batch = frozenset(), 1.0
