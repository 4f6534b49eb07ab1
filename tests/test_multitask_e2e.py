"""The multi-task trainer through the stock CLIs on real Hippocampus cases: cases with masks, partial cases with a
tag for the structure they do not draw, and tag-only cases (label file all ignore) with slice-range and case-level
tags; ``nnUNetv2_train -tr MultiTaskTrainer_tiny``, ``nnUNetv2_predict`` and ``nnunetv2_em predict-tags``; the
marginal-loss trainer and the EM variant (``EMMultiTaskTrainer_tiny``) on the same dataset."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TEST_DEVICE, NnUNetWorkspace, demo_cases, make_raw_dataset

from nnunetv2_em.demo import DEMO_DATA

pytestmark = pytest.mark.slow

DATASET_ID = 911
DATASET = "Dataset911_Tags"
TRAINER = "MultiTaskTrainer_tiny"
CASES = demo_cases(10)
MASKED, PARTIAL, TAG_ONLY, TEST = CASES[:4], CASES[4:6], CASES[6:8], CASES[8:]


def test_multitask_trainer_predictor_and_tags(tmp_path):
    workspace = NnUNetWorkspace(str(tmp_path))
    folder = make_raw_dataset(workspace.raw, DATASET_ID, CASES[:8], name="Tags")
    with open(os.path.join(folder, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    dataset_json["labels"]["ignore"] = 3
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(dataset_json, handle)
    rows = {case: {"annotated_classes": ["Anterior"], "present": ["Posterior"]} for case in PARTIAL}
    for index, case in enumerate(TAG_ONLY):
        path = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
        image = sitk.ReadImage(path)
        label = sitk.GetArrayFromImage(image)
        if index == 0:  # slice-level tags: the slices (axis 0) that hold each structure
            rows[case] = {"present": ["Anterior", "Posterior"], "location": {
                name: {"slices": [int(np.nonzero((label == value).any(axis=(1, 2)))[0].min()),
                                  int(np.nonzero((label == value).any(axis=(1, 2)))[0].max()) + 1], "axis": 0}
                for name, value in (("Anterior", 1), ("Posterior", 2))}}
        else:
            rows[case] = {"present": ["Anterior", "Posterior"]}
        blank = sitk.GetImageFromArray(np.full(label.shape, 3, np.uint8))  # no mask: every voxel ignored
        blank.CopyInformation(image)
        sitk.WriteImage(blank, path)
    for case in PARTIAL:
        path = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
        image = sitk.ReadImage(path)
        label = sitk.GetArrayFromImage(image)
        label[label == 2] = 0
        partial = sitk.GetImageFromArray(label)
        partial.CopyInformation(image)
        sitk.WriteImage(partial, path)
    with open(os.path.join(folder, "em_weak_labels.json"), "w") as handle:
        json.dump({"version": 1, "cases": rows}, handle)
    test_images = os.path.join(str(tmp_path), "test")
    os.makedirs(test_images)
    for case in TEST:
        shutil.copy(os.path.join(DEMO_DATA, "imagesTr", f"{case}_0000.nii.gz"), test_images)

    workspace.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1")
    workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", TRAINER, "-device", TEST_DEVICE)
    model = os.path.join(workspace.results, DATASET, f"{TRAINER}__nnUNetPlans__2d")
    fold = os.path.join(model, "fold_all")
    with open(next(os.path.join(fold, name) for name in sorted(os.listdir(fold)) if name.startswith("training_log"))) \
            as handle:
        log = handle.read()
    assert "multi-task: 2 tag(s), weight 1.0, 4 case(s) with weak labels, saliency bridge False" in log
    assert "tag loss" in log
    checkpoint = torch.load(os.path.join(model, "fold_all", "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert any(key.startswith("head.") for key in checkpoint["network_weights"])

    # the marginal loss on the same dataset: partial cases train background as "background or Posterior"
    workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", "MarginalTrainer_tiny", "-device", TEST_DEVICE)
    marginal = os.path.join(workspace.results, DATASET, "MarginalTrainer_tiny__nnUNetPlans__2d", "fold_all")
    with open(next(os.path.join(marginal, name) for name in sorted(os.listdir(marginal))
                   if name.startswith("training_log"))) as handle:
        assert "marginal loss: 2 partially annotated case(s)" in handle.read()
    workspace.run("nnUNetv2_predict", "-i", test_images, "-o", os.path.join(str(tmp_path), "marginal"), "-d",
                  str(DATASET_ID), "-c", "2d", "-tr", "MarginalTrainer_tiny", "-f", "all", "-device", TEST_DEVICE,
                  "--disable_tta", "-npp", "1", "-nps", "1")
    assert all(os.path.isfile(os.path.join(str(tmp_path), "marginal", f"{case}.nii.gz")) for case in TEST)

    # the stock predictor rebuilds the same network (segmentation only)
    stock = os.path.join(str(tmp_path), "stock")
    workspace.run("nnUNetv2_predict", "-i", test_images, "-o", stock, "-d", str(DATASET_ID), "-c", "2d", "-tr",
                  TRAINER, "-f", "all", "-device", TEST_DEVICE, "--disable_tta", "-npp", "1", "-nps", "1")
    empty = os.path.join(str(tmp_path), "empty")
    os.makedirs(empty)
    refused = workspace.run("nnunetv2_em", "predict-tags", "-i", empty, "-o", os.path.join(str(tmp_path), "x"),
                            "--model", model, "--folds", "all", check=False)
    assert refused.returncode == 2 and f"{empty}: no images <case>_0000.nii.gz" in refused.stderr
    headless = os.path.join(str(tmp_path), "headless")  # the same model saved as a plain nnU-Net network
    shutil.copytree(model, headless)
    checkpoint_file = os.path.join(headless, "fold_all", "checkpoint_final.pth")
    plain = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    plain["trainer_name"] = "VanillaTrainer_tiny"
    plain["network_weights"] = {key.removeprefix("segmentation."): value
                                for key, value in plain["network_weights"].items() if not key.startswith("head.")}
    torch.save(plain, checkpoint_file)
    refused = workspace.run("nnunetv2_em", "predict-tags", "-i", test_images, "-o", os.path.join(str(tmp_path), "x"),
                            "--model", headless, "--folds", "all", check=False)
    assert refused.returncode == 2 and "has no tag head. Fix: train with -tr MultiTaskTrainer" in refused.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "x"))
    out = os.path.join(str(tmp_path), "tags")
    workspace.run("nnunetv2_em", "predict-tags", "-i", test_images, "-o", out, "--model", model, "--folds", "all",
                  "--saliency")
    with open(os.path.join(out, "tags.json")) as handle:
        predicted = json.load(handle)["tags"]
    assert sorted(predicted) == TEST
    for case in TEST:
        image = sitk.ReadImage(os.path.join(test_images, f"{case}_0000.nii.gz"))
        assert set(predicted[case]) == {"Anterior", "Posterior"}
        assert all(0 <= p <= 1 for p in predicted[case].values())
        ours = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"{case}.nii.gz")))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(stock, f"{case}.nii.gz")))
        assert np.array_equal(ours, theirs)  # the same segmentation as nnUNetv2_predict
        for name in ("Anterior", "Posterior"):
            saliency = sitk.ReadImage(os.path.join(out, f"{case}_saliency_{name}.nii.gz"))
            assert saliency.GetSize() == image.GetSize()
            assert np.allclose(saliency.GetSpacing(), image.GetSpacing())
            assert np.allclose(saliency.GetOrigin(), image.GetOrigin())
            values = sitk.GetArrayFromImage(saliency)
            assert values.min() >= 0 and values.max() <= 1 + 1e-5
        with open(os.path.join(out, f"{case}_tags.json")) as handle:
            record = json.load(handle)
        assert record["tags"] == predicted[case]
        per_slice = record["per_slice"]  # 2d: one probability per slice of the cropped image
        shape = sitk.GetArrayFromImage(image).shape
        assert 0 <= per_slice["axis"] < 3 and 0 <= per_slice["first_slice"] < shape[per_slice["axis"]]
        for name, values in per_slice["probabilities"].items():
            assert per_slice["first_slice"] + len(values) <= shape[per_slice["axis"]]
            assert max(values) == pytest.approx(predicted[case][name], abs=1e-4)  # the case tag: the max

    # the EM variant: EMTrainer's rounds with the tag head; fold 0 judges a tag-only case and a masked one
    split = [{"train": sorted(set(CASES[:8]) - {TAG_ONLY[1], MASKED[0]}), "val": sorted([TAG_ONLY[1], MASKED[0]])}]
    with open(os.path.join(workspace.preprocessed, DATASET, "splits_final.json"), "w") as handle:
        json.dump(split, handle)
    workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "EMMultiTaskTrainer_tiny", "-device",
                  TEST_DEVICE)
    em_fold = os.path.join(workspace.results, DATASET, "EMMultiTaskTrainer_tiny__nnUNetPlans__2d", "fold_0")
    with open(next(os.path.join(em_fold, name) for name in sorted(os.listdir(em_fold))
                   if name.startswith("training_log"))) as handle:
        log = handle.read()
    assert "multi-task: 2 tag(s)" in log and "tag loss" in log
    for round_index in (1, 2):
        with open(os.path.join(em_fold, "em", f"round_{round_index:02d}", "summary.json")) as handle:
            assert json.load(handle)["judged_cases"] == split[0]["val"]
        with open(os.path.join(em_fold, "em", f"round_{round_index:02d}", "cases.json")) as handle:
            rows = {row["case"]: row for row in json.load(handle)}
        assert rows[TAG_ONLY[1]]["weak_labels"]["kind"] == "tagged"  # the E-step read its tags as constraints
        assert "weak_labels" not in rows[MASKED[0]]
        exported = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(
            em_fold, "em", f"round_{round_index:02d}", "labelsTr", f"{TAG_ONLY[1]}.nii.gz")))
        assert set(np.unique(exported)) <= {0, 1, 2, 3}  # pseudo-labels where sure, ignore elsewhere
    em_out = os.path.join(str(tmp_path), "em_multitask")
    workspace.run("nnUNetv2_predict", "-i", test_images, "-o", em_out, "-d", str(DATASET_ID), "-c", "2d", "-tr",
                  "EMMultiTaskTrainer_tiny", "-f", "0", "-device", TEST_DEVICE, "--disable_tta", "-npp", "1",
                  "-nps", "1")
    assert all(os.path.isfile(os.path.join(em_out, f"{case}.nii.gz")) for case in TEST)
