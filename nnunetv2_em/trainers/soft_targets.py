"""Soft targets for the M-step: ``-tr SoftTargetTrainer`` trains on a per-voxel target distribution.

The distribution is carried as **K sampled label maps** (drawn from the E-step's posterior) stored next to the
preprocessed segmentation as ``soft_targets/<case>.b2nd`` (int16, ``(K, *spatial)``; a subfolder, so that nnU-Net's
case listing never takes them for cases): a label map is what nnU-Net's whole
data pipeline already handles, so every augmentation (spatial transform with its one-hot interpolation, mirroring,
padding, deep-supervision downsampling) moves each map exactly as it moves a segmentation, and the target after
augmentation is the average of the maps' one-hot encodings. Compact too: K int16 maps instead of C float maps.

The loader puts the segmentation first and the K maps after it, ``(1 + K, *spatial)``. The loss
(``SoftDiceCELoss``) trains on the average one-hot of channels ``1..K``; nnU-Net's validation pseudo-Dice reads the
segmentation (channel 0). A case without a soft file repeats its segmentation, so for it (and for K identical
maps) the loss is exactly nnU-Net's ``DC_and_CE_loss`` (test). Voxels where any map holds the ignore label are
left out, as nnU-Net leaves out the ignore label.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_em.storage import soft_maps_path  # the one place that names the folder
from nnunetv2_em.trainers.budgets import FixedEpochsBudget, deep_supervision_loss, split_target

DEFAULT_SAMPLES = 4


def soft_targets_path(folder: str, case: str) -> str:
    """Where a case's K sampled maps live, next to its segmentation in the preprocessed data folder."""
    return soft_maps_path(folder, case)


def average_one_hot(maps: torch.Tensor, num_classes: int, ignore_label: int | None):
    """``maps`` ``(B, K, *spatial)`` label maps -> ``(target (B, C, *spatial) float, mask (B, 1, *spatial) or None)``:
    the average one-hot encoding, and where no map holds the ignore label."""
    mask = None
    if ignore_label is not None:
        mask = (maps != ignore_label).all(dim=1, keepdim=True)
        maps = torch.where(maps == ignore_label, torch.zeros_like(maps), maps)
    target = torch.zeros((maps.shape[0], num_classes, *maps.shape[2:]), device=maps.device, dtype=torch.float32)
    target.scatter_add_(1, maps.long(), torch.ones(maps.shape, device=maps.device, dtype=torch.float32))
    return target / maps.shape[1], mask


class SoftDiceCELoss(DC_and_CE_loss):
    """nnU-Net's Dice + cross-entropy with a target distribution per voxel.

    ``target`` ``(B, 1 + K, *spatial)``: the segmentation then K sampled maps (a single channel is a hard target).
    Cross-entropy ``-Σ_c y_c log softmax(x)_c`` and soft Dice against ``y`` = the maps' average one-hot encoding,
    both over the voxels no map ignores; with one-hot ``y`` both equal nnU-Net's terms.
    """

    def forward(self, net_output: torch.Tensor, target: torch.Tensor):
        maps = target if target.shape[1] == 1 else target[:, 1:]
        y, mask = average_one_hot(maps, net_output.shape[1], self.ignore_label)
        dc_loss = self.dc(net_output, y, loss_mask=mask) if self.weight_dice != 0 else 0
        ce_loss = 0
        if self.weight_ce != 0:
            per_voxel = -(y * torch.log_softmax(net_output.float(), dim=1)).sum(dim=1, keepdim=True)
            if mask is None:
                ce_loss = per_voxel.mean()
            elif mask.any():
                ce_loss = per_voxel[mask].mean()
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss


class SoftTargetDatasetBlosc2(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset whose segmentation carries K sampled maps after it: ``(1 + K, *spatial)``."""

    samples = DEFAULT_SAMPLES

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        seg = np.asarray(seg[:])
        path = soft_targets_path(self.source_folder, identifier)
        if os.path.isfile(path):
            import blosc2

            maps = np.asarray(blosc2.open(urlpath=path, mode="r")[:])
            if maps.shape[1:] != seg.shape[1:] or maps.shape[0] != self.samples:
                raise ValueError(f"{path}: shape {maps.shape}, expected ({self.samples}, *{seg.shape[1:]})")
            maps = np.where(seg < 0, seg, maps).astype(seg.dtype)  # outside the image stays outside
        else:
            maps = np.repeat(seg, self.samples, axis=0)
        return data, np.concatenate([seg, maps], axis=0), seg_prev, properties


class SoftTargetTrainer(nnUNetTrainer):
    """nnU-Net's trainer with the soft-target dataset and loss (everything else unchanged)."""

    soft_samples = DEFAULT_SAMPLES  # unless the plans' em.soft_targets says how many maps the E-step staged

    def initialize(self):
        super().initialize()
        samples = int(self.plans_manager.plans.get("em", {}).get("soft_targets") or self.soft_samples)

        class Dataset(SoftTargetDatasetBlosc2):
            pass

        Dataset.samples = samples
        self.dataset_class = Dataset

    def _build_loss(self):
        if self.label_manager.has_regions:
            raise RuntimeError("soft targets are for label maps, not region-based training")
        loss = SoftDiceCELoss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
        return deep_supervision_loss(self, loss)

    def validation_step(self, batch: dict) -> dict:
        segmentation_target, _ = split_target(batch["target"])  # the pseudo-Dice reads the segmentation
        return super().validation_step({**batch, "target": segmentation_target})


class SoftTargetTrainer_cpu(FixedEpochsBudget, SoftTargetTrainer):
    """``SoftTargetTrainer`` with the CPU budget of ``VanillaTrainer_cpu`` (20 x 40 iterations, narrow network)."""


class SoftTargetTrainer_tiny(SoftTargetTrainer_cpu):
    """Smoke-test budget: 2 epochs x 5 iterations."""

    epochs = 2
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2
