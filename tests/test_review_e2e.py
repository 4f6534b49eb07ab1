"""The review loop on a real round: ``nnunetv2_em run`` (1 round), ``review export``, a reviewer's edit,
``review import``, then the next round: the reviewed case stays byte-identical, says ``reviewed``, and is trusted."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TEST_DEVICE, NnUNetWorkspace, demo_cases, make_raw_dataset, tree_snapshot

pytestmark = pytest.mark.slow

DATASET_ID = 915
DATASET = "Dataset915_Hippo"
CASES = demo_cases(10)
RUN_NAME = "em_run__VanillaTrainer_tiny__nnUNetPlans__2d"
RUN = ["nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1", "--trainer",
       "VanillaTrainer_tiny", "--device", TEST_DEVICE, "--no-validation", "--seed", "0"]


def _sha(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _write_like(reference_path, array, path):
    reference = sitk.ReadImage(reference_path)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    sitk.WriteImage(image, path, True)


def _sheet(folder):
    with open(os.path.join(folder, "review.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def _write_sheet(folder, rows):
    with open(os.path.join(folder, "review.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    workspace = NnUNetWorkspace(str(tmp_path_factory.mktemp("review")))
    folder = make_raw_dataset(workspace.raw, DATASET_ID, CASES)
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d")
    plans_file = os.path.join(workspace.preprocessed, DATASET, "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    plans["em"].update({"min_model_dice": 0.0, "mirroring": False, "max_ignored_share": 1.0,
                        "calibrate_temperature": False, "changes_without_verified_cases": True})
    with open(plans_file, "w") as handle:
        json.dump(plans, handle)
    workspace.run(*RUN, "--rounds", "1")
    out = os.path.join(workspace.root, "review_batch")
    result = workspace.run("nnunetv2_em", "review", "export", "-d", str(DATASET_ID), "--top", "2", "--audit", "1",
                           "-o", out)
    return {"workspace": workspace, "folder": folder, "out": out, "export_log": result.stdout}


def test_export_writes_a_folder_per_top_case_that_both_tools_can_open_from_anywhere(exported):
    out = exported["out"]
    with open(os.path.join(out, "export.json")) as handle:
        export = json.load(handle)
    run_folder = os.path.join(exported["workspace"].results, DATASET, RUN_NAME)
    with open(os.path.join(run_folder, "round_01", "cases.json")) as handle:
        ranked = [row["case"] for row in json.load(handle)]
    top, audit = list(export["cases"])[:2], list(export["cases"])[2:]
    assert top == ranked[:2] and len(audit) == 1 and audit[0] in ranked[2:]
    assert export["round"] == 1 and export["run"] == RUN_NAME
    assert [row["case"] for row in _sheet(out)] == [*top, *audit]
    assert [row["selection"] for row in _sheet(out)] == ["top", "top", "audit"]
    assert all(row["status"] == "pending" and row["why"] for row in _sheet(out))
    for case in export["cases"]:
        case_folder = os.path.join(out, case)
        proposal = os.path.join(case_folder, "proposal.nii.gz")
        assert _sha(proposal) == _sha(os.path.join(exported["folder"], "em_labels", RUN_NAME, "round_01", "labelsTr",
                                                   f"{case}.nii.gz"))
        assert _sha(os.path.join(case_folder, "original.nii.gz")) == _sha(
            os.path.join(exported["folder"], "em_labels", "round_00", "labelsTr", f"{case}.nii.gz"))
        # the uncertainty map lies on the image grid, in [0, 1], and is high where the proposal says ignore
        uncertainty = sitk.ReadImage(os.path.join(case_folder, "uncertainty.nii.gz"))
        image = sitk.ReadImage(os.path.join(case_folder, "image_0000.nii.gz"))
        assert uncertainty.GetSize() == image.GetSize()
        assert np.allclose(uncertainty.GetSpacing(), image.GetSpacing())
        values = sitk.GetArrayFromImage(uncertainty)
        assert 0.0 <= values.min() and values.max() <= 1.0
        proposed = sitk.GetArrayFromImage(sitk.ReadImage(proposal))
        changes = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(case_folder, "changes.nii.gz")))
        assert np.array_equal(changes == 2, proposed == export["ignore_label"])
        if (proposed == export["ignore_label"]).any():
            assert values[proposed == export["ignore_label"]].mean() > values[proposed != export["ignore_label"]].mean()
        # ITK-SNAP: valid XML; each layer's path relative to SaveLocation exists next to the workspace
        tree = ElementTree.parse(os.path.join(case_folder, f"{case}.itksnap"))
        save_location = tree.find("./entry[@key='SaveLocation']").get("value")
        layers = tree.findall("./folder[@key='Layers']/folder")
        roles = [layer.find("./entry[@key='Role']").get("value") for layer in layers]
        assert roles[0] == "MainRole" and roles.count("SegmentationRole") == 2 and "OverlayRole" in roles
        for layer in layers:
            relative = os.path.relpath(layer.find("./entry[@key='AbsolutePath']").get("value"), save_location)
            assert not relative.startswith("..") and os.path.isfile(os.path.join(case_folder, relative))
        # 3D Slicer: the loader parses, and every file it names is relative to its own folder and exists
        source = open(os.path.join(case_folder, "load_in_slicer.py")).read()
        named = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and node.value.endswith((".nii.gz", ".ctbl"))]
        assert "proposal.nii.gz" in named and "original.nii.gz" in named
        for name in named:
            assert not os.path.isabs(name) and os.path.isfile(os.path.normpath(os.path.join(case_folder, name)))
    for name in ("labels_itksnap.txt", "labels_slicer.ctbl"):
        text = open(os.path.join(out, name)).read()
        assert all(label in text for label in ("Anterior", "Posterior", "ignore"))


def _break(kind, out, case, other_case):
    """Return the folder to import after making one kind of bad return in a copy of the export."""
    broken = out + "_" + kind
    shutil.copytree(out, broken)
    folder = os.path.join(broken, case)
    proposal = os.path.join(folder, "proposal.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(proposal))
    target = os.path.join(folder, "reviewed.nii.gz")
    if kind == "geometry":
        image = sitk.GetImageFromArray(array[:, :, :-1].astype(np.uint8))
        sitk.WriteImage(image, target, True)
        return broken, "shape"
    if kind == "label_value":
        array = array.copy()
        array[0, 0, 0] = 7
        _write_like(proposal, array, target)
        return broken, "label values [7]"
    if kind == "not_in_export":
        os.makedirs(os.path.join(broken, other_case))
        _write_like(proposal, array, os.path.join(broken, other_case, "reviewed.nii.gz"))
        return broken, "not in this export"
    if kind == "not_an_image":
        with open(target, "w") as handle:
            handle.write("these are my notes, not a label\n")
        return broken, "reviewed.nii.gz"
    if kind == "edited_in_place":
        array = array.copy()
        array[array == 3] = 0
        _write_like(proposal, array, proposal)
        return broken, "edited in place"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["geometry", "label_value", "not_in_export", "not_an_image", "edited_in_place"])
def test_a_bad_return_is_refused_with_one_clear_error_and_nothing_changes(exported, kind):
    workspace = exported["workspace"]
    with open(os.path.join(exported["out"], "export.json")) as handle:
        export = json.load(handle)
    case = next(iter(export["cases"]))
    other = next(c for c in CASES if c not in export["cases"])
    broken, expected = _break(kind, exported["out"], case, other)
    before = (tree_snapshot(exported["folder"]), tree_snapshot(os.path.join(workspace.preprocessed, DATASET)))
    result = workspace.run("nnunetv2_em", "review", "import", broken, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Fix:" in result.stderr and result.stderr.count("error:") == 1
    assert (tree_snapshot(exported["folder"]), tree_snapshot(os.path.join(workspace.preprocessed, DATASET))) == before
    assert not os.path.isfile(os.path.join(broken, "imported.json"))


@pytest.fixture(scope="module")
def reviewed_round(exported):
    workspace, out, folder = exported["workspace"], exported["out"], exported["folder"]
    with open(os.path.join(out, "export.json")) as handle:
        export = json.load(handle)
    edited, accepted = list(export["cases"])[0], list(export["cases"])[2]  # a top case, the audit case
    # the reviewer resolves the ignored voxels to background and adds a few voxels of anterior
    proposal = os.path.join(out, edited, "proposal.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(proposal)).copy()
    array[array == export["ignore_label"]] = 0
    foreground = np.argwhere(array == 1)
    centre = foreground[len(foreground) // 2]
    array[centre[0], centre[1]:centre[1] + 3, centre[2]:centre[2] + 3] = 1
    _write_like(proposal, array, os.path.join(out, edited, "reviewed.nii.gz"))
    rows = _sheet(out)
    for row in rows:
        if row["case"] == edited:
            row.update(status="corrected", reviewer="ana", minutes="6.5")
        if row["case"] == accepted:
            row.update(status="accepted", reviewer="ben", minutes="1")
    _write_sheet(out, rows)
    imported = workspace.run("nnunetv2_em", "review", "import", out)
    labels_after_import = {case: _sha(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
                           for case in (edited, accepted)}
    workspace.run(*RUN, "--rounds", "2")
    return {**exported, "edited": edited, "accepted": accepted, "export": export, "expected": array,
            "imported_log": imported.stdout, "labels_after_import": labels_after_import}


def test_import_keeps_the_reviewed_labels_records_effort_and_activates_them(reviewed_round):
    out = reviewed_round["out"]
    edited, accepted = reviewed_round["edited"], reviewed_round["accepted"]
    with open(os.path.join(out, "imported.json")) as handle:
        summary = json.load(handle)
    assert set(summary["imported"]) == {edited, accepted}
    effort = summary["imported"][edited]["effort"]
    proposal = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, edited, "proposal.nii.gz")))
    assert effort["voxels_edited"] == int(np.count_nonzero(proposal != reviewed_round["expected"])) > 0
    assert effort["added_path_length"] > 0 and 0 < effort["dice_1"] <= 1 and "surface_dice_1" in effort
    assert summary["imported"][accepted]["effort"]["voxels_edited"] == 0
    assert summary["imported"][edited]["reviewer"] == "ana" and summary["imported"][edited]["minutes"] == 6.5
    assert summary["total_minutes"] == 7.5
    rows = {row["case"]: row for row in _sheet(out)}
    assert rows[edited]["status"] == "corrected" and int(rows[edited]["voxels_edited"]) == effort["voxels_edited"]
    assert rows[accepted]["status"] == "accepted"
    assert reviewed_round["labels_after_import"][edited] == _sha(os.path.join(out, edited, "reviewed.nii.gz"))
    assert reviewed_round["labels_after_import"][accepted] == _sha(os.path.join(out, accepted, "proposal.nii.gz"))
    run_folder = os.path.join(reviewed_round["workspace"].results, DATASET, RUN_NAME)
    with open(os.path.join(run_folder, "round_01", "review.json")) as handle:
        per_round = json.load(handle)
    assert per_round["total_effort"]["voxels_edited"] == effort["voxels_edited"]


def test_the_next_round_keeps_reviewed_cases_byte_identical_and_trusts_them(reviewed_round):
    folder, out = reviewed_round["folder"], reviewed_round["out"]
    edited, accepted = reviewed_round["edited"], reviewed_round["accepted"]
    versions = os.path.join(folder, "em_labels")
    with open(os.path.join(versions, RUN_NAME, "round_02", "manifest.json")) as handle:
        manifest = json.load(handle)
    with open(os.path.join(versions, "active.json")) as handle:
        assert json.load(handle) == {"run": RUN_NAME, "round": 2, "data_identifier": manifest["data_identifier"]}
    expected = {edited: _sha(os.path.join(out, edited, "reviewed.nii.gz")),
                accepted: _sha(os.path.join(out, accepted, "proposal.nii.gz"))}
    for case, sha in expected.items():
        assert manifest["cases"][case]["provenance"] == "reviewed"
        assert manifest["cases"][case]["sha256"] == sha
        assert _sha(os.path.join(folder, "labelsTr", f"{case}.nii.gz")) == sha
        assert _sha(os.path.join(versions, RUN_NAME, "round_02", "labelsTr", f"{case}.nii.gz")) == sha
    assert manifest["cases"][edited]["reviewed"]["reviewer"] == "ana"
    run_folder = os.path.join(reviewed_round["workspace"].results, DATASET, RUN_NAME)
    with open(os.path.join(run_folder, "round_02", "fit.json")) as handle:
        fit = json.load(handle)
    # the audit case (drawn at random) gates the changes; the top-ranked one is no sample of the dataset
    assert accepted in fit["verified"] and edited not in fit["verified"] and fit["gate"]["kind"] == "precision"
    with open(os.path.join(run_folder, "round_02", "cases.json")) as handle:
        assert not {edited, accepted} & {row["case"] for row in json.load(handle)}
    # the preprocessed segmentation nnU-Net trains on is the reviewed label
    import blosc2

    data_folder = os.path.join(reviewed_round["workspace"].preprocessed, DATASET, manifest["data_identifier"])
    seg = blosc2.open(urlpath=os.path.join(data_folder, f"{edited}_seg.b2nd"), mode="r")[:]
    assert np.count_nonzero(seg == 1) > 0 and not np.any(seg == reviewed_round["export"]["ignore_label"])


def test_em_trainer_trains_on_reviewed_labels_never_judges_them_and_trusts_them(tmp_path):
    from nnunetv2_em import storage

    workspace = NnUNetWorkspace(str(tmp_path))
    cases = demo_cases(8)
    folder = make_raw_dataset(workspace.raw, 916, cases)
    dataset = "Dataset916_Hippo"
    workspace.run("nnunetv2_em", "plan", "-d", "916", "-c", "2d")
    validation, training = cases[:3], cases[3:]
    with open(os.path.join(workspace.preprocessed, dataset, "splits_final.json"), "w") as handle:
        json.dump([{"train": training, "val": validation}], handle)
    # two reviews (as `review import` keeps them): a held-out case and a training case, each with a blob added
    reviewed = {}
    for case in (validation[0], training[0]):
        original = os.path.join(folder, "labelsTr", f"{case}.nii.gz")
        array = sitk.GetArrayFromImage(sitk.ReadImage(original)).copy()
        array[:4, :4, :4] = 2
        reviewed[case] = str(tmp_path / f"{case}_reviewed.nii.gz")
        _write_like(original, array, reviewed[case])
    store = storage.ReviewedLabels(folder, os.path.join(workspace.preprocessed, dataset), ".nii.gz")
    store.commit(store.keep({case: (path, {"reviewer": "test", "selection": "audit" if case in validation else "top"})
                             for case, path in reviewed.items()}))
    raw_before = tree_snapshot(os.path.join(folder, "labelsTr"))

    workspace.run("nnUNetv2_train", "916", "2d", "0", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE)
    fold = os.path.join(workspace.results, dataset, "EMTrainer_tiny__nnUNetPlans__2d", "fold_0")
    training_labels = os.path.join(workspace.preprocessed, dataset, "em_training_labels",
                                   "EMTrainer_tiny__nnUNetPlans__2d", "fold_0")
    import blosc2

    for round_index in (1, 2):
        round_folder = os.path.join(fold, "em", f"round_{round_index:02d}")
        with open(os.path.join(round_folder, "summary.json")) as handle:
            summary = json.load(handle)
        assert validation[0] in summary["verified"] and summary["gate"]["kind"] == "precision"
        assert summary["cases"] == len(validation) - 1  # judged all held-out cases but the reviewed one
        with open(os.path.join(round_folder, "cases.json")) as handle:
            assert validation[0] not in {row["case"] for row in json.load(handle)}
        for case, path in reviewed.items():  # the round's labelsTr holds the reviewed files byte for byte
            assert _sha(os.path.join(round_folder, "labelsTr", f"{case}.nii.gz")) == _sha(path)
    # nnU-Net trained the training case on its reviewed label (the blob is class 2 in its segmentation)
    seg = blosc2.open(urlpath=os.path.join(training_labels, f"{training[0]}_seg.b2nd"), mode="r")[:]
    identifier = next(name for name in os.listdir(store.segmentation_folder("")) if name.startswith("nnUNetPlans"))
    assert np.array_equal(seg, store.read_segmentation(training[0], identifier))
    assert tree_snapshot(os.path.join(folder, "labelsTr")) == raw_before  # the annotations are never touched

    # a review of the fold's last round: export (top case not reviewed yet), a reviewer's edit, import into the store
    out = str(tmp_path / "fold_review")
    workspace.run("nnunetv2_em", "review", "export", "-d", "916", "--trainer", "EMTrainer_tiny", "-c", "2d",
                  "--fold", "0", "--top", "1", "-o", out)
    with open(os.path.join(out, "export.json")) as handle:
        export = json.load(handle)
    (case,) = export["cases"]
    assert export["source"] == "trainer" and export["round"] == 2 and case in validation[1:]
    assert _sha(os.path.join(out, case, "proposal.nii.gz")) == _sha(
        os.path.join(fold, "em", "round_02", "labelsTr", f"{case}.nii.gz"))
    assert export["cases"][case]["uncertainty"] == "uncertainty.nii.gz"
    proposal = os.path.join(out, case, "proposal.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(proposal)).copy()
    array[array == export["ignore_label"]] = 0
    array[:2, :2, :2] = 1
    _write_like(proposal, array, os.path.join(out, case, "reviewed.nii.gz"))
    workspace.run("nnunetv2_em", "review", "import", out)
    record = store.records()[case]
    assert record["proposal"]["source"] == "trainer" and record["proposal"]["fold"] == 0
    assert _sha(store.label_path(case)) == _sha(os.path.join(out, case, "reviewed.nii.gz"))
    assert tree_snapshot(os.path.join(folder, "labelsTr")) == raw_before  # stored, not activated: originals stay
    with open(os.path.join(fold, "em", "round_02", "review.json")) as handle:
        assert case in json.load(handle)["cases"]


def test_rank_unlabeled_orders_new_images_by_every_strategy_from_the_rounds_model(exported):
    from nnunetv2_em import selection
    from nnunetv2_em.demo import DEMO_DATA

    workspace = exported["workspace"]
    images = os.path.join(workspace.root, "new_images")
    os.makedirs(images, exist_ok=True)
    new_cases = [c for c in demo_cases(14) if c not in CASES][:3]
    for case in new_cases:
        shutil.copy(os.path.join(DEMO_DATA, "imagesTr", f"{case}_0000.nii.gz"), images)
    model = os.path.join(workspace.results, DATASET, RUN_NAME, "round_01", "nnUNet_results", DATASET,
                         "VanillaTrainer_tiny__nnUNetPlans__2d")
    out = os.path.join(workspace.root, "to_label.csv")
    workspace.run("nnunetv2_em", "rank-unlabeled", "-d", str(DATASET_ID), "--model", model, "--folds", "0", "1",
                  "--images", images, "-o", out)
    with open(os.path.splitext(out)[0] + ".json") as handle:
        result = json.load(handle)
    rows = {row["case"]: row for row in result["cases"]}
    assert sorted(rows) == sorted(new_cases)
    for strategy in ("examine", "entropy", "k-center", "random", "fg-random"):
        assert sorted(row[f"rank_{strategy}"] for row in rows.values()) == [1, 2, 3]
    saved = np.load(os.path.splitext(out)[0] + "_embeddings.npz")
    assert saved["embeddings"].shape == (3, result["embedding_features"]) and result["embedding_features"] > 1
    scores = selection.examine_scores(saved["embeddings"])
    for case, score in zip(saved["cases"], scores, strict=True):
        assert rows[str(case)]["examine_score"] == pytest.approx(score)
    by_entropy = sorted(rows.values(), key=lambda row: row["rank_entropy"])
    assert [row["mean_entropy"] for row in by_entropy] == sorted((row["mean_entropy"] for row in rows.values()),
                                                                 reverse=True)
    with open(out, newline="") as handle:
        assert [row["case"] for row in csv.DictReader(handle)] == sorted(new_cases)
    refused = workspace.run("nnunetv2_em", "rank-unlabeled", "-d", str(DATASET_ID), "--model", images, "--images",
                            images, "-o", out + ".x", check=False)
    assert refused.returncode == 2 and "not a trained nnU-Net model folder" in refused.stderr


def test_rank_unlabeled_with_self_supervised_embeddings_and_the_warm_start_keys(exported):
    """Masked-image pretraining through the stock CLI, its encoder as the embedding source of rank-unlabeled (alone
    and beside the segmentation model), and its weights fitting nnU-Net's -pretrained_weights."""
    import torch

    from nnunetv2_em.demo import DEMO_DATA

    workspace = exported["workspace"]
    images = os.path.join(workspace.root, "ssl_images")
    os.makedirs(images, exist_ok=True)
    new_cases = [c for c in demo_cases(14) if c not in CASES][:3]
    for case in new_cases:
        shutil.copy(os.path.join(DEMO_DATA, "imagesTr", f"{case}_0000.nii.gz"), images)
    workspace.run("nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", "MaskedPretrainTrainer_tiny", "-device",
                  TEST_DEVICE)
    ssl_model = os.path.join(workspace.results, DATASET, "MaskedPretrainTrainer_tiny__nnUNetPlans__2d")
    model = os.path.join(workspace.results, DATASET, RUN_NAME, "round_01", "nnUNet_results", DATASET,
                         "VanillaTrainer_tiny__nnUNetPlans__2d")
    out = os.path.join(workspace.root, "ssl_rank.csv")
    workspace.run("nnunetv2_em", "rank-unlabeled", "-d", str(DATASET_ID), "--embeddings", "ssl", "--ssl-model",
                  ssl_model, "--strategy", "examine", "k-center", "random", "--images", images, "-o", out)
    with open(os.path.splitext(out)[0] + ".json") as handle:
        result = json.load(handle)
    assert result["embeddings"] == "ssl" and result["model"] is None
    assert sorted(row["case"] for row in result["cases"]) == sorted(new_cases)
    assert sorted(row["rank_examine"] for row in result["cases"]) == [1, 2, 3]
    ssl_embeddings = np.load(os.path.splitext(out)[0] + "_embeddings.npz")["embeddings"]
    both = os.path.join(workspace.root, "both_rank.csv")  # ssl embeddings, predictions from the segmentation model
    workspace.run("nnunetv2_em", "rank-unlabeled", "-d", str(DATASET_ID), "--model", model, "--folds", "0",
                  "--embeddings", "ssl", "--ssl-model", ssl_model, "--images", images, "-o", both)
    with open(os.path.splitext(both)[0] + ".json") as handle:
        rows = json.load(handle)["cases"]
    assert all("mean_entropy" in row for row in rows)
    assert np.allclose(np.load(os.path.splitext(both)[0] + "_embeddings.npz")["embeddings"], ssl_embeddings)
    nnunet = os.path.join(workspace.root, "nnunet_rank.csv")
    workspace.run("nnunetv2_em", "rank-unlabeled", "-d", str(DATASET_ID), "--model", model, "--folds", "0",
                  "--strategy", "examine", "--images", images, "-o", nnunet)
    assert not np.allclose(np.load(os.path.splitext(nnunet)[0] + "_embeddings.npz")["embeddings"], ssl_embeddings)
    for command, message in (
            (["--embeddings", "ssl", "--ssl-model", model, "--strategy", "examine"], "not -tr MaskedPretrainTrainer"),
            (["--embeddings", "ssl", "--ssl-model", ssl_model, "--strategy", "entropy"], "needs a segmentation model"),
            (["--embeddings", "ssl"], "needs --ssl-model")):
        refused = workspace.run("nnunetv2_em", "rank-unlabeled", "-d", str(DATASET_ID), *command, "--images", images,
                                "-o", out + ".x", check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert not os.path.exists(out + ".x")
    # warm start: nnU-Net's -pretrained_weights needs every key but the output layers to match in shape
    pretrained = torch.load(os.path.join(ssl_model, "fold_all", "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)["network_weights"]
    segmentation = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu",
                              weights_only=False)["network_weights"]
    shared = {k for k in segmentation if ".seg_layers." not in k}
    assert shared <= set(pretrained)
    assert all(pretrained[k].shape == segmentation[k].shape for k in shared)
