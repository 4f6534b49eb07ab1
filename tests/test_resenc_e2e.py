"""nnU-Net's recommended residual-encoder presets with EM: ``nnunetv2_em plan -pl EMPlannerResEncM`` and the stock
``nnUNetv2_plan_experiment -pl EMPlannerResEncM`` plan exactly as ``nnUNetPlannerResEncM`` (plus the ``em`` block and
the ignore label), and ``nnUNetv2_train -tr EMTrainer_tiny -p nnUNetResEncUNetMPlans`` trains the residual-encoder
network through its EM rounds without nnU-Net's "old default plans" notice."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TEST_DEVICE, demo_cases, make_raw_dataset

pytestmark = pytest.mark.slow

CASES = demo_cases(10)
PLANS = "nnUNetResEncUNetMPlans"


def _comparable(plans: dict) -> dict:
    plans = json.loads(json.dumps(plans))
    for key in ("em", "experiment_planner_used", "plans_name"):
        plans.pop(key, None)
    for configuration in plans["configurations"].values():
        configuration.pop("data_identifier", None)
    return plans


def test_resenc_m_preset_plans_like_nnunet_and_trains_em_through_the_stock_commands(workspace):
    make_raw_dataset(workspace.raw, 931, CASES, name="ResEnc")
    base = os.path.join(workspace.preprocessed, "Dataset931_ResEnc")
    workspace.run("nnunetv2_em", "plan", "-d", "931", "-c", "2d", "-pl", "EMPlannerResEncM", "-np", "1")
    with open(os.path.join(base, PLANS + ".json")) as handle:
        em_plans = json.load(handle)
    assert em_plans["experiment_planner_used"] == "EMPlannerResEncM" and "em" in em_plans
    assert em_plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    with open(os.path.join(base, "dataset.json")) as handle:
        assert json.load(handle)["labels"]["ignore"] == 3
    # nnU-Net's own planner gives the same plans; the stock command finds ours by name and gives them too
    for planner, name in (("nnUNetPlannerResEncM", "StockResEncM"), ("EMPlannerResEncM", "ThroughStockCLI")):
        workspace.run("nnUNetv2_plan_experiment", "-d", "931", "-pl", planner, "-overwrite_plans_name", name)
        with open(os.path.join(base, name + ".json")) as handle:
            assert _comparable(json.load(handle)) == _comparable(em_plans), planner
    with open(os.path.join(base, "ThroughStockCLI.json")) as handle:
        assert json.load(handle)["em"] == em_plans["em"]

    trained = workspace.run("nnUNetv2_train", "931", "2d", "0", "-tr", "EMTrainer_tiny", "-p", PLANS, "-device",
                            TEST_DEVICE)
    assert "old nnU-Net default plans" not in trained.stdout
    fold = os.path.join(workspace.results, "Dataset931_ResEnc", f"EMTrainer_tiny__{PLANS}__2d", "fold_0")
    with open(os.path.join(fold, "em", "state.json")) as handle:
        assert len(json.load(handle)["rounds"]) == 2
    for round_index in (1, 2):
        assert os.path.isfile(os.path.join(fold, "em", f"round_{round_index:02d}", "cases.json"))
    weights = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu",
                         weights_only=False)["network_weights"]
    assert any(".stem." in key for key in weights)  # ResidualEncoderUNet's stem: the plans' architecture was built
