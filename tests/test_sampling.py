"""``em.patch_sampling``: where patches that are not forced to hold foreground are drawn once EM declares an ignore
label. nnU-Net's own ``get_bbox`` decides it; these tests run it with the flag nnU-Net sets and with ours."""

from __future__ import annotations

import numpy as np
import pytest

from nnunetv2_em import sampling
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.settings import EMSettings

SHAPE = (1, 200, 200)
PATCH = (1, 20, 20)
ANNOTATED_KEY = (-1, 0, 1, 2)


def _loader(cls, has_ignore):
    """A loader with just what ``get_bbox`` reads (no dataset needed)."""
    loader = object.__new__(cls)
    loader.need_to_pad = np.zeros(3, int)
    loader.patch_size = PATCH
    loader.has_ignore = has_ignore
    loader.annotated_classes_key = ANNOTATED_KEY
    return loader


def _starts(loader, seed=0, draws=400):
    np.random.seed(seed)
    # annotated voxels only in one corner (the rest of the case all ignore would be a scribble dataset)
    corner = np.array([[0, 0, y, x] for y in range(10) for x in range(10)])
    locations = {ANNOTATED_KEY: corner, 1: corner[:5], 2: corner[5:10]}
    return np.array([loader.get_bbox(np.array(SHAPE), False, locations)[0][1:] for _ in range(draws)])


def test_nnunet_centres_patches_on_annotated_voxels_and_uniform_draws_boxes_everywhere():
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    centred = _starts(_loader(nnUNetDataLoader, has_ignore=True))
    assert centred.max() < 10  # every box starts near the annotated corner
    uniform = _starts(_loader(sampling.UniformBoxDataLoader, has_ignore=False))
    assert uniform.max() > 150 and uniform.mean() > 60  # spread over the whole image, as without an ignore label
    plain = _starts(_loader(nnUNetDataLoader, has_ignore=False))
    assert np.array_equal(uniform, plain)  # exactly nnU-Net's draw without an ignore label


def test_the_loader_swap_is_scoped_and_nnunet_mode_changes_nothing():
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    with sampling.patch_sampling("nnunet"):
        assert trainer_module.nnUNetDataLoader is original
    with sampling.patch_sampling("uniform"):
        assert trainer_module.nnUNetDataLoader is sampling.UniformBoxDataLoader
    assert trainer_module.nnUNetDataLoader is original
    with pytest.raises(RuntimeError), sampling.patch_sampling("uniform"):
        raise RuntimeError("a failing get_dataloaders")
    assert trainer_module.nnUNetDataLoader is original
    with pytest.raises(ValueError, match="one of"), sampling.patch_sampling("centre"):
        pass


def test_the_setting_is_validated():
    assert EMSettings.resolve(None, source="plans").patch_sampling == "nnunet"
    assert EMSettings.resolve({"patch_sampling": "uniform"}, source="plans").patch_sampling == "uniform"
    with pytest.raises(EMInputError, match="patch_sampling.*must be nnunet or uniform"):
        EMSettings.resolve({"patch_sampling": "centre"}, source="plans")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from conftest import NnUNetWorkspace, demo_cases, make_raw_dataset

    workspace = NnUNetWorkspace(str(tmp_path_factory.mktemp("sampling")))
    make_raw_dataset(workspace.raw, 971, demo_cases(6))
    workspace.run("nnunetv2_em", "plan", "-d", "971", "-c", "2d", "-np", "1")
    return workspace


@pytest.mark.slow
@pytest.mark.parametrize("mode, expected", [("nnunet", "nnUNetDataLoader"), ("uniform", "UniformBoxDataLoader")])
def test_em_trainer_builds_the_loader_its_plans_ask_for(planned, monkeypatch, mode, expected):
    import json
    import os

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for key, value in planned.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    plans_file = os.path.join(planned.preprocessed, "Dataset971_Hippo", "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    plans["em"]["patch_sampling"] = mode
    with open(plans_file, "w") as handle:
        json.dump(plans, handle)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # loaders in this process: nothing to start or stop
    trainer = get_trainer_from_args("971", "2d", 0, "EMTrainer_tiny", "nnUNetPlans", device=torch.device("cpu"))
    trainer.initialize()
    train, _ = trainer.get_dataloaders()
    assert type(train.data_loader).__name__ == expected
    assert train.data_loader.has_ignore == (mode == "nnunet")  # EMPlanner declared the ignore label
