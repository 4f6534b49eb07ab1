"""``nnunetv2_em merge`` on two real datasets built from the Hippocampus cases with different label sets."""

import json
import os

import numpy as np
import SimpleITK as sitk
from conftest import demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em import weak_labels


def _relabel(folder, mapping, labels):
    """Keep one structure per dataset, renumbered: what a lab that drew only that structure would have."""
    for name in os.listdir(os.path.join(folder, "labelsTr")):
        path = os.path.join(folder, "labelsTr", name)
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
        out = np.zeros_like(array)
        for old, new in mapping.items():
            out[array == old] = new
        relabelled = sitk.GetImageFromArray(out)
        relabelled.CopyInformation(image)
        sitk.WriteImage(relabelled, path)
    with open(os.path.join(folder, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    dataset_json["labels"] = labels
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(dataset_json, handle)


def _two_datasets(workspace):
    cases = demo_cases(8)
    anterior = make_raw_dataset(workspace.raw, 951, cases[:4], name="Anterior")
    _relabel(anterior, {1: 1}, {"background": 0, "Anterior": 1})
    posterior = make_raw_dataset(workspace.raw, 952, cases[4:], name="Back")
    _relabel(posterior, {2: 1}, {"background": 0, "Hippo": 1})  # the same structure under another name
    return cases, anterior, posterior


def test_merge_remaps_labels_records_annotated_classes_and_passes_nnunet_checks(workspace):
    cases, anterior, posterior = _two_datasets(workspace)
    before = {folder: tree_snapshot(folder) for folder in (anterior, posterior)}
    result = workspace.run("nnunetv2_em", "merge", "-d", "951", "952", "-o", "Dataset953_Merged", "--map",
                           "952:Hippo=Posterior")
    assert "8 cases" in result.stdout
    merged = os.path.join(workspace.raw, "Dataset953_Merged")
    with open(os.path.join(merged, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    assert dataset_json["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert dataset_json["numTraining"] == 8
    for case in cases:
        source = anterior if case in cases[:4] else posterior
        original = sitk.ReadImage(os.path.join(source, "labelsTr", f"{case}.nii.gz"))
        out = sitk.ReadImage(os.path.join(merged, "labelsTr", f"{case}.nii.gz"))
        assert out.GetSpacing() == original.GetSpacing() and out.GetOrigin() == original.GetOrigin()
        expected = sitk.GetArrayFromImage(original) * (1 if source == anterior else 2)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), expected)
    parsed = weak_labels.load_weak_labels(merged, dataset_json, labelled=cases, images=cases)
    assert {case: sorted(c.annotated_classes) for case, c in parsed.items()} == \
        {**{case: [1] for case in cases[:4]}, **{case: [2] for case in cases[4:]}}
    assert {folder: tree_snapshot(folder) for folder in (anterior, posterior)} == before  # sources only read
    check = workspace.run("python", "-c", "from nnunetv2.experiment_planning.verify_dataset_integrity import "
                          f"verify_dataset_integrity; verify_dataset_integrity('{merged}', num_processes=1)")
    assert check.returncode == 0


def test_merge_errors_leave_nothing_behind(workspace):
    cases, anterior, posterior = _two_datasets(workspace)
    before = tree_snapshot(workspace.raw)
    for arguments, message in ((["-d", "951", "-o", "Dataset954_X"], "at least two"),
                               (["-d", "951", "952", "-o", "Merged"], "DatasetXXX_Name"),
                               (["-d", "951", "952", "-o", "Dataset951_Again"], "is taken"),
                               (["-d", "951", "952", "-o", "Dataset954_X", "--map", "952:Nope=Posterior"],
                                "no label Nope")):
        result = workspace.run("nnunetv2_em", "merge", *arguments, check=False)
        assert result.returncode == 2 and message in result.stderr and "Fix:" in result.stderr
    # the same case in both sources: refused unless case ids get a prefix
    make_raw_dataset(workspace.raw, 955, cases[:2], name="Again")
    result = workspace.run("nnunetv2_em", "merge", "-d", "951", "955", "-o", "Dataset956_X", check=False)
    assert result.returncode == 2 and "--prefix" in result.stderr
    assert not os.path.exists(os.path.join(workspace.raw, "Dataset956_X"))
    assert not [n for n in os.listdir(workspace.raw) if n.startswith(".Dataset")]
    assert all(tree_snapshot(workspace.raw).get(k) == v for k, v in before.items())
    workspace.run("nnunetv2_em", "merge", "-d", "951", "955", "-o", "Dataset956_X", "--prefix")
    assert len(os.listdir(os.path.join(workspace.raw, "Dataset956_X", "labelsTr"))) == 6
