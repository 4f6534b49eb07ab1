"""Self-supervised pretraining of the plans' network: masked-image reconstruction on the dataset's own images.

``nnUNetv2_train D CONFIG all -tr MaskedPretrainTrainer`` (or ``_cpu``, ``_tiny``) trains the plans' U-Net to
reconstruct the images: blocks of each patch (``block`` voxels per axis, a share ``mask_ratio`` of them) are set
to 0 (the normalised intensity mean) and the loss is the mean squared error on the hidden voxels only. No label
is read (the segmentations nnU-Net loads are ignored), so every preprocessed case counts. The output has one channel
per input channel and no deep supervision; ``build_network_architecture`` builds it so at inference too.

Uses: the encoder's bottleneck gives label-free case embeddings (``nnunetv2_em rank-unlabeled --embeddings ssl
--ssl-model FOLDER``), and the weights are a warm start for segmentation (``nnUNetv2_train ... -pretrained_weights
FOLDER/fold_all/checkpoint_final.pth``: every key but the output layers matches).
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunetv2_em.trainers.budgets import WrappedNetworkBudget, optimizer_step

MASK_RATIO = 0.6
BLOCK = 8


def block_mask(shape: tuple[int, ...], *, block: int, ratio: float, generator: torch.Generator | None = None,
               device=None) -> torch.Tensor:
    """``(B, 1, *spatial)`` bool: True where hidden. The spatial grid is cut into ``block``-sized cells (the last
    ones may be smaller) and each cell is hidden with probability ``ratio``; at least one cell per sample."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    batch, spatial = shape[0], shape[2:]
    cells = [int(np.ceil(s / block)) for s in spatial]
    hidden = torch.rand((batch, 1, *cells), generator=generator, device=device) < ratio
    flat = hidden.view(batch, -1)
    empty = ~flat.any(dim=1)
    flat[empty, 0] = True
    for axis, size in enumerate(spatial):
        hidden = hidden.repeat_interleave(block, dim=2 + axis).narrow(2 + axis, 0, size)
    return hidden


def masked_mse(reconstruction: torch.Tensor, image: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden voxels of every channel. ``hidden (B, 1, *spatial)``."""
    weight = hidden.expand_as(image).float()
    return ((reconstruction.float() - image.float()) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


class MaskedPretrainTrainer(nnUNetTrainer):
    """Masked-image reconstruction with nnU-Net's data pipeline, network and optimiser."""

    mask_ratio = MASK_RATIO
    block = BLOCK

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self._validation_losses: list[float] = []

    @classmethod
    def build_base_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                           enable_deep_supervision):
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        # one output per image channel (the reconstruction), whatever the label set; no deep supervision
        return cls.build_base_network(plans_manager, configuration_manager, num_input_channels, num_input_channels,
                                      False)

    def _build_loss(self):
        return masked_mse

    def _step(self, batch: dict) -> torch.Tensor:
        data = batch["data"].to(self.device, non_blocking=True)
        hidden = block_mask(tuple(data.shape), block=self.block, ratio=self.mask_ratio, device=data.device)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            reconstruction = self.network(torch.where(hidden, torch.zeros_like(data), data))
            return masked_mse(reconstruction, data, hidden)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._step(batch)
        optimizer_step(self, loss)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        with torch.no_grad():
            return {"loss": self._step(batch).detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        self.logger.log("val_losses", loss, self.current_epoch)
        # nnU-Net's logger and checkpoint selection read a "Dice": the negative reconstruction error stands in
        self.logger.log("mean_fg_dice", -loss, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [-loss], self.current_epoch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("masked pretraining: no segmentation to validate")


class MaskedPretrainTrainer_cpu(WrappedNetworkBudget, MaskedPretrainTrainer):
    """``MaskedPretrainTrainer`` with the CPU budget of ``VanillaTrainer_cpu`` (20 x 40 iterations, narrow network)."""


class MaskedPretrainTrainer_tiny(MaskedPretrainTrainer_cpu):
    """Smoke-test budget: 2 epochs x 5 iterations."""

    epochs = 2
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2
