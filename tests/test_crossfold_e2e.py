"""``nnunetv2_em run`` on real Hippocampus cases, 2 folds x 2 rounds, on a real Dask LocalCluster (minutes on CPU).

The run is killed after its first fold has trained and started again; a second run while the first one works is
refused; unlabeled images (two in imagesTr without labels, one in an --unlabeled folder) get pseudo-labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TEST_DEVICE, NnUNetWorkspace, demo_cases, make_raw_dataset, tree_snapshot

from nnunetv2_em.demo import DEMO_DATA

pytestmark = pytest.mark.slow

DATASET_ID = 908
DATASET = "Dataset908_Hippo"
ALL = demo_cases(15)
LABELLED, IN_DATASET_UNLABELED, EXTRA_UNLABELED = ALL[:12], ALL[12:14], ALL[14:]
VERIFIED = LABELLED[:2]
RUN_NAME = "em_run__VanillaTrainer_tiny__nnUNetPlans__2d"
RUN = ["nnunetv2_em", "run", "-d", str(DATASET_ID), "-c", "2d", "--folds", "0", "1", "--rounds", "2", "--trainer",
       "VanillaTrainer_tiny", "--device", TEST_DEVICE, "--no-validation", "--keep-logits"]


def _sha(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _as_json(record) -> str:
    """A record as the case markers store it (keys as strings, sorted; NaN spelled out), for comparison."""
    return json.dumps(json.loads(json.dumps(record)), sort_keys=True)


def _wait_for(condition, process, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError("run ended early:\n" + process.stdout.read()[-4000:])
        time.sleep(0.5)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workspace = NnUNetWorkspace(str(tmp_path_factory.mktemp("crossfold")))
    folder = make_raw_dataset(workspace.raw, DATASET_ID, [*LABELLED, *IN_DATASET_UNLABELED])
    for case in IN_DATASET_UNLABELED:
        os.remove(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    extra = os.path.join(workspace.root, "extra_images")
    os.makedirs(extra)
    for case in EXTRA_UNLABELED:
        shutil.copy(os.path.join(DEMO_DATA, "imagesTr", f"{case}_0000.nii.gz"), extra)
    originals = {case: _sha(os.path.join(folder, "labelsTr", f"{case}.nii.gz")) for case in LABELLED}
    with open(os.path.join(folder, "em_verified_cases.json"), "w") as handle:
        json.dump({"cases": VERIFIED}, handle)  # checked by a person: never changed, and the precision gate's data
    raw_before = tree_snapshot(folder)

    workspace.run("nnunetv2_em", "plan", "-d", str(DATASET_ID), "-c", "2d")
    plans_file = os.path.join(workspace.preprocessed, DATASET, "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    # the tiny model must still refine
    plans["em"].update({"min_model_dice": 0.0, "mirroring": False, "max_ignored_share": 1.0,
                        "calibrate_temperature": False, "min_change_precision": 0.0, "second_opinion": "mirror"})
    with open(plans_file, "w") as handle:
        json.dump(plans, handle)

    run_folder = os.path.join(workspace.results, DATASET, "em_run__VanillaTrainer_tiny__nnUNetPlans__2d")
    fold0 = os.path.join(run_folder, "round_01", "nnUNet_results", DATASET, "VanillaTrainer_tiny__nnUNetPlans__2d",
                         "fold_0")
    command = [os.path.join(os.path.dirname(sys.executable), RUN[0]), *RUN[1:], "--unlabeled", extra]
    process = subprocess.Popen(command, env=workspace.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        _wait_for(lambda: os.path.isfile(os.path.join(run_folder, "run.json")), process)
        second = workspace.run(*RUN, "--unlabeled", extra, check=False)
        _wait_for(lambda: os.path.isfile(os.path.join(fold0, "em_mstep_done.json")), process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    fold0_checkpoint = (_sha(os.path.join(fold0, "checkpoint_final.pth")),
                        os.path.getmtime(os.path.join(fold0, "checkpoint_final.pth")))
    resumed = workspace.run(*RUN, "--unlabeled", extra)
    return {"workspace": workspace, "folder": folder, "extra": extra, "originals": originals, "second": second,
            "raw_before": raw_before,
            "resumed": resumed, "run_folder": run_folder, "fold0": fold0, "fold0_checkpoint": fold0_checkpoint}


def test_a_second_run_on_the_same_dataset_is_refused(finished_run):
    second = finished_run["second"]
    assert second.returncode == 2
    assert "already working on this dataset" in second.stderr


def test_kill_and_rerun_continues_without_redoing_finished_folds(finished_run):
    fold0 = os.path.join(finished_run["fold0"], "checkpoint_final.pth")
    assert (_sha(fold0), os.path.getmtime(fold0)) == finished_run["fold0_checkpoint"]
    with open(os.path.join(finished_run["run_folder"], "state.json")) as handle:
        state = json.load(handle)
    assert sorted(state["rounds"]) == ["1", "2"]
    for round_index in (1, 2):
        for fold in (0, 1):
            assert os.path.isfile(os.path.join(finished_run["run_folder"], f"round_{round_index:02d}",
                                               "nnUNet_results", DATASET, "VanillaTrainer_tiny__nnUNetPlans__2d",
                                               f"fold_{fold}", "em_mstep_done.json"))


def test_labels_are_versioned_and_the_originals_kept(finished_run):
    folder = finished_run["folder"]
    versions = os.path.join(folder, "em_labels")
    for case, digest in finished_run["originals"].items():
        assert _sha(os.path.join(versions, "round_00", "labelsTr", f"{case}.nii.gz")) == digest
    with open(os.path.join(versions, "active.json")) as handle:
        assert json.load(handle) == {"run": RUN_NAME, "round": 2, "data_identifier": "nnUNetPlans_2d"}
    every_case = sorted(f"{case}.nii.gz" for case in ALL)
    assert sorted(f for f in os.listdir(os.path.join(folder, "labelsTr")) if f.endswith(".nii.gz")) == every_case
    with open(os.path.join(folder, "labelsTr", ".nnunetv2_em_version.json")) as handle:
        assert {k: v for k, v in json.load(handle).items() if k in ("run", "round")} == {"run": RUN_NAME, "round": 2}
    for round_index in (1, 2):
        labels = os.path.join(versions, RUN_NAME, f"round_{round_index:02d}", "labelsTr")
        assert sorted(os.listdir(labels)) == every_case
        with open(os.path.join(versions, RUN_NAME, f"round_{round_index:02d}", "manifest.json")) as handle:
            manifest = json.load(handle)["cases"]
        assert {manifest[c]["provenance"] for c in LABELLED} == {"refined"}
        assert {manifest[c]["provenance"] for c in IN_DATASET_UNLABELED + EXTRA_UNLABELED} == {"pseudo"}
        for case, entry in manifest.items():
            assert _sha(os.path.join(labels, f"{case}.nii.gz")) == entry["sha256"]
    for case in ALL:  # labelsTr is the active round
        assert _sha(os.path.join(folder, "labelsTr", f"{case}.nii.gz")) == \
            _sha(os.path.join(versions, RUN_NAME, "round_02", "labelsTr", f"{case}.nii.gz"))
    # the pseudo-labelled images joined the dataset, which vanilla nnU-Net now accepts as it is
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == sorted(f"{c}_0000.nii.gz" for c in ALL)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=1)
    with open(os.path.join(finished_run["workspace"].preprocessed, DATASET, "splits_final.json")) as handle:
        splits = json.load(handle)
    for split in splits:
        assert set(IN_DATASET_UNLABELED + EXTRA_UNLABELED) <= set(split["train"])
        assert not set(IN_DATASET_UNLABELED + EXTRA_UNLABELED) & set(split["val"])


def test_every_case_was_judged_by_the_fold_that_did_not_train_on_it(finished_run):
    with open(os.path.join(finished_run["workspace"].preprocessed, DATASET, "splits_final.json")) as handle:
        splits = json.load(handle)
    for round_index in (1, 2):
        round_folder = os.path.join(finished_run["run_folder"], f"round_{round_index:02d}")
        with open(os.path.join(round_folder, "out_of_fold.json")) as handle:
            out_of_fold = json.load(handle)
        assert sorted(out_of_fold) == sorted(LABELLED)
        for fold in (0, 1):
            with open(os.path.join(round_folder, "logs", f"predict_fold_{fold}.json")) as handle:
                spec = json.load(handle)
            assert spec["folds"] == [fold]
            assert sorted(spec["cases"]) == sorted(c for c, f in out_of_fold.items() if f == fold)
            for case in spec["cases"]:
                assert case in splits[fold]["val"] and case not in splits[fold]["train"]
            # the model that predicted these cases was trained on exactly the other cases
            fold_folder = os.path.join(round_folder, "nnUNet_results", DATASET,
                                       "VanillaTrainer_tiny__nnUNetPlans__2d", f"fold_{fold}")
            log = "".join(open(os.path.join(fold_folder, f)).read() for f in os.listdir(fold_folder)
                          if f.startswith("training_log"))
            pseudo = set(IN_DATASET_UNLABELED + EXTRA_UNLABELED)
            trained_on = set(splits[fold]["train"]) - (pseudo if round_index == 1 else set())  # pseudo from round 2
            assert f"This split has {len(trained_on)} training and {len(splits[fold]['val'])} " \
                   f"validation cases" in log
        with open(os.path.join(round_folder, "logs", "predict_unlabeled.json")) as handle:
            spec = json.load(handle)
        assert spec["folds"] == [0, 1]
        assert sorted(spec["cases"]) == sorted(IN_DATASET_UNLABELED + EXTRA_UNLABELED)


def test_the_resumed_estep_matches_a_recomputation_from_the_same_logits(finished_run):
    from nnunetv2_em import crossfold, estep, storage

    workspace = finished_run["workspace"]
    preprocessed = os.path.join(workspace.preprocessed, DATASET)
    round_folder = os.path.join(finished_run["run_folder"], "round_02")
    with open(os.path.join(round_folder, "fit.json")) as handle:
        fit = json.load(handle)
    assert np.all(np.diff(fit["noise_model"]["trace"]) >= -1e-9)
    from nnunetv2_em.settings import EMSettings

    model = estep.NoiseModel.from_dict(fit["noise_model"])
    with open(os.path.join(preprocessed, "nnUNetPlans.json")) as handle:
        settings = EMSettings.resolve(json.load(handle)["em"], source="plans")
    assert settings.noise_model == "per_case"  # the default
    for case in LABELLED[:4]:
        logits = np.load(os.path.join(round_folder, "logits", f"{case}.npy")).astype(np.float32)
        original = storage.read_seg_b2nd(os.path.join(preprocessed, "em_labels", "round_00",
                                                      "nnUNetPlans_2d", f"{case}_seg.b2nd"))[0]
        mirrored = np.load(os.path.join(round_folder, "logits_mirrored", f"{case}.npy")).astype(np.float32)
        assert mirrored.shape == logits.shape and not np.array_equal(mirrored, logits)  # a second opinion
        expected, _ = estep.refine_case(logits, original, model, thresholds=settings.thresholds, ignore_label=3,
                                        apply=case not in VERIFIED,  # verified cases keep their labels
                                        allow_changes=fit["gate"]["changes_allowed"],
                                        case_prior_strength=settings.per_case_prior_strength,
                                        seed=estep.case_seed(settings.seed, 2, case), second_opinion=mirrored)
        staged = storage.read_seg_b2nd(os.path.join(preprocessed, "em_labels", RUN_NAME, "round_02",
                                                    "nnUNetPlans_2d", f"{case}_seg.b2nd"))[0]
        live = storage.read_seg_b2nd(os.path.join(preprocessed, "nnUNetPlans_2d", f"{case}_seg.b2nd"))[0]
        np.testing.assert_array_equal(staged, expected)
        np.testing.assert_array_equal(live, expected)
    assert crossfold.UNLABELED_FOLDER in os.listdir(preprocessed)


def test_both_drivers_give_the_same_case_results_through_the_one_estep(finished_run, tmp_path):
    """The run's and EMTrainer's inputs over equivalent files (the trainer's logits cache, original segmentations
    and exchange filled with what the run had) give the same round fit and the same labels and scores per case,
    which are the run's staged ones."""
    from types import SimpleNamespace

    from nnunetv2_em import storage
    from nnunetv2_em.crossfold.options import RunContext, RunOptions
    from nnunetv2_em.crossfold.tasks import RunCaseInputs
    from nnunetv2_em.estep.pipeline import EStep, EStepOptions, RoundDecision
    from nnunetv2_em.layout import RunLayout
    from nnunetv2_em.settings import EMSettings
    from nnunetv2_em.trainers.em_trainer import _TrainerCaseInputs
    from nnunetv2_em.trainers.fold_labels import FoldLabels

    workspace = finished_run["workspace"]
    preprocessed = os.path.join(workspace.preprocessed, DATASET)
    with open(os.path.join(preprocessed, "nnUNetPlans.json")) as handle:
        settings = EMSettings.resolve(json.load(handle)["em"], source="plans")
    layout = RunLayout(workspace.results, DATASET, "VanillaTrainer_tiny", "nnUNetPlans", "2d")
    context = RunContext(DATASET, finished_run["folder"], preprocessed, "nnUNetPlans_2d", ".nii.gz", layout,
                         RunOptions(str(DATASET_ID), "2d", (0, 1), trainer="VanillaTrainer_tiny"),
                         settings.to_plans_block())
    round_index = 2
    with open(layout.round_file(round_index, "out_of_fold.json")) as handle:
        cases = sorted(json.load(handle))
    with open(layout.round_file(round_index, "fit.json")) as handle:
        recorded = RoundDecision.from_dict(json.load(handle))
    staged = os.path.join(preprocessed, "em_labels", RUN_NAME, "round_{:02d}", "nnUNetPlans_2d", "{}_seg.b2nd")

    # the trainer's files: its float16 logits cache, a view of the originals, an exchange holding round 1
    originals = os.path.join(preprocessed, "em_labels", "round_00", "nnUNetPlans_2d")
    training_labels = storage.TrainingLabelFolder(originals, str(tmp_path / "training_labels"))
    exchange = storage.FoldExchange(str(tmp_path / "exchange"))
    cache = str(tmp_path / "logits_cache")
    os.makedirs(cache)
    for case in cases:
        shutil.copy(layout.logits_file(round_index, case), _TrainerCaseInputs.logits_file(cache, case))
        shutil.copy(layout.mirrored_logits_file(round_index, case),
                    _TrainerCaseInputs.logits_file(cache, case, mirrored=True))
        exchange.publish(0, round_index - 1, case, storage.read_seg_b2nd(staged.format(round_index - 1, case)),
                         original_seg_path=training_labels.original_seg_path(case), patch_size=(56, 40))
    trainer = SimpleNamespace(fold=0, configuration_manager=SimpleNamespace(data_identifier="nnUNetPlans_2d"))
    fold_labels = FoldLabels(trainer, training=training_labels, exchange=exchange, reviewed=None, reviewed_cases=[],
                             weak={})

    options = EStepOptions.from_settings(settings)
    assert options.second_opinion  # the fixture's plans ask for the mirrored second opinion
    steps = {name: EStep(options, inputs, num_classes=3, ignore_label=3, round_index=round_index) for name, inputs in
             (("run", RunCaseInputs(context, round_index)),
              ("trainer", _TrainerCaseInputs(fold_labels, cache, round_index)))}
    decisions = {name: step.fit(cases, verified=VERIFIED) for name, step in steps.items()}
    as_json = {name: json.dumps(decision.to_dict(), sort_keys=True) for name, decision in decisions.items()}
    assert as_json["run"] == as_json["trainer"]
    np.testing.assert_allclose(decisions["run"].model.transition, recorded.model.transition, rtol=0, atol=1e-12)
    assert decisions["run"].gate["changes_allowed"] == recorded.gate["changes_allowed"]
    for case in cases:
        results = {name: step.case(case, recorded) for name, step in steps.items()}
        np.testing.assert_array_equal(results["run"].labels, results["trainer"].labels)
        np.testing.assert_array_equal(results["run"].uncertainty, results["trainer"].uncertainty)
        # as JSON: scores may hold NaN (a class absent from the case), which never equals itself
        assert _as_json(results["run"].scores) == _as_json(results["trainer"].scores)
        np.testing.assert_array_equal(results["run"].labels,
                                      storage.read_seg_b2nd(staged.format(round_index, case))[0])
        with open(layout.case_file(round_index, case)) as handle:
            marker = json.load(handle)
        # the run's markers came from a Dask worker: sums there may round in another order (last digit)
        recorded_scores = {k: v for k, v in marker.items() if k not in ("case", "provenance")}
        recomputed = json.loads(_as_json(results["run"].scores))
        assert recorded_scores.keys() == recomputed.keys()
        for key, value in recomputed.items():
            assert recorded_scores[key] == (pytest.approx(value, rel=1e-9, nan_ok=True)
                                            if isinstance(value, float) else value), key


def test_reports_and_plots_are_written(finished_run):
    run_folder = finished_run["run_folder"]
    for name in ("summary.json", "summary.md", os.path.join("plots", "changed_voxels.png"),
                 os.path.join("plots", "likelihood.png"), os.path.join("plots", "scores.png")):
        assert os.path.getsize(os.path.join(run_folder, name)) > 0
    with open(os.path.join(run_folder, "summary.md")) as handle:
        table = handle.read()
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1
    with open(os.path.join(run_folder, "round_02", "cases.json")) as handle:
        ranked = json.load(handle)
    assert sorted(r["case"] for r in ranked) == sorted(ALL)
    assert [r["review_score"] for r in ranked] == sorted((r["review_score"] for r in ranked), reverse=True)
    # which unlabeled cases to annotate next, per round, from the round's networks
    for round_folder in ("round_01", "round_02"):
        with open(os.path.join(run_folder, round_folder, "unlabeled_ranking.json")) as handle:
            ranking = json.load(handle)
        assert sorted(row["case"] for row in ranking["cases"]) == sorted([*IN_DATASET_UNLABELED, *EXTRA_UNLABELED])
        for strategy in ranking["strategies"]:
            assert sorted(row[f"rank_{strategy}"] for row in ranking["cases"]) == [1, 2, 3]
        assert all(row["examine_score"] >= 1.0 for row in ranking["cases"])


def test_running_a_finished_run_again_changes_nothing(finished_run):
    workspace = finished_run["workspace"]
    before = tree_snapshot(workspace.root)
    workspace.run(*RUN, "--unlabeled", finished_run["extra"])
    after = tree_snapshot(workspace.root)
    from nnunetv2_em import storage

    lock = os.path.join("raw", DATASET + storage.LOCK_SUFFIX)  # kept for good, emptied on release
    assert {k: v for k, v in after.items() if k != lock} == {k: v for k, v in before.items() if k != lock}


def test_status_and_restore_to_the_originals_and_back(finished_run):
    workspace, folder = finished_run["workspace"], finished_run["folder"]
    status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert f"labelsTr: round 2 of run {RUN_NAME}, {len(ALL)} files, checksums match" in status
    assert "originals (em_labels/round_00): intact" in status and "rounds [1, 2] done" in status
    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "0")
    after = {k: v for k, v in tree_snapshot(folder).items() if not k.startswith("em_labels")}
    assert after == finished_run["raw_before"]  # byte-identical: labels, images, dataset.json
    status = workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    assert "labelsTr: round 0 (the original annotations)" in status and "checksums match" in status
    with open(os.path.join(workspace.preprocessed, DATASET, "splits_final.json")) as handle:
        splits = json.load(handle)
    assert not set(EXTRA_UNLABELED) & {case for split in splits for case in split["train"]}
    # a rerun of the finished run says what labelsTr really holds, and changes nothing
    rerun = workspace.run(*RUN, "--unlabeled", finished_run["extra"])
    assert "labelsTr holds round 0 (the original annotations)" in rerun.stdout
    workspace.run("nnunetv2_em", "restore", "-d", str(DATASET_ID), "--round", "2")
    assert "checksums match" in workspace.run("nnunetv2_em", "status", "-d", str(DATASET_ID)).stdout
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=1)


def test_verified_cases_are_never_changed_and_gate_the_round_by_estimated_precision(finished_run):
    versions = os.path.join(finished_run["folder"], "em_labels")
    for round_index in (1, 2):
        round_folder = os.path.join(finished_run["run_folder"], f"round_{round_index:02d}")
        with open(os.path.join(round_folder, "fit.json")) as handle:
            fit = json.load(handle)
        assert fit["verified"] == VERIFIED and fit["gate"]["kind"] == "precision"
        assert fit["gate"]["verified_cases"] == len(VERIFIED)
        assert 0.0 <= fit["gate"]["lower_bound"] <= fit["gate"]["precision"] <= 1.0
        assert fit["refine"]  # min_change_precision 0: open whenever something would change
        labels = os.path.join(versions, RUN_NAME, f"round_{round_index:02d}", "labelsTr")
        with open(os.path.join(versions, RUN_NAME, f"round_{round_index:02d}", "manifest.json")) as handle:
            manifest = json.load(handle)["cases"]
        for case in VERIFIED:  # rewritten like every case of a round, with the original's voxels
            np.testing.assert_array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels, f"{case}.nii.gz"))),
                sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(versions, "round_00", "labelsTr",
                                                                   f"{case}.nii.gz"))))
            assert manifest[case]["voxels_changed"] == manifest[case]["voxels_ignored"] == 0
        assert sum(manifest[c]["voxels_changed"] + manifest[c]["voxels_ignored"] for c in LABELLED) > 0
