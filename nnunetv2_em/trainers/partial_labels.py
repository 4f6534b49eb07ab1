"""Training on partial labels by class: the marginal loss (the M-step of a set-valued observation).

A case that annotates only some classes (``annotated_classes`` in ``em_weak_labels.json``, e.g. a dataset merged
with ``nnunetv2_em merge``) says at its background voxels "background *or* one of the classes I do not annotate".
nnU-Net trains that background as background and so learns to suppress the unannotated classes. ``-tr
MarginalTrainer`` (``_cpu``, ``_tiny``) trains the probability of the set instead (the marginal loss of Shi et al.,
MedIA 2021): at such a voxel the predicted probabilities of background and of the unannotated classes are summed
before nnU-Net's cross-entropy and Dice see them. Elsewhere, and on every case that annotates all classes, the loss
is exactly nnU-Net's ``DC_and_CE_loss`` (test). A voxel whose label is an unannotated class (filled in by an
E-step of ``nnunetv2_em run``) is trained as that class. Which classes a case annotates travels with the patch as
the tag codes of ``nnunetv2_em.tags`` (``COVERS``), like the multi-task trainer's.
"""

from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunetv2_em import tags
from nnunetv2_em.trainers.budgets import FixedEpochsBudget, deep_supervision_loss, split_target
from nnunetv2_em.trainers.multitask import tag_code_dataset


def unannotated_classes(codes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``codes (B, *spatial)`` -> ``(B, C)`` bool: class ``c`` is not annotated by sample ``b``'s mask (no voxel
    carries its ``COVERS`` bit; background and padding never count)."""
    flat = codes.reshape(codes.shape[0], -1).long()
    columns = [torch.zeros(flat.shape[0], dtype=torch.bool, device=codes.device)]
    for c in range(1, num_classes):
        covers = ((flat >> (tags.BITS_PER_CLASS * (c - 1))) & tags.COVERS).bool().any(dim=1)
        inside = (flat > 0).any(dim=1)  # a patch of padding only says nothing
        columns.append(inside & ~covers)
    return torch.stack(columns, dim=1)


def marginal_probabilities(logits: torch.Tensor, segmentation: torch.Tensor, unannotated: torch.Tensor
                           ) -> torch.Tensor:
    """Softmax of ``logits (B, C, *spatial)`` with, at voxels labelled background (``segmentation (B, 1, *spatial)``
    == 0), the probability of each unannotated class (``unannotated (B, C)``) moved into the background channel.
    Every voxel still sums to 1; with nothing unannotated it is the softmax."""
    probabilities = torch.softmax(logits.float(), dim=1)
    moved = unannotated[(...,) + (None,) * (logits.ndim - 2)].float() * (segmentation == 0).float()
    moved_mass = (probabilities * moved).sum(dim=1, keepdim=True)
    probabilities = probabilities * (1 - moved)
    return torch.cat([probabilities[:, :1] + moved_mass, probabilities[:, 1:]], dim=1)


class MarginalDiceCELoss(nn.Module):
    """nnU-Net's Dice + cross-entropy on the marginal probabilities. ``target (B, 2, *spatial)``: segmentation,
    tag codes (``(B, 1, *spatial)``: the segmentation alone, nnU-Net's loss). Ignored voxels are left out as nnU-Net
    leaves them out."""

    def __init__(self, soft_dice_kwargs: dict, *, ignore_label: int | None, num_classes: int,
                 weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.dc = MemoryEfficientSoftDiceLoss(apply_nonlin=None, **soft_dice_kwargs)
        self.ignore_label, self.num_classes = ignore_label, num_classes
        self.weight_ce, self.weight_dice = weight_ce, weight_dice

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        segmentation = target[:, :1]
        # without codes (nnU-Net's validation step gets the segmentation only) nothing is unannotated
        codes = target[:, 1] if target.shape[1] > 1 else torch.zeros_like(target[:, 0])
        mask = None if self.ignore_label is None else segmentation != self.ignore_label
        labels = segmentation if mask is None else torch.where(mask, segmentation, torch.zeros_like(segmentation))
        probabilities = marginal_probabilities(net_output, labels, unannotated_classes(codes, self.num_classes))
        dc_loss = self.dc(probabilities, labels, loss_mask=mask) if self.weight_dice else 0
        ce_loss = 0
        if self.weight_ce and (mask is None or mask.any()):
            chosen = probabilities.gather(1, labels.long()).clamp_min(1e-12).log()
            ce_loss = -(chosen.mean() if mask is None else chosen[mask].mean())
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss


class MarginalTrainer(nnUNetTrainer):
    """nnU-Net's trainer with the tag-code dataset and the marginal loss (everything else unchanged)."""

    def initialize(self):
        if self.label_manager.has_regions:
            raise RuntimeError("MarginalTrainer trains label maps, not regions")
        super().initialize()
        self.dataset_class, weak = tag_code_dataset(self)
        partial = sum(1 for c in weak.values() if c.annotated_classes is not None)
        self.print_to_log_file(f"marginal loss: {partial} partially annotated case(s)")

    def _build_loss(self):
        loss = MarginalDiceCELoss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                                   "do_bg": False, "ddp": self.is_ddp},
                                  ignore_label=self.label_manager.ignore_label,
                                  num_classes=len(self.label_manager.foreground_labels) + 1)
        return deep_supervision_loss(self, loss)

    def validation_step(self, batch: dict) -> dict:
        segmentation_target, _ = split_target(batch["target"])
        return super().validation_step({**batch, "target": segmentation_target})


class MarginalTrainer_cpu(FixedEpochsBudget, MarginalTrainer):
    """``MarginalTrainer`` with the CPU budget of ``VanillaTrainer_cpu`` (20 x 40 iterations, narrow network)."""


class MarginalTrainer_tiny(MarginalTrainer_cpu):
    """Smoke-test budget: 2 epochs x 5 iterations."""

    epochs = 2
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2
