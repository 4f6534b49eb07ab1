"""Two nnU-Net trainings with the same seed on the same labels give identical weights (real cases, CPU, tiny budget);
another seed gives other weights. What the benchmark's paired arms rest on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import NnUNetWorkspace, demo_cases, make_raw_dataset

pytestmark = pytest.mark.slow

DATASET_ID = 933
DATASET = "Dataset933_Hippo"


def _train(workspace: NnUNetWorkspace, results: str, seed: int) -> dict:
    env = {**workspace.env, "nnUNet_results": results, "nnUNet_n_proc_DA": "2"}  # the seed must override this
    subprocess.run([sys.executable, "-m", "nnunetv2_em.mstep", DATASET, "2d", "0", "--trainer", "VanillaTrainer_tiny",
                    "--device", "cpu", "--no-validation", "--seed", str(seed)], env=env, check=True,
                   capture_output=True, timeout=900)
    checkpoint = os.path.join(results, DATASET, "VanillaTrainer_tiny__nnUNetPlans__2d", "fold_0",
                              "checkpoint_final.pth")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    workspace = NnUNetWorkspace(str(tmp_path))
    make_raw_dataset(workspace.raw, DATASET_ID, demo_cases(6))
    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    first = _train(workspace, str(tmp_path / "results_a"), seed=0)
    again = _train(workspace, str(tmp_path / "results_b"), seed=0)
    other = _train(workspace, str(tmp_path / "results_c"), seed=1)
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name} differs between two trainings with seed 0"
    assert any(not torch.equal(first[name], other[name]) for name in first)
