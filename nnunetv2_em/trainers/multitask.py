"""Multi-task nnU-Net: a presence-tag head on the encoder's bottleneck, trained from masks and from cheap tags.

``-tr MultiTaskTrainer`` (or ``_cpu``, ``_tiny``) trains the plans' network plus a small head (global average of
the bottleneck features, then an MLP) that predicts, per foreground class, whether the patch contains it. Targets
come from the mask where a case has one and from the weak-label file (``em_weak_labels.json``: ``present``,
``absent``, ``location``, ``annotated_classes``) where it has none; ``nnunetv2_em.tags`` codes them per voxel in an
extra segmentation channel so that nnU-Net's augmentation moves them with the patch. A **tag-only case** is a case
whose label file holds only the ignore label: nnU-Net's loss ignores every voxel of it, so it contributes the tag
term only. Loss: nnU-Net's segmentation loss + ``weight`` x binary cross-entropy over the known tags (plans block
``"multitask": {"weight": 1.0}``).

The head is added in ``build_network_architecture``, which nnU-Net also calls at inference, so
``nnUNetv2_predict -tr MultiTaskTrainer`` rebuilds the same network (its ``forward`` returns the segmentation
only); ``nnunetv2_em predict-tags`` writes the tag probabilities and Grad-CAM saliency maps
(``nnunetv2_em.tag_prediction``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from nnunetv2_em import nnunet_data, sampling, tags, weak_labels
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.trainers.budgets import (
    EMTrainer_cpu,
    EMTrainer_tiny,
    WrappedNetwork,
    WrappedNetworkBudget,
    optimizer_step,
    split_target,
)
from nnunetv2_em.trainers.em_trainer import EMTrainer

DEFAULT_WEIGHT = 1.0
HEAD_HIDDEN = 32


class MultiTaskNetwork(nn.Module):
    """An nnU-Net segmentation network (``encoder`` + ``decoder``) with a tag head on the bottleneck.

    ``forward(x)`` returns what the segmentation network returns, unless ``return_tags`` is set: then
    ``(segmentation output, tag logits (B, T))``. ``recorded``: when a list, every forward appends the tag
    probabilities ``(B, T)`` of its input (the prediction path reads them window by window).

    ``bridge`` (the MultiMix saliency bridge, gradient-free so that it also runs inside nnU-Net's inference mode):
    the head is linear, so a tag's logit is the spatial mean of its class activation map ``CAM_t = W_t . A + b_t``
    over the bottleneck features ``A``; the decoder receives ``A * (1 + sigmoid(max_t CAM_t))``, the bottleneck
    weighted up where the classifier sees a structure.
    """

    def __init__(self, segmentation: nn.Module, num_tags: int, hidden: int = HEAD_HIDDEN, *, bridge: bool = False):
        super().__init__()
        self.segmentation = segmentation
        channels = int(segmentation.encoder.output_channels[-1])
        self.bridge = bridge
        self.head = nn.Linear(channels, num_tags) if bridge else \
            nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(inplace=True), nn.Linear(hidden, num_tags))
        self.return_tags = False
        self.recorded: list | None = None

    def class_activation_maps(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """``(B, F, *spatial)`` -> ``(B, T, *spatial)`` (bridge networks: the linear head at every voxel)."""
        return torch.einsum("bf...,tf->bt...", bottleneck, self.head.weight) + \
            self.head.bias[(...,) + (None,) * (bottleneck.ndim - 2)]

    @property
    def encoder(self):
        return self.segmentation.encoder

    @property
    def decoder(self):
        return self.segmentation.decoder

    def tag_logits_from_bottleneck(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """``(B, F, *spatial)`` bottleneck features -> ``(B, T)`` tag logits."""
        return self.head(bottleneck.flatten(2).mean(dim=2))

    def forward(self, x):
        skips = self.encoder(x)
        logits = None
        if self.bridge:
            cams = self.class_activation_maps(skips[-1])
            logits = cams.flatten(2).mean(dim=2)  # = the head on the pooled features (the head is linear)
            gate = 1 + torch.sigmoid(cams.amax(dim=1, keepdim=True))
            skips = [*skips[:-1], skips[-1] * gate]
        output = self.decoder(skips)
        if not (self.return_tags or self.recorded is not None):
            return output
        if logits is None:
            logits = self.tag_logits_from_bottleneck(skips[-1])
        if self.recorded is not None:
            self.recorded.append(torch.sigmoid(logits).detach().float().cpu())
        return (output, logits) if self.return_tags else output


def grad_cam(network: MultiTaskNetwork, x: torch.Tensor, tag: int) -> torch.Tensor:
    """Grad-CAM of tag ``tag`` on the last encoder stage: ``x (B, C, *spatial)`` -> ``(B, *spatial)`` in [0, 1]
    (ReLU of the bottleneck features weighted by the mean gradient of the tag logit, upsampled to the input and
    divided by its maximum per sample; 0 where it is 0 everywhere)."""
    with torch.enable_grad():
        bottleneck = network.encoder(x)[-1]
        logits = network.tag_logits_from_bottleneck(bottleneck)
        (gradient,) = torch.autograd.grad(logits[:, tag].sum(), bottleneck)
    weights = gradient.flatten(2).mean(dim=2)[(...,) + (None,) * (bottleneck.ndim - 2)]
    cam = torch.relu((weights * bottleneck).sum(dim=1, keepdim=True)).detach()
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    cam = nn.functional.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1)[(...,) + (None,) * (x.ndim - 2)]
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


def patch_tags_torch(segmentation: torch.Tensor, codes: torch.Tensor, *, num_classes: int,
                     ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnunetv2_em.tags.patch_tags`` on tensors: ``(B, *spatial)`` each -> ``(targets (B, T), known (B, T))``."""
    flat_seg = segmentation.reshape(segmentation.shape[0], -1)
    flat_codes = codes.reshape(codes.shape[0], -1).long()
    has_ignore = (flat_seg == ignore_label).any(dim=1) if ignore_label is not None else \
        torch.zeros(flat_seg.shape[0], dtype=torch.bool, device=flat_seg.device)
    targets, known = [], []
    for c in range(1, num_classes):
        shift = tags.BITS_PER_CLASS * (c - 1)
        shown = (flat_seg == c).any(dim=1)
        tagged = ((flat_codes >> shift) & tags.IS).bool().any(dim=1)
        nowhere = ~((flat_codes >> shift) & tags.MAY).bool().any(dim=1)
        covered = ((flat_codes >> shift) & tags.COVERS).bool().any(dim=1) & ~has_ignore
        positive = shown | (tagged & ~covered)
        targets.append(positive)
        known.append(positive | nowhere | covered)
    return torch.stack(targets, dim=1).float(), torch.stack(known, dim=1)


def tag_loss(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known tags; 0 (with a graph) when none is known."""
    if not known.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])


class TagCodeDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset whose segmentation carries the case's tag codes after it: ``(2, *spatial)``."""

    weak: dict = {}  # case: CaseConstraints in raw voxels
    plans_manager = None
    num_classes = 2

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        seg = np.asarray(seg[:])
        constraints = self.weak.get(identifier)
        if constraints is not None:
            constraints = nnunet_data.constraints_to_preprocessed(constraints, properties, self.plans_manager,
                                                                  seg.shape[1:])
        codes = tags.tag_codes(seg.shape[1:], constraints, num_classes=self.num_classes)[None]
        codes = np.where(seg < 0, seg, codes).astype(seg.dtype)  # outside the image stays outside
        return data, np.concatenate([seg, codes], axis=0), seg_prev, properties


def tag_code_dataset(trainer: nnUNetTrainer) -> tuple[type, dict]:
    """A ``TagCodeDataset`` class for ``trainer``'s dataset (its weak labels read from ``nnUNet_raw``, checked) and
    the weak labels ``{case: CaseConstraints}``; call after ``nnUNetTrainer.initialize``."""
    raw_folder = join(os.environ.get("nnUNet_raw", ""), trainer.plans_manager.dataset_name)
    cases = nnUNetDatasetBlosc2.get_identifiers(trainer.preprocessed_dataset_folder)
    weak = (weak_labels.load_weak_labels(raw_folder, trainer.dataset_json, labelled=cases, images=cases)
            if os.environ.get("nnUNet_raw") and os.path.isfile(weak_labels.weak_labels_path(raw_folder)) else {})

    class Dataset(TagCodeDataset):
        pass

    Dataset.weak, Dataset.plans_manager = weak, trainer.plans_manager
    Dataset.num_classes = len(trainer.label_manager.foreground_labels) + 1
    return Dataset, weak


def masked_share_setting(settings: dict) -> float | None:
    """The plans' ``multitask.masked_share``: the share of every batch drawn from cases with a mask (None: nnU-Net's
    uniform draw over all cases)."""
    share = settings.get("masked_share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
        raise EMInputError(f"plans: multitask.masked_share = {share!r}: must be a number in (0, 1]. Fix: e.g. 0.5, "
                           f"or remove it for nnU-Net's uniform draw.")
    return None if share is None else float(share)


def cases_with_a_mask(folder: str, label_manager, weak: dict) -> list[str]:
    """The preprocessed cases in ``folder`` that carry a mask: some voxel annotated (nnU-Net's sampled locations of
    annotated voxels, kept when the dataset has an ignore label; a tag-only case's label is all ignore) and not
    weak-only in ``weak`` ({case: CaseConstraints}). Without an ignore label every case has a mask."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    cases = nnUNetDatasetBlosc2.get_identifiers(folder)
    masked = [case for case in cases if case not in weak or not weak[case].weak_only]
    if not label_manager.has_ignore_label:
        return masked
    annotated = tuple([-1] + list(label_manager.all_labels))
    return [case for case in masked
            if len(load_pickle(join(folder, f"{case}.pkl"))["class_locations"].get(annotated, ()))]


class MultiTaskTrainer(nnUNetTrainer):
    """nnU-Net's trainer with the tag head, the tag-code dataset and the joint loss (everything else unchanged)."""

    head_hidden = HEAD_HIDDEN
    bridge = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = plans.get("multitask", {})
        self.tag_weight = float(settings.get("weight", DEFAULT_WEIGHT))
        self.masked_share = masked_share_setting(settings)
        self._weak: dict = {}
        self._tag_losses: list[float] = []

    @classmethod
    def build_base_network(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision):
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        segmentation = cls.build_base_network(plans_manager, configuration_manager, num_input_channels,
                                                      num_output_channels, enable_deep_supervision)
        return MultiTaskNetwork(segmentation, num_output_channels - 1, cls.head_hidden, bridge=cls.bridge)

    def initialize(self):
        if self.label_manager.has_regions:
            raise RuntimeError("MultiTaskTrainer tags classes of label maps, not regions")
        tags.check_num_classes(len(self.label_manager.foreground_labels) + 1)
        super().initialize()
        self.dataset_class, self._weak = tag_code_dataset(self)
        self.print_to_log_file(f"multi-task: {len(self.label_manager.foreground_labels)} tag(s), weight "
                               f"{self.tag_weight}, {len(self._weak)} case(s) with weak labels, saliency bridge "
                               f"{self.bridge}, masked share of a batch {self.masked_share or 'as drawn'}")

    def get_dataloaders(self):
        if self.masked_share is None:
            return super().get_dataloaders()
        masked = cases_with_a_mask(self.preprocessed_dataset_folder, self.label_manager, self._weak)
        with sampling.masked_share(masked, float(self.masked_share)):
            return super().get_dataloaders()

    def _module(self) -> MultiTaskNetwork:
        module = self.network.module if self.is_ddp else self.network
        return getattr(module, "_orig_mod", module)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        segmentation_target, codes = split_target(target)
        full = segmentation_target[0] if isinstance(segmentation_target, list) else segmentation_target
        tag_targets, known = patch_tags_torch(full[:, 0], codes, num_classes=len(self.label_manager.foreground_labels)
                                              + 1, ignore_label=self.label_manager.ignore_label)
        self.optimizer.zero_grad(set_to_none=True)
        module = self._module()
        module.return_tags = True
        try:
            with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                output, logits = self.network(data)
                segmentation_loss = self.loss(output, segmentation_target)
                tags_loss = tag_loss(logits.float(), tag_targets, known)
                loss = segmentation_loss + self.tag_weight * tags_loss
        finally:
            module.return_tags = False
        optimizer_step(self, loss)
        self._tag_losses.append(float(tags_loss.detach().cpu()))
        return {"loss": loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self._tag_losses:
            self.print_to_log_file(f"tag loss {np.mean(self._tag_losses):.4f}")
        self._tag_losses = []

    def validation_step(self, batch: dict) -> dict:
        segmentation_target, _ = split_target(batch["target"])
        return super().validation_step({**batch, "target": segmentation_target})


class MultiTaskTrainer_cpu(WrappedNetworkBudget, MultiTaskTrainer):
    """``MultiTaskTrainer`` with the CPU budget of ``VanillaTrainer_cpu`` (20 x 40 iterations, narrow network)."""


class MultiTaskTrainer_tiny(MultiTaskTrainer_cpu):
    """Smoke-test budget: 2 epochs x 5 iterations."""

    epochs = 2
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2


class MultiTaskBridgeTrainer(MultiTaskTrainer):
    """``MultiTaskTrainer`` whose classifier's class activation maps weight the decoder's input (the bridge)."""

    bridge = True


class MultiTaskBridgeTrainer_cpu(MultiTaskTrainer_cpu):
    bridge = True


class MultiTaskBridgeTrainer_tiny(MultiTaskTrainer_tiny):
    bridge = True


class EMMultiTaskTrainer(EMTrainer, MultiTaskTrainer):
    """``EMTrainer``'s rounds with ``MultiTaskTrainer``'s tag head and joint loss: after each round the E-step
    refines the held-out cases under their weak labels (a tag-only case's ignored voxels get pseudo-labels where
    the tags allow them and the model is sure), and the next round trains the segmentation on those and the head
    on the tags. The E-step reads the segmentation output only."""


class EMMultiTaskTrainer_cpu(WrappedNetwork, EMMultiTaskTrainer):
    """``EMMultiTaskTrainer`` with ``EMTrainer_cpu``'s budget (2 rounds x 10 epochs x 40 iterations, narrow network)."""

    em_overrides = EMTrainer_cpu.em_overrides

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_budget()


class EMMultiTaskTrainer_tiny(EMMultiTaskTrainer_cpu):
    """Smoke-test budget of ``EMTrainer_tiny`` (2 rounds x 1 epoch x 5 iterations, every step of the loop runs)."""

    em_overrides = EMTrainer_tiny.em_overrides
    iterations_per_epoch = 5
    val_iterations_per_epoch = 2
