"""Where nnU-Net centres its training patches once a dataset declares an ignore label, and the choice to keep
sampling as vanilla nnU-Net does.

Without an ignore label, nnU-Net's data loader draws a patch that is not forced to hold foreground as a uniformly
random box. With one (``nnUNetDataLoader.get_bbox``, its ``has_ignore`` branch) it centres that patch on a random
*annotated* voxel instead, which suits sparse annotations (scribbles) where most voxels are unlabelled. EM adds an
ignore label for its doubt about a few tenths of a percent of the voxels, so its trainings would sample differently
from vanilla nnU-Net for that reason alone (measured: ``scripts/measure_sampler_confound.py``).
``em.patch_sampling``: ``"nnunet"`` (nnU-Net's behaviour, the default until the measurement is established) or
``"uniform"`` (uniform boxes, as vanilla nnU-Net samples the same dataset without an ignore label; foreground
oversampling is unchanged).
"""

from __future__ import annotations

import contextlib

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
