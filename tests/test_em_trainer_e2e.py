"""End to end through nnU-Net's stock CLIs on real Hippocampus MRI (EMTrainer_tiny: minutes on 2 CPU cores).

One module-scoped workspace: plan with ``-pl EMPlanner``, train ``-tr EMTrainer_tiny``, predict, then the
resume and bad-input scenarios on the same preprocessed data.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TEST_DEVICE, NnUNetWorkspace, demo_cases, make_raw_dataset, tree_snapshot

pytestmark = pytest.mark.slow

DATASET_ID = 905
DATASET = "Dataset905_Hippo"
CASES = demo_cases(12)
TRAINER_DIR = "EMTrainer_tiny__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> NnUNetWorkspace:
    workspace = NnUNetWorkspace(str(tmp_path_factory.mktemp("e2e")))
    make_raw_dataset(workspace.raw, DATASET_ID, CASES)
    workspace.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "EMPlanner", "-c", "3d_fullres",
                  "-np", "2", "-npfp", "2")
    return workspace


@pytest.fixture(scope="module")
def trained(planned) -> NnUNetWorkspace:
    raw_before = tree_snapshot(os.path.join(planned.raw, DATASET))
    preprocessed_before = _original_preprocessed_snapshot(planned)
    planned.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE)
    planned.raw_before, planned.preprocessed_before = raw_before, preprocessed_before
    return planned


def _original_preprocessed_snapshot(workspace):
    base = os.path.join(workspace.preprocessed, DATASET)
    return {name: snap for name, snap in tree_snapshot(base).items()
            if name.startswith(("nnUNetPlans_3d_fullres/", "gt_segmentations/"))}


def _fold_folder(workspace, trainer_dir=TRAINER_DIR):
    return os.path.join(workspace.results, DATASET, trainer_dir, "fold_0")


def test_planning_makes_the_dataset_em_ready(planned):
    base = os.path.join(planned.preprocessed, DATASET)
    with open(os.path.join(base, "nnUNetPlans.json")) as handle:
        plans = json.load(handle)
    assert plans["experiment_planner_used"] == "EMPlanner"
    assert plans["em"]["rounds"] == 5 and plans["em"]["epochs_per_round"] == 200
    # the ignore label reaches training through the preprocessed dataset.json; the raw one is untouched
    with open(os.path.join(base, "dataset.json")) as handle:
        assert json.load(handle)["labels"]["ignore"] == 3
    with open(os.path.join(planned.raw, DATASET, "dataset.json")) as handle:
        assert "ignore" not in json.load(handle)["labels"]
    properties = np.load(os.path.join(base, "nnUNetPlans_3d_fullres", f"{CASES[0]}.pkl"), allow_pickle=True)
    assert (-1, 0, 1, 2) in properties["class_locations"]


def test_em_planner_plans_exactly_like_the_default_planner_and_other_plans_still_train(workspace):
    make_raw_dataset(workspace.raw, 906, CASES, name="Other")
    workspace.run("nnUNetv2_extract_fingerprint", "-d", "906", "-np", "2")
    workspace.run("nnUNetv2_plan_experiment", "-d", "906", "-pl", "EMPlanner")
    base = os.path.join(workspace.preprocessed, "Dataset906_Other")
    with open(os.path.join(base, "nnUNetPlans.json")) as handle:
        em_plans = json.load(handle)
    workspace.run("nnUNetv2_plan_and_preprocess", "-d", "906", "-overwrite_plans_name", "DefaultPlans", "-c",
                  "3d_fullres", "-np", "2", "-npfp", "2")
    with open(os.path.join(base, "DefaultPlans.json")) as handle:
        default_plans = json.load(handle)
    em_plans.pop("em")
    assert em_plans.pop("experiment_planner_used") == "EMPlanner"
    assert default_plans.pop("experiment_planner_used") == "ExperimentPlanner"
    for plans in (em_plans, default_plans):
        plans.pop("plans_name")
        for configuration in plans["configurations"].values():
            configuration.pop("data_identifier", None)
    assert em_plans == default_plans

    # the default planner's plans: no em block, no ignore label in dataset.json -> EMTrainer uses its defaults
    with open(os.path.join(base, "dataset.json")) as handle:
        assert "ignore" not in json.load(handle)["labels"]
    # two cases a person checked: EMTrainer never changes them and gates each round by estimated precision; only
    # the held-out one counts (a network never judges the cases it trained on, verified or not)
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    first_fold = generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)[0]
    verified = [sorted(first_fold["val"])[0], sorted(first_fold["train"])[0]]
    with open(os.path.join(workspace.raw, "Dataset906_Other", "em_verified_cases.json"), "w") as handle:
        json.dump(verified, handle)
    workspace.run("nnUNetv2_train", "906", "3d_fullres", "0", "-tr", "EMTrainer_tiny", "-p", "DefaultPlans",
                  "-device", TEST_DEVICE)
    fold = os.path.join(workspace.results, "Dataset906_Other", "EMTrainer_tiny__DefaultPlans__3d_fullres", "fold_0")
    with open(os.path.join(fold, "em", "state.json")) as handle:
        assert len(json.load(handle)["rounds"]) == 2
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    with open(os.path.join(base, "splits_final.json")) as handle:
        assert json.load(handle)[0] == first_fold
    for round_index in (1, 2):
        with open(os.path.join(fold, "em", f"round_{round_index:02d}", "summary.json")) as handle:
            summary = json.load(handle)
        assert summary["verified"] == verified[:1]
        assert summary["gate"]["kind"] == "precision"
        assert summary["gate"]["min_change_precision"] == 0.8
        assert summary["refinement_applied"]  # EMTrainer_tiny: no model-Dice floor
        assert summary["gate"]["changes_allowed"] == (summary["gate"]["lower_bound"] >= 0.8)
        if not summary["gate"]["changes_allowed"]:
            assert summary["voxels_changed"] == 0
        with open(os.path.join(fold, "em", f"round_{round_index:02d}", "cases.json")) as handle:
            rows = {row["case"]: row for row in json.load(handle)}
        assert rows[verified[0]]["voxels_changed"] == rows[verified[0]]["voxels_ignored"] == 0
        assert verified[1] not in rows


def test_training_runs_every_round_and_writes_its_outputs(trained):
    fold = _fold_folder(trained)
    with open(os.path.join(fold, "em", "state.json")) as handle:
        state = json.load(handle)
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    with open(os.path.join(trained.preprocessed, DATASET, "splits_final.json")) as handle:
        split = json.load(handle)[0]
    assert state["training_cases"] == sorted(split["train"])
    for round_index in (1, 2):
        round_folder = os.path.join(fold, "em", f"round_{round_index:02d}")
        with open(os.path.join(round_folder, "summary.json")) as handle:
            summary = json.load(handle)
        trace = summary["noise_model"]["trace"]
        assert np.all(np.diff(trace) >= -1e-9), "the marginal likelihood decreased during the fit"
        # judged: the validation cases only, never a case the network trained on
        assert summary["judged_cases"] == sorted(split["val"]) and summary["cases"] == len(split["val"])
        assert not set(summary["judged_cases"]) & set(split["train"])
        transition = np.asarray(summary["noise_model"]["transition"])
        np.testing.assert_allclose(transition.sum(axis=1), 1.0, atol=1e-6)
        # a complete labelsTr: every case of the dataset; the first fold trained has no other fold's refinements,
        # so its training cases are byte-identical to the originals
        assert summary["exchanged_cases"] == {}
        labels = os.path.join(round_folder, "labelsTr")
        assert sorted(os.listdir(labels)) == sorted(f"{c}.nii.gz" for c in CASES)
        for case in split["train"]:
            with open(os.path.join(labels, f"{case}.nii.gz"), "rb") as a, \
                    open(os.path.join(trained.raw, DATASET, "labelsTr", f"{case}.nii.gz"), "rb") as b:
                assert a.read() == b.read()
        with open(os.path.join(round_folder, "cases.csv")) as handle:
            rows = list(csv.DictReader(handle))
        assert sorted(r["case"] for r in rows) == sorted(split["val"])
        scores = [float(r["review_score"]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
        with open(os.path.join(round_folder, "cases.json")) as handle:
            assert [r["case"] for r in json.load(handle)] == [r["case"] for r in rows]
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    with open(os.path.join(fold, os.pardir, "dataset.json")) as handle:
        assert json.load(handle)["labels"]["ignore"] == 3
    log = "".join(open(os.path.join(fold, f)).read() for f in os.listdir(fold) if f.startswith("training_log"))
    assert "EM round 1: log-likelihood" in log and "EM round 2: log-likelihood" in log


def _split(workspace, fold):
    with open(os.path.join(workspace.preprocessed, DATASET, "splits_final.json")) as handle:
        return json.load(handle)[fold]


def _exchange_folder(workspace, fold, round_index):
    return os.path.join(workspace.preprocessed, DATASET, "em_training_labels", TRAINER_DIR, "exchange",
                        f"fold_{fold}", f"round_{round_index:02d}")


def _original_seg(workspace, case):
    return blosc2.open(os.path.join(workspace.preprocessed, DATASET, "nnUNetPlans_3d_fullres", f"{case}_seg.b2nd"))[:]


def test_refinements_of_held_out_cases_go_to_the_exchange_and_the_originals_stay(trained):
    fold = _fold_folder(trained)
    work = os.path.join(trained.preprocessed, DATASET, "em_training_labels", TRAINER_DIR, "fold_0")
    split = _split(trained, 0)
    with open(os.path.join(fold, "em", "round_02", "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["voxels_changed"] + summary["voxels_ignored"] > 0, "the tiny run should refine something"
    for round_index in (1, 2):
        published = sorted(name.removesuffix(".json") for name in os.listdir(_exchange_folder(trained, 0, round_index))
                           if name.endswith(".json"))
        assert published == sorted(split["val"])
    changed_cases = 0
    for case in split["val"]:
        refined = blosc2.open(os.path.join(_exchange_folder(trained, 0, 2), f"{case}_seg.b2nd"))[:]
        original = _original_seg(trained, case)
        assert refined.shape == original.shape
        np.testing.assert_array_equal(refined == -1, original == -1)  # outside-mask voxels are never touched
        assert set(np.unique(refined)) <= {-1, 0, 1, 2, 3}
        changed_cases += int(np.any(refined != original))
        # the raw-space export carries the same refinement (no resampling for Hippocampus)
        exported = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(fold, "em", "round_02", "labelsTr",
                                                                      f"{case}.nii.gz")))
        assert np.count_nonzero(exported == 3) == np.count_nonzero(refined == 3)
    assert changed_cases > 0
    for case in split["train"]:  # no other fold has refined them yet
        assert os.path.islink(os.path.join(work, f"{case}_seg.b2nd"))
    # nothing nnU-Net owns was written: raw data, preprocessed originals, validation reference
    assert tree_snapshot(os.path.join(trained.raw, DATASET)) == trained.raw_before
    assert _original_preprocessed_snapshot(trained) == trained.preprocessed_before
    from nnunetv2_em import storage
    with open(os.path.join(fold, "em", "originals.json")) as handle:
        assert storage.changed_files(json.load(handle)) == []


def test_a_second_fold_trains_on_the_first_folds_out_of_fold_refinements(trained):
    trained.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "1", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE)
    first, second = _split(trained, 0), _split(trained, 1)
    work = os.path.join(trained.preprocessed, DATASET, "em_training_labels", TRAINER_DIR, "fold_1")
    fold = _fold_folder(trained).replace("fold_0", "fold_1")
    taken = sorted(set(first["val"]) & set(second["train"]))
    assert taken == sorted(first["val"])
    for round_index in (1, 2):
        with open(os.path.join(fold, "em", f"round_{round_index:02d}", "summary.json")) as handle:
            summary = json.load(handle)
        assert summary["judged_cases"] == sorted(second["val"])
        assert not set(summary["judged_cases"]) & set(second["train"])
        assert summary["exchanged_cases"] == {case: {"fold": 0, "round": 2} for case in taken}
    for case in second["train"]:
        seg_path = os.path.join(work, f"{case}_seg.b2nd")
        if case not in taken:
            assert os.path.islink(seg_path)
            continue
        assert not os.path.islink(seg_path)
        trained_on = blosc2.open(seg_path)[:]
        np.testing.assert_array_equal(trained_on,
                                      blosc2.open(os.path.join(_exchange_folder(trained, 0, 2), f"{case}_seg.b2nd"))[:])
        properties = np.load(os.path.join(work, f"{case}.pkl"), allow_pickle=True)  # recomputed for the refinement
        assert set(properties["class_locations"]) == {1, 2, (-1, 0, 1, 2)}
        for key, locations in properties["class_locations"].items():
            if len(locations):
                values = trained_on[tuple(np.asarray(locations).T)]
                wanted = set(key) if isinstance(key, tuple) else {key}
                assert set(np.unique(values)) <= wanted
    published = sorted(name.removesuffix(".json") for name in os.listdir(_exchange_folder(trained, 1, 2))
                       if name.endswith(".json"))
    assert published == sorted(second["val"])
    assert tree_snapshot(os.path.join(trained.raw, DATASET)) == trained.raw_before
    assert _original_preprocessed_snapshot(trained) == trained.preprocessed_before


def test_stock_predict_uses_the_em_trainer(trained, tmp_path):
    source = os.path.join(trained.raw, DATASET, "imagesTr")
    images = tmp_path / "images"
    images.mkdir()
    for case in CASES[:2]:
        os.symlink(os.path.join(source, f"{case}_0000.nii.gz"), images / f"{case}_0000.nii.gz")
    out = tmp_path / "out"
    trained.run("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
                "-f", "0", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE, "--disable_tta", "-npp", "1", "-nps", "1")
    for case in CASES[:2]:
        prediction = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        reference = sitk.ReadImage(os.path.join(source, f"{case}_0000.nii.gz"))
        assert prediction.GetSize() == reference.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}


def test_builtin_trainer_still_works_with_the_plugin_installed(planned):
    planned.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "VanillaTrainer_tiny", "-device",
                TEST_DEVICE, "--disable_checkpointing")
    lookup = planned.run(sys.executable.rsplit("/", 1)[-1], "-c",
                         "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
                         "print(f('nnUNetTrainer_5epochs').__module__)")
    assert lookup.stdout.strip().endswith("nnunetv2.training.nnUNetTrainer.variants.training_length."
                                          "nnUNetTrainer_Xepochs")


def _kill_when(process, condition, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError("training ended before the kill point:\n" + process.stdout.read()[-3000:])
        if condition():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("kill point not reached")


@pytest.mark.parametrize("kill_point", ["estep", "mstep"])
def test_resume_after_a_kill_continues_and_keeps_the_originals(planned, kill_point):
    trainer = "EMTrainer_tiny"
    fold = _fold_folder(planned)
    env = {**planned.env}
    command = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0",
               "-tr", trainer, "-device", TEST_DEVICE]
    raw_before = tree_snapshot(os.path.join(planned.raw, DATASET))
    preprocessed_before = _original_preprocessed_snapshot(planned)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    cache = os.path.join(fold, "em", "logits_cache")
    if kill_point == "estep":  # in the middle of round 1's E-step: some cases predicted, none refined yet
        _kill_when(process, lambda: os.path.isdir(cache) and len(os.listdir(cache)) >= 3)
    else:  # in round 2's M-step: round 1 complete
        _kill_when(process, lambda: os.path.isfile(os.path.join(fold, "em", "round_01", "summary.json"))
                   and not os.path.isdir(cache))
    resumed = planned.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", TEST_DEVICE,
                          "--c")
    if kill_point == "estep":
        assert "resuming the interrupted E-step of round 1" in resumed.stdout
    with open(os.path.join(fold, "em", "state.json")) as handle:
        state = json.load(handle)
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert not os.path.isdir(cache)
    for round_index in (1, 2):
        assert len(os.listdir(os.path.join(fold, "em", f"round_{round_index:02d}", "labelsTr"))) == len(CASES)
    assert tree_snapshot(os.path.join(planned.raw, DATASET)) == raw_before
    assert _original_preprocessed_snapshot(planned) == preprocessed_before


@pytest.mark.parametrize("key, value", [("change_threshold", 0.3),  # impossible
                                        ("soft_targets", 4)])  # possible for `run`, refused by EMTrainer
def test_impossible_em_settings_fail_cleanly_through_the_stock_cli(planned, key, value):
    plans_file = os.path.join(planned.preprocessed, DATASET, "nnUNetPlans.json")
    with open(plans_file) as handle:
        original = handle.read()
    plans = json.loads(original)
    plans["em"][key] = value
    with open(plans_file, "w") as handle:
        json.dump(plans, handle)
    try:
        before = tree_snapshot(planned.root)
        result = planned.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "1", "-tr", "EMTrainer", "-device",
                             TEST_DEVICE, check=False)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("nnunetv2_em: error:")]
        assert len(error_lines) == 1
        assert f"em.{key}" in error_lines[0] and plans_file in error_lines[0] and "Fix:" in error_lines[0]
        assert tree_snapshot(planned.root) == before
    finally:
        with open(plans_file, "w") as handle:
            handle.write(original)


def test_missing_results_variable_fails_cleanly(planned):
    env = {key: value for key, value in planned.env.items() if key != "nnUNet_results"}
    before = tree_snapshot(planned.root)
    result = planned.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "1", "-tr", "EMTrainer", "-device",
                         TEST_DEVICE, check=False, env=env)
    assert result.returncode != 0
    assert "nnUNet_results" in result.stderr
    assert tree_snapshot(planned.root) == before


def test_fold_all_judges_nothing_and_trains_on_every_folds_refinements(trained):
    trained.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "all", "-tr", "EMTrainer_tiny", "-device", TEST_DEVICE)
    fold = _fold_folder(trained).replace("fold_0", "fold_all")
    published = {}
    for source in (0, 1):
        folder = os.path.join(trained.preprocessed, DATASET, "em_training_labels", TRAINER_DIR, "exchange",
                              f"fold_{source}")
        if os.path.isdir(folder):
            published.update({name.removesuffix(".json"): source for name in os.listdir(os.path.join(folder,
                                                                                                       "round_02"))
                              if name.endswith(".json")})
    assert published  # fold 0 ran before (and fold 1 when the module ran in order)
    for round_index in (1, 2):
        with open(os.path.join(fold, "em", f"round_{round_index:02d}", "summary.json")) as handle:
            summary = json.load(handle)
        assert summary["judged_cases"] == [] and not summary["refinement_applied"]
        assert summary["exchanged_cases"] == {case: {"fold": source, "round": 2} for case, source in published.items()}
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
