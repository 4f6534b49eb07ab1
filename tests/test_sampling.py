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


# ---- which cases a batch holds: multitask.masked_share
CASES = [f"case_{i}" for i in range(10)]
MASKED = {"case_1", "case_7"}


def test_every_batch_holds_the_masked_share_in_random_positions():
    np.random.seed(0)
    batches = [sampling.balanced_draw(CASES, MASKED, share=0.5, batch_size=8) for _ in range(200)]
    assert all(sum(case in MASKED for case in batch) == 4 for batch in batches)
    positions = {i for batch in batches for i, case in enumerate(batch) if case in MASKED}
    assert positions == set(range(8))  # not always the first half: nnU-Net forces foreground by position
    drawn = [case for batch in batches for case in batch if case not in MASKED]
    assert set(drawn) == set(CASES) - MASKED  # every case without a mask is drawn
    np.random.seed(0)
    plain = [sampling.balanced_draw(CASES, set(), share=0.5, batch_size=8) for _ in range(200)]
    assert {case for batch in plain for case in batch} == set(CASES)  # no masked case: nnU-Net's uniform draw
    with pytest.raises(ValueError, match="masked share"):
        sampling.balanced_draw(CASES, MASKED, share=0.0, batch_size=8)


def test_masked_share_loader_composes_with_uniform_patches_and_is_restored():
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    with sampling.patch_sampling("uniform"), sampling.masked_share(MASKED, 0.25):
        loader_class = trainer_module.nnUNetDataLoader
        assert issubclass(loader_class, sampling.UniformBoxDataLoader)
        loader = object.__new__(loader_class)
        loader.indices, loader.batch_size = CASES, 4
        loader.masked_cases = loader_class.masked_cases  # what _MaskBalanced.__init__ copies onto the instance
        loader.masked_share_of_batch = loader_class.masked_share_of_batch
        np.random.seed(1)
        assert all(sum(case in MASKED for case in loader.get_indices()) == 1 for _ in range(50))
    assert trainer_module.nnUNetDataLoader is nnUNetDataLoader
    # what nnU-Net's augmentation workers get under spawn: a pickled loader, drawing the same way after the block
    import pickle

    travelled = pickle.loads(pickle.dumps(loader))
    assert all(sum(case in MASKED for case in travelled.get_indices()) == 1 for _ in range(50))


def test_cases_with_a_mask_leave_out_all_ignore_and_weak_only_cases(tmp_path):
    import pickle

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunetv2_em.estep.constraints import CaseConstraints
    from nnunetv2_em.trainers.multitask import cases_with_a_mask, masked_share_setting

    annotated = (-1, 0, 1)
    for case, locations in {"masked": [[0, 0, 1, 1]], "tag_only": [], "weak_only": [[0, 0, 2, 2]]}.items():
        (tmp_path / f"{case}.b2nd").write_bytes(b"")
        with open(tmp_path / f"{case}.pkl", "wb") as handle:
            pickle.dump({"class_locations": {1: locations, annotated: locations}}, handle)
    weak = {"weak_only": CaseConstraints(weak_only=True)}
    with_ignore = LabelManager({"background": 0, "structure": 1, "ignore": 2}, regions_class_order=None)
    assert cases_with_a_mask(str(tmp_path), with_ignore, weak) == ["masked"]
    without_ignore = LabelManager({"background": 0, "structure": 1}, regions_class_order=None)
    assert sorted(cases_with_a_mask(str(tmp_path), without_ignore, weak)) == ["masked", "tag_only"]
    assert masked_share_setting({}) is None and masked_share_setting({"masked_share": 0.5}) == 0.5
    for bad in (0, 1.5, "half", True):
        with pytest.raises(EMInputError, match="masked_share"):
            masked_share_setting({"masked_share": bad})


@pytest.mark.slow
def test_multitask_trainer_draws_its_batches_with_the_plans_masked_share(planned, monkeypatch):
    import json
    import os
    import pickle

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for key, value in planned.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    preprocessed = os.path.join(planned.preprocessed, "Dataset971_Hippo")
    plans_file = os.path.join(preprocessed, "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    original_plans = json.dumps(plans)
    plans["em"]["patch_sampling"] = "nnunet"
    plans["multitask"] = {"masked_share": 0.5}
    data_folder = os.path.join(preprocessed, "nnUNetPlans_2d")
    cases = sorted(f[:-len(".pkl")] for f in os.listdir(data_folder) if f.endswith(".pkl"))
    tag_only = cases[:len(cases) // 2]  # as if their labels were all ignore: no annotated voxel
    saved = {}
    try:
        with open(plans_file, "w") as handle:
            json.dump(plans, handle)
        for case in tag_only:
            path = os.path.join(data_folder, f"{case}.pkl")
            with open(path, "rb") as handle:
                saved[path] = handle.read()
            properties = pickle.loads(saved[path])
            properties["class_locations"] = {key: [] for key in properties["class_locations"]}
            with open(path, "wb") as handle:
                pickle.dump(properties, handle)
        monkeypatch.setenv("nnUNet_n_proc_DA", "0")
        trainer = get_trainer_from_args("971", "2d", 0, "MultiTaskTrainer_tiny", "nnUNetPlans",
                                        device=torch.device("cpu"))
        trainer.initialize()
        train, _ = trainer.get_dataloaders()
        loader = train.data_loader
        assert type(loader).__name__ == "MaskBalancedDataLoader"
        in_training = set(loader.indices)
        assert in_training & set(tag_only) and in_training - set(tag_only)  # both kinds in fold 0's training
        np.random.seed(0)
        shares = [np.mean([case not in tag_only for case in loader.get_indices()]) for _ in range(50)]
        assert all(share == round(0.5 * loader.batch_size) / loader.batch_size for share in shares)
    finally:
        with open(plans_file, "w") as handle:
            handle.write(original_plans)
        for path, content in saved.items():
            with open(path, "wb") as handle:
                handle.write(content)
