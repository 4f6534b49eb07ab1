"""Soft targets: the loss equals nnU-Net's on one-hot targets, and augmentation moves every sampled map exactly as
it moves a segmentation."""

import random

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_em.trainers.soft_targets import SoftDiceCELoss, average_one_hot


def _losses(ignore_label):
    options = dict(soft_dice_kwargs={"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                   ce_kwargs={}, weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                   dice_class=MemoryEfficientSoftDiceLoss)
    return DC_and_CE_loss(**{**options, "ce_kwargs": {}}), SoftDiceCELoss(**{**options, "ce_kwargs": {}})


@pytest.mark.parametrize("ignore_label", [None, 3])
def test_the_soft_loss_is_nnunets_loss_on_one_hot_targets(ignore_label):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 3, 6, 7, 5), generator=generator, requires_grad=True)
    target = torch.randint(0, 3 if ignore_label is None else 4, (2, 1, 6, 7, 5), generator=generator)
    nnunet, soft = _losses(ignore_label)
    expected = nnunet(logits, target.clone())
    for maps in (1, 4):  # a hard target, and K identical sampled maps after the segmentation
        stacked = target.repeat(1, 1 + maps, 1, 1, 1) if maps > 1 else target
        got = soft(logits, stacked)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    gradient_nnunet = torch.autograd.grad(nnunet(logits, target.clone()), logits)[0]
    gradient_soft = torch.autograd.grad(soft(logits, target.repeat(1, 5, 1, 1, 1)), logits)[0]
    torch.testing.assert_close(gradient_soft, gradient_nnunet, rtol=1e-4, atol=1e-7)


def test_the_soft_cross_entropy_is_the_average_over_the_sampled_maps():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn((1, 3, 5, 5, 5), generator=generator)
    maps = torch.randint(0, 3, (1, 4, 5, 5, 5), generator=generator)
    nnunet, soft = _losses(None)
    nnunet.weight_dice = soft.weight_dice = 0
    per_map = torch.stack([nnunet(logits, maps[:, k:k + 1]) for k in range(4)]).mean()
    torch.testing.assert_close(soft(logits, torch.cat([maps[:, :1], maps], dim=1)), per_map)
    y, mask = average_one_hot(maps, 3, None)
    torch.testing.assert_close(y.sum(dim=1), torch.ones((1, 5, 5, 5)))
    assert mask is None


def test_augmentation_moves_each_sampled_map_exactly_like_a_segmentation(monkeypatch):
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    resampled = []  # seeds whose spatial transform rotated or scaled (not just cropped)
    original = SpatialTransform.get_parameters

    def recording(self, **kwargs):
        parameters = original(self, **kwargs)
        resampled.append(parameters.get("grid") is not None)
        return parameters

    monkeypatch.setattr(SpatialTransform, "get_parameters", recording)
    transforms = nnUNetTrainer.get_training_transforms(
        (24, 24, 24), (-0.5, 0.5), [[1, 1, 1], [0.5, 0.5, 0.5]], (0, 1, 2), False, ignore_label=3)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, 30, 28, 26)).astype(np.float32))
    grid = np.indices((30, 28, 26))
    segmentation = np.zeros((1, 30, 28, 26), np.int16)
    segmentation[0][((grid - 14) ** 2).sum(0) < 60] = 1
    segmentation[0][((grid - np.array([10, 18, 12])[:, None, None, None]) ** 2).sum(0) < 20] = 2
    segmentation[0, :2] = -1
    maps = [np.roll(segmentation[0], shift, axis=1) for shift in (0, 2, -3)]
    stacked = torch.from_numpy(np.stack([segmentation[0], *maps]))

    def augment(seg, seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return transforms(image=image.clone(), segmentation=seg.clone())

    for seed in range(12):
        together = augment(stacked, seed)
        for channel in range(stacked.shape[0]):
            alone = augment(stacked[channel:channel + 1], seed)
            torch.testing.assert_close(together["image"], alone["image"])
            for scale_together, scale_alone in zip(together["segmentation"], alone["segmentation"], strict=True):
                torch.testing.assert_close(scale_together[channel:channel + 1], scale_alone)
    assert sum(resampled) >= 2  # the interpolating path was exercised, not only crops and mirrors


@pytest.mark.slow
def test_the_soft_target_trainer_trains_and_validates_through_the_stock_command(workspace):
    import os

    from conftest import TEST_DEVICE, demo_cases, make_raw_dataset

    from nnunetv2_em import storage
    from nnunetv2_em.trainers.soft_targets import DEFAULT_SAMPLES, soft_targets_path

    cases = demo_cases(8)
    make_raw_dataset(workspace.raw, 912, cases, name="Soft")
    workspace.run("nnunetv2_em", "plan", "-d", "912", "-c", "2d")
    folder = os.path.join(workspace.preprocessed, "Dataset912_Soft", "nnUNetPlans_2d")
    for case in cases[:5]:  # K sampled maps: the annotation with its boundary moved by -1..+2 voxels
        seg = storage.read_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"))
        maps = np.concatenate([np.where(seg >= 0, np.roll(np.maximum(seg, 0), shift, axis=2), seg)
                               for shift in range(-1, DEFAULT_SAMPLES - 1)])
        storage.write_seg_b2nd(soft_targets_path(folder, case), maps, (56, 40))
    from nnunetv2_em.trainers.soft_targets import SoftTargetDatasetBlosc2

    dataset = SoftTargetDatasetBlosc2(folder, cases)
    assert sorted(dataset.get_identifiers(folder)) == sorted(cases)  # the maps are not taken for cases
    for case in (cases[0], cases[-1]):
        _, seg, _, _ = dataset.load_case(case)
        original = storage.read_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"))
        assert seg.shape == (1 + DEFAULT_SAMPLES, *original.shape[1:])
        np.testing.assert_array_equal(seg[:1], original)
        if case == cases[0]:
            stored = storage.read_seg_b2nd(soft_targets_path(folder, case))
            np.testing.assert_array_equal(seg[1:], np.where(original < 0, original, stored))
            assert not np.array_equal(seg[1], seg[3])
        else:  # no maps: the segmentation repeated, i.e. nnU-Net's hard target
            assert all(np.array_equal(seg[k], original[0]) for k in range(1, 1 + DEFAULT_SAMPLES))
    workspace.run("nnUNetv2_train", "912", "2d", "0", "-tr", "SoftTargetTrainer_tiny", "-device", TEST_DEVICE)
    fold = os.path.join(workspace.results, "Dataset912_Soft", "SoftTargetTrainer_tiny__nnUNetPlans__2d", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    log = "".join(open(os.path.join(fold, name)).read() for name in os.listdir(fold) if name.startswith("training_log"))
    assert "train_loss" in log and "nan" not in log.split("train_loss")[-1].split("\n")[0]
