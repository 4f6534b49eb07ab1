"""Staging a round's labels where nnU-Net resamples: real Hippocampus cases given different through-plane spacings,
planned for 3d_fullres, then staged as ``run`` stages them (``crossfold.tasks.stage_case_labels``).

A round writes the E-step's label as the training segmentation directly and maps only the changed voxels back to the
raw label; these tests hold that to what nnU-Net's own preprocessing makes of the staged raw label."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import demo_cases, make_raw_dataset
from scipy import ndimage

DATASET = "Dataset947_HippoResampled"
SPACINGS = (1.0, 1.6, 2.2, 3.0)  # through-plane, mm: nnU-Net resamples every case to the median


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import storage
    from nnunetv2_em.crossfold.tasks import stage_case_labels
    from nnunetv2_em.planning import plan_and_preprocess

    root = str(tmp_path_factory.mktemp("resampled"))
    cases = demo_cases(len(SPACINGS))
    raw = make_raw_dataset(os.path.join(root, "raw"), 947, cases, name="HippoResampled")
    for case, spacing in zip(cases, SPACINGS, strict=True):
        for path in (os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), os.path.join(raw, "labelsTr",
                                                                                        f"{case}.nii.gz")):
            image = sitk.ReadImage(path)
            image.SetSpacing((*image.GetSpacing()[:2], spacing))
            sitk.WriteImage(image, path, True)
    environment = {"nnUNet_raw": os.path.join(root, "raw"), "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
                   "nnUNet_results": os.path.join(root, "results"), "nnUNet_def_n_proc": "1"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        plan_and_preprocess(DATASET, configurations=["3d_fullres"], num_processes=1)
        preprocessed = os.path.join(root, "preprocessed", DATASET)
        plans_manager = PlansManager(os.path.join(preprocessed, "nnUNetPlans.json"))
        configuration_manager = plans_manager.get_configuration("3d_fullres")
        with open(os.path.join(preprocessed, "dataset.json")) as handle:
            dataset_json = json.load(handle)
        identifier = configuration_manager.data_identifier
        versions = storage.DatasetLabelVersions(raw, preprocessed, identifier, ".nii.gz", "em_run__test")
        versions.keep_originals(cases)
        inputs = {}
        for index, case in enumerate(cases):
            annotation = versions.read_segmentation(0, case)[0]
            labels = annotation.copy()
            if index % 2 == 1:  # grow the anterior class by one voxel (a boundary correction); even cases unchanged
                labels[ndimage.binary_dilation(annotation == 1) & (annotation == 0)] = 1
            properties = load_pickle(os.path.join(preprocessed, identifier, f"{case}.pkl"))
            stage_case_labels(versions, 1, case, labels, annotation=annotation, properties=properties,
                              plans_manager=plans_manager, configuration_manager=configuration_manager,
                              dataset_json=dataset_json)
            inputs[case] = (annotation, labels)
        yield {"cases": cases, "raw": raw, "versions": versions, "inputs": inputs, "plans_manager": plans_manager,
               "configuration_manager": configuration_manager, "dataset_json": dataset_json}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _raw(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_the_configuration_resamples(staged):
    spacing = staged["configuration_manager"].spacing
    assert min(SPACINGS) < spacing[0] < max(SPACINGS)  # so every case but the median one is resampled


def test_unchanged_cases_keep_the_original_raw_label_voxel_for_voxel(staged):
    versions = staged["versions"]
    for case in staged["cases"][::2]:
        assert np.array_equal(_raw(versions.label_path(1, case)), _raw(versions.original_label_path(case)))
        assert np.array_equal(versions.read_segmentation(1, case)[0], staged["inputs"][case][0])


def test_changed_cases_stage_the_estep_label_and_map_its_changes_back(staged):
    from nnunetv2_em import nnunet_data

    versions = staged["versions"]
    for case in staged["cases"][1::2]:
        annotation, labels = staged["inputs"][case]
        assert np.array_equal(versions.read_segmentation(1, case)[0], labels)  # the training segmentation as is
        original, staged_raw = _raw(versions.original_label_path(case)), _raw(versions.label_path(1, case))
        changed_raw = staged_raw != original
        assert changed_raw.any() and set(np.unique(staged_raw[changed_raw])) == {1}  # only growth of class 1
        # the raw change lies next to the original anterior class (a one-voxel ring in the preprocessed grid)
        assert (changed_raw & ~ndimage.binary_dilation(original == 1, iterations=3)).sum() == 0
        # nnU-Net's preprocessing of the staged raw label gives back nearly the staged segmentation
        again, properties = nnunet_data.preprocess_label(
            versions.label_path(1, case), [os.path.join(staged["raw"], "imagesTr", f"{case}_0000.nii.gz")],
            staged["plans_manager"], staged["configuration_manager"], staged["dataset_json"])
        assert again[0].shape == labels.shape
        changed = labels != annotation
        assert (again[0][changed] == labels[changed]).mean() > 0.85
        assert (again[0] != labels).mean() < 0.01
        class_locations = load_properties(versions, case)["class_locations"]  # the sampler's, keyed as nnU-Net keys
        assert set(class_locations) == set(properties["class_locations"]) and {1, 2} <= set(class_locations)
        assert all(len(v) for v in class_locations.values())


def load_properties(versions, case: str) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    return load_pickle(os.path.join(versions.segmentation_folder(1), f"{case}.pkl"))
