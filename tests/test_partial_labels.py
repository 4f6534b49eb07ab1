"""The marginal loss for partial labels by class: nnU-Net's loss where everything is annotated, the probability
of the set where a class is not."""

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_em import tags
from nnunetv2_em.estep.constraints import CaseConstraints
from nnunetv2_em.trainers.partial_labels import MarginalDiceCELoss, marginal_probabilities, unannotated_classes

IGNORE = 3
DICE = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}


def _codes(shape, constraints):
    return torch.from_numpy(tags.tag_codes(shape, constraints, num_classes=3).astype("int64"))


def _target(seg, constraints_per_sample):
    codes = torch.stack([_codes(seg.shape[2:], c) for c in constraints_per_sample])
    return torch.cat([seg, codes[:, None]], dim=1)


@pytest.mark.parametrize("with_ignore", [False, True])
def test_equals_nnunet_loss_when_every_class_is_annotated(with_ignore):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    seg = torch.randint(0, 3, (2, 1, 8, 8))
    if with_ignore:
        seg[0, 0, :2] = IGNORE
    ours = MarginalDiceCELoss(DICE, ignore_label=IGNORE, num_classes=3)(logits, _target(seg, [None, None]))
    theirs = DC_and_CE_loss(DICE, {}, weight_ce=1, weight_dice=1, ignore_label=IGNORE,
                            dice_class=MemoryEfficientSoftDiceLoss)(logits, seg)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    (gradient_ours,) = torch.autograd.grad(ours, logits)
    (gradient_theirs,) = torch.autograd.grad(theirs, logits)
    assert torch.allclose(gradient_ours, gradient_theirs, atol=1e-6)


def test_background_of_a_partial_case_is_background_or_the_unannotated_class():
    seg = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    seg[0, 0, 0, 0] = 1  # class 1 annotated, class 2 not
    target = _target(seg, [CaseConstraints(annotated_classes=frozenset({1}))])
    assert unannotated_classes(target[:, 1], 3).tolist() == [[False, False, True]]
    loss = MarginalDiceCELoss({**DICE, "batch_dice": False}, ignore_label=IGNORE, num_classes=3)
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 2.0
    swapped = logits.clone()
    swapped[:, [0, 2]] = logits[:, [2, 0]]  # background mass moved to class 2 at every background voxel...
    swapped[0, :, 0, 0] = logits[0, :, 0, 0]  # ...but not at the annotated class-1 voxel
    assert loss(swapped, target).item() == pytest.approx(loss(logits, target).item(), abs=1e-6)
    full = _target(seg, [None])  # the same mask annotating both classes: calling it class 2 is now penalised
    assert loss(swapped, full).item() > loss(logits, full).item() + 0.1


def test_marginal_probabilities_sum_to_one_and_keep_filled_in_voxels():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, 5)
    seg = torch.zeros(2, 1, 5, 5, dtype=torch.long)
    seg[0, 0, 0, 0] = 2  # an unannotated class filled in by an E-step: trained as that class
    unannotated = torch.tensor([[False, False, True], [False, False, False]])
    probabilities = marginal_probabilities(logits, seg, unannotated)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2, 5, 5), atol=1e-6)
    softmax = torch.softmax(logits, dim=1)
    assert torch.allclose(probabilities[1], softmax[1])  # nothing unannotated: the softmax
    assert torch.allclose(probabilities[0, :, 0, 0], softmax[0, :, 0, 0])
    assert torch.allclose(probabilities[0, 0, 1, 1], softmax[0, 0, 1, 1] + softmax[0, 2, 1, 1])
    assert probabilities[0, 2, 1, 1] == 0


def test_a_segmentation_without_codes_gets_nnunet_loss():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6, 6)
    seg = torch.randint(0, 3, (2, 1, 6, 6))
    ours = MarginalDiceCELoss(DICE, ignore_label=IGNORE, num_classes=3)(logits, seg)
    theirs = DC_and_CE_loss(DICE, {}, weight_ce=1, weight_dice=1, ignore_label=IGNORE,
                            dice_class=MemoryEfficientSoftDiceLoss)(logits, seg)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
