"""Tag codes, patch tags, the multi-task network, its loss and Grad-CAM (small arrays, no training)."""

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_em import tags
from nnunetv2_em.estep.constraints import CaseConstraints
from nnunetv2_em.trainers.multitask import MultiTaskNetwork, grad_cam, patch_tags_torch, tag_loss

IGNORE = 3


def _unet(dim: int, classes: int = 3) -> PlainConvUNet:
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (1, 1, 1), classes, (1, 1), False, norm,
                         {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def _patch_tags(seg, codes):
    return tags.patch_tags(seg, codes, num_classes=3, ignore_label=IGNORE)


def test_codes_of_a_case_without_tags_let_the_mask_decide():
    codes = tags.tag_codes((4, 5), None, num_classes=3)
    seg = np.zeros((2, 4, 5), int)
    seg[0, 1, 1] = 2
    targets, known = _patch_tags(seg, np.stack([codes, codes]))
    assert targets.tolist() == [[0, 1], [0, 0]] and known.all()  # the mask covers both classes
    seg[1, 0, 0] = IGNORE  # an ignored voxel: absence is no longer known
    targets, known = _patch_tags(seg, np.stack([codes, codes]))
    assert known.tolist() == [[True, True], [False, False]]


def test_tag_only_case_present_in_a_slice_range_absent_elsewhere():
    shape = (6, 4, 4)
    weak = CaseConstraints(present=frozenset({1}), absent=frozenset({2}), region={1: ((2, 4), (0, 4), (0, 4))},
                           weak_only=True)
    codes = tags.tag_codes(shape, weak, num_classes=3)
    seg = np.full(shape, IGNORE)  # a tag-only case: its label file is all ignore
    slices = [(seg[z][None], codes[z][None]) for z in range(6)]
    results = [_patch_tags(s, c) for s, c in slices]
    for z, (targets, known) in enumerate(results):
        assert known[0, 1] and targets[0, 1] == 0  # posterior absent: known negative on every slice
        if 2 <= z < 4:
            assert known[0, 0] and targets[0, 0] == 1  # anterior tagged on its slices
        else:
            assert known[0, 0] and targets[0, 0] == 0  # outside its location it cannot be


def test_partial_case_learns_the_unannotated_class_only_from_tags():
    shape = (3, 3)
    partial = CaseConstraints(annotated_classes=frozenset({1}))
    codes = tags.tag_codes(shape, partial, num_classes=3)[None]
    seg = np.zeros((1, *shape), int)
    targets, known = _patch_tags(seg, codes)
    assert known.tolist() == [[True, False]]  # background of the mask says nothing about class 2
    tagged = CaseConstraints(annotated_classes=frozenset({1}), present=frozenset({2}))
    targets, known = _patch_tags(seg, tags.tag_codes(shape, tagged, num_classes=3)[None])
    assert known.tolist() == [[True, True]] and targets.tolist() == [[0, 1]]


def test_outside_voxels_never_make_a_tag():
    codes = np.zeros((1, 3, 3), np.int16)  # after nnU-Net's -1 -> 0 of outside voxels
    targets, known = _patch_tags(np.zeros((1, 3, 3), int), codes)
    assert not targets.any() and known.all()  # nothing may be there: known negative, never positive
    assert tags.default_code(3) > 0
    with pytest.raises(ValueError, match="foreground classes"):
        tags.check_num_classes(7)


def test_torch_patch_tags_equal_the_reference():
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    weak = [None, CaseConstraints(present=frozenset({2}), region={2: ((1, 3), (0, 6), (2, 7))}),
            CaseConstraints(annotated_classes=frozenset({2})), CaseConstraints(absent=frozenset({1}))]
    for trial in range(20):
        segs, codes = [], []
        for case in range(4):
            seg = rng.integers(0, 3, shape) * (rng.random(shape) < 0.1)
            if trial % 3 == 0:
                seg[rng.random(shape) < 0.05] = IGNORE
            segs.append(seg)
            codes.append(tags.tag_codes(shape, weak[case], num_classes=3))
        seg, code = np.stack(segs), np.stack(codes)
        expected = _patch_tags(seg, code)
        got = patch_tags_torch(torch.from_numpy(seg), torch.from_numpy(code), num_classes=3, ignore_label=IGNORE)
        assert np.array_equal(got[0].numpy(), expected[0]) and np.array_equal(got[1].numpy(), expected[1])


@pytest.mark.parametrize("dim", [2, 3])
def test_network_shapes_and_the_segmentation_path_is_unchanged(dim):
    unet = _unet(dim)
    network = MultiTaskNetwork(_unet(dim), num_tags=2)
    x = torch.randn(2, 1, *([16] * dim))
    plain = network(x)
    assert isinstance(plain, list) and plain[0].shape == (2, 3, *([16] * dim))
    assert torch.equal(plain[0], unet(x)[0])  # same weights (seeded): the wrapper adds nothing to segmentation
    network.return_tags = True
    output, logits = network(x)
    assert logits.shape == (2, 2) and torch.equal(output[0], plain[0])
    network.return_tags = False
    network.recorded = []
    network(x)
    assert network.recorded[0].shape == (2, 2) and ((network.recorded[0] >= 0) & (network.recorded[0] <= 1)).all()
    assert {k.split(".")[0] for k in network.state_dict()} == {"segmentation", "head"}


def test_a_case_without_mask_contributes_no_segmentation_gradient():
    network = MultiTaskNetwork(_unet(2), num_tags=2)
    network.return_tags = True
    x = torch.randn(1, 1, 16, 16)
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=IGNORE, dice_class=MemoryEfficientSoftDiceLoss)
    output, logits = network(x)
    segmentation_loss = loss(output[0], torch.full((1, 1, 16, 16), IGNORE))
    segmentation_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in network.parameters())
    # the tag term alone trains the encoder and the head, and unknown tags give nothing
    assert tag_loss(logits, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
    tag_loss(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])).backward()
    assert network.head[0].weight.grad.abs().sum() > 0
    assert network.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    decoder_grads = [p.grad for name, p in network.decoder.named_parameters()  # the decoder holds the encoder too
                     if not name.startswith("encoder.") and p.grad is not None]
    assert all(not g.any() for g in decoder_grads)


@pytest.mark.parametrize("dim", [2, 3])
def test_grad_cam_has_the_input_geometry(dim):
    network = MultiTaskNetwork(_unet(dim), num_tags=2).eval()
    x = torch.randn(2, 1, *([16] * dim))
    cam = grad_cam(network, x, 1)
    assert cam.shape == (2, *([16] * dim))
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6


@pytest.mark.parametrize("dim", [2, 3])
def test_bridge_logits_are_the_mean_activation_map_and_run_in_inference_mode(dim):
    network = MultiTaskNetwork(_unet(dim), num_tags=2, bridge=True).eval()
    plain = MultiTaskNetwork(_unet(dim), num_tags=2).eval()
    x = torch.randn(2, 1, *([16] * dim))
    network.return_tags = True
    output, logits = network(x)
    bottleneck = network.encoder(x)[-1]
    assert torch.allclose(logits, network.head(bottleneck.flatten(2).mean(dim=2)), atol=1e-5)
    assert network.class_activation_maps(bottleneck).shape == (2, 2, *bottleneck.shape[2:])
    assert not torch.allclose(output[0], plain(x)[0])  # the saliency reaches the decoder
    network.return_tags = False
    with torch.inference_mode():  # nnU-Net's predictor: no gradients needed
        assert network(x)[0].shape == (2, 3, *([16] * dim))


def test_wrapped_trainers_keep_the_signature_nnunet_looks_for():
    """nnU-Net calls build_network_architecture with the new signature only if it names "plans_manager"."""
    import inspect

    from nnunetv2_em.trainers import masked_pretraining, multitask

    for trainer in (multitask.MultiTaskTrainer, multitask.MultiTaskTrainer_cpu, multitask.MultiTaskBridgeTrainer_tiny,
                    masked_pretraining.MaskedPretrainTrainer, masked_pretraining.MaskedPretrainTrainer_cpu):
        assert "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters, trainer


@pytest.mark.parametrize("mirroring", [False, True])
def test_slice_tags_read_off_the_prediction_equal_a_separate_pass(mirroring):
    """predict-tags reads a 2d case's slice tags off the windows nnU-Net's prediction ran (two folds, with and without
    mirroring): the same values as running every window again; calls out of that layout give None."""
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_em import tag_prediction

    unet = _unet(2)
    unet.decoder.deep_supervision = False  # as nnU-Net predicts
    network = MultiTaskNetwork(unet, num_tags=2).eval()
    folds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folds.append({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in network.state_dict().items()})
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.network, predictor.list_of_parameters = network, folds
    predictor.configuration_manager = SimpleNamespace(patch_size=[16, 16])
    predictor.label_manager = SimpleNamespace(foreground_labels=[1, 2], num_segmentation_heads=3)
    predictor.allowed_mirroring_axes = (0, 1)
    data = np.random.default_rng(0).normal(size=(1, 5, 20, 29)).astype(np.float32)  # 5 slices, 2 x 3 windows each

    network.recorded = []
    try:
        predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        recorded = list(network.recorded)
    finally:
        network.recorded = None
    assert len(recorded) == 2 * 5 * 6 * (4 if mirroring else 1)
    one_pass = tag_prediction.slice_tags_from_prediction(predictor, data, recorded)
    separate = tag_prediction.slice_tags(predictor, data)
    assert one_pass.shape == (5, 2)
    np.testing.assert_allclose(one_pass, separate, rtol=1e-5, atol=1e-6)
    assert not np.allclose(separate[:, 0], separate[0, 0])  # slices differ: the mapping is checked, not a constant
    assert tag_prediction.slice_tags_from_prediction(predictor, data, recorded + recorded[:6]) is None
