"""Training budgets shared by the EM trainers and their vanilla baselines, so a comparison changes one thing only.

nnU-Net's defaults (1000 epochs x 250 iterations, batch from the plans, 32-320 feature maps) need a GPU: on a 2-core
CPU one default training step of the Hippocampus network takes about 3 s. The small-machine budgets narrow the
network (feature maps divided by ``FEATURE_DIVISOR``), cap the batch and shorten training. The network change
goes through ``build_network_architecture``, which nnU-Net also calls at inference, so ``nnUNetv2_predict -tr X``
rebuilds the same network.

| trainer | epochs x iterations | use |
|---|---|---|
| ``EMTrainer_cpu`` / ``VanillaTrainer_cpu`` | 2 rounds x 10 = 20 x 40 | CPU runs that learn something (2d: ~9 min) |
| ``VanillaTrainer_cpu_40epochs`` | 40 x 40 | the benchmark's ``cpu-long`` profile |
| ``EMTrainer_tiny`` / ``VanillaTrainer_tiny`` | 2 rounds x 1 = 2 x 5 | smoke tests of the machinery only |
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_em.trainers.em_trainer import EMTrainer

FEATURE_DIVISOR = 2
MIN_FEATURES = 8
MAX_BATCH_VOXELS = 100_000  # 3d_fullres Hippocampus (40x56x40 patches): batch 2; 2d (56x40): batch 44


def narrow_network(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision):
    """The plans' architecture with feature maps divided by ``FEATURE_DIVISOR`` (at least ``MIN_FEATURES``)."""
    arch_kwargs = dict(configuration_manager.network_arch_init_kwargs)
    arch_kwargs["features_per_stage"] = [max(MIN_FEATURES, int(f) // FEATURE_DIVISOR)
                                         for f in arch_kwargs["features_per_stage"]]
    return get_network_from_plans(configuration_manager.network_arch_class_name, arch_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)


class _SmallMachineBudget:
    """Mixin: narrow network, batch capped at ``MAX_BATCH_VOXELS``, ``epochs`` x ``iterations_per_epoch``."""

    epochs = 20
    iterations_per_epoch = 40
    val_iterations_per_epoch = 4

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return narrow_network(configuration_manager, num_input_channels, num_output_channels,
                              enable_deep_supervision)

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        patch_voxels = int(np.prod(self.configuration_manager.patch_size))
        self.batch_size = min(self.batch_size, max(2, MAX_BATCH_VOXELS // patch_voxels))

    def _apply_budget(self):
        self.num_iterations_per_epoch = self.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.val_iterations_per_epoch


class FixedEpochsBudget(_SmallMachineBudget):
    """Mixin for trainers without EM rounds: the small-machine budget with ``epochs`` epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_budget()
        self.num_epochs = self.epochs


class WrappedNetwork(_SmallMachineBudget):
    """Mixin for trainers that build their network around the plans' one (classmethods ``build_base_network`` and
    ``build_network_architecture``): the small-machine budget with the narrow base network, wrapped as they wrap.
    The epochs are the trainer's (fixed: ``WrappedNetworkBudget``; EM rounds: the EM variants)."""

    @classmethod
    def build_base_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                           enable_deep_supervision):
        return narrow_network(configuration_manager, num_input_channels, num_output_channels,
                              enable_deep_supervision)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        # the parameter names matter: nnU-Net picks the call signature by looking for "plans_manager". Skip
        # _SmallMachineBudget's plain narrow network: the trainer's own builder wraps build_base_network
        return super(_SmallMachineBudget, cls).build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)


class WrappedNetworkBudget(WrappedNetwork, FixedEpochsBudget):
    """``WrappedNetwork`` with the fixed-epochs budget of ``VanillaTrainer_cpu``."""


def optimizer_step(trainer, loss: torch.Tensor) -> None:
    """nnU-Net's update after a training loss: backward (through the grad scaler on CUDA), gradient norm clipped at
    12, optimiser step (as ``nnUNetTrainer.train_step`` does it)."""
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.optimizer.step()


def deep_supervision_loss(trainer, loss):
    """``loss`` wrapped as nnU-Net wraps its own when the trainer uses deep supervision (weights 1/2^i over the
    scales, the lowest 0, normalised); unchanged otherwise."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    if not trainer.enable_deep_supervision:
        return loss
    weights = np.array([1 / (2 ** i) for i in range(len(trainer._get_deep_supervision_scales()))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def split_target(target):
    """A target whose first channel is the segmentation and whose next ones travel with it (soft-target maps, tag
    codes), ``(B, 1 + K, ...)`` or a list over scales -> (the segmentation part, channel 1 at full resolution)."""
    if isinstance(target, list):
        return [t[:, :1] for t in target], target[0][:, 1]
    return target[:, :1], target[:, 1]


class VanillaTrainer_cpu(FixedEpochsBudget, nnUNetTrainer):
    """Plain nnU-Net training with the CPU budget: the baseline for ``EMTrainer_cpu``."""


class EMTrainer_cpu(_SmallMachineBudget, EMTrainer):
    """EMTrainer with the CPU budget: 2 rounds x 10 epochs, the same 20 epochs as ``VanillaTrainer_cpu``."""

    em_overrides = {"rounds": 2, "epochs_per_round": 10, "mirroring": False}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_budget()


class VanillaTrainer_cpu_40epochs(VanillaTrainer_cpu):
    """The CPU budget run twice as long (40 x 40 iterations): models good enough to open the E-step's gate."""

    epochs = 40


class VanillaTrainer_tiny(VanillaTrainer_cpu):
    """Smoke-test budget: 2 epochs x 5 iterations. Checks the machinery; the model learns next to nothing."""

    epochs = 2
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2


class EMTrainer_tiny(EMTrainer_cpu):
    """Smoke-test budget: 2 rounds x 1 epoch x 5 iterations, refining even with the untrained network so that
    every step of the loop runs: no Dice gate, no limit on the ignored share, and the temperature left at 1 (fitted,
    it runs to its bound for an untrained network and the round is refused, depending on the draw). Not a useful
    model."""

    em_overrides = {"rounds": 2, "epochs_per_round": 1, "mirroring": False, "min_model_dice": 0.0,
                    "max_ignored_share": 1.0, "calibrate_temperature": False}
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2
