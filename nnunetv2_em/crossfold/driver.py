"""The driver of ``nnunetv2_em run``: checks everything up front, then executes or continues the rounds."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from nnunetv2_em import checks, engine, estep, label_conventions, multi_rater, reports, storage, weak_labels
from nnunetv2_em.crossfold import preflight
from nnunetv2_em.crossfold.options import RunContext, RunOptions
from nnunetv2_em.crossfold.tasks import (
    RunCaseInputs,
    estep_for_round,
    load_logits,
    managers,
    task_predict,
    task_preprocess_ratings,
    task_preprocess_unlabeled,
    task_refine,
    task_train,
)
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.layout import RunLayout
from nnunetv2_em.settings import PLANS_KEY, EMSettings


class CrossFoldRun:
    """Resolves and checks everything up front; ``run(client)`` executes or continues the rounds."""

    def __init__(self, options: RunOptions):
        from nnunetv2_em.planning import dataset_name

        paths = checks.require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
        self.options = options
        self.name = dataset_name(options.dataset)
        raw = os.path.join(paths["nnUNet_raw"], self.name)
        preprocessed = os.path.join(paths["nnUNet_preprocessed"], self.name)
        preflight.check_options(options)
        self.layout = RunLayout(paths["nnUNet_results"], self.name, options.trainer, options.plans,
                                options.configuration)
        checks.guard_label_versions(raw, self.name, continuing_run=self.run_name)
        self.labelled, self.unlabeled_in_dataset = preflight.raw_cases(raw)
        self.verified = checks.load_verified_cases(raw, self.labelled)
        self.reviewed: list[str] = []  # cases with reviewed labels (nnunetv2_em review import), found in run()
        self.weak = weak_labels.load_weak_labels(raw, checks.load_dataset_json(os.path.join(raw, "dataset.json")),
                                                 labelled=self.labelled,
                                                 images=[*self.labelled, *self.unlabeled_in_dataset])
        self.raters = multi_rater.load_raters(raw, checks.load_dataset_json(os.path.join(raw, "dataset.json")),
                                              self.labelled)
        preflight.check_folds(preprocessed, options.folds, labelled=len(self.labelled), dataset=self.name)
        self.extra_unlabeled = preflight.extra_unlabeled(options.unlabeled, raw, labelled=self.labelled)
        preflight.check_trainer(options.trainer)
        versions_folder = os.path.join(raw, storage.EM_LABELS)
        for folder in (versions_folder if os.path.lexists(versions_folder) else raw, paths["nnUNet_preprocessed"],
                       paths["nnUNet_results"]):
            if os.path.lexists(folder):
                checks.check_writable(folder)
        self.raw, self.preprocessed = raw, preprocessed

    @property
    def run_name(self) -> str:
        return self.layout.name

    # context ------------------------------------------------------------------------------------------------
    def _ensure_planned(self) -> None:
        from nnunetv2_em.planning import plan_and_preprocess

        plans_file = os.path.join(self.preprocessed, self.options.plans + ".json")
        if os.path.isfile(plans_file):
            with open(plans_file) as handle:
                plans = json.load(handle)
            configuration = plans["configurations"].get(self.options.configuration)
            if configuration is None:
                raise EMInputError(f"{plans_file}: no configuration '{self.options.configuration}'. Fix: pick one of "
                                   f"{sorted(plans['configurations'])}.")
            identifier = configuration.get("data_identifier",
                                           f"{self.options.plans}_{self.options.configuration}")
            if os.path.isdir(os.path.join(self.preprocessed, identifier)):
                return
        if self.options.plans != "nnUNetPlans":
            raise EMInputError(f"{plans_file}: plans or preprocessed data missing. Fix: plan and preprocess the "
                               f"dataset with these plans first.")
        print(f"{self.name}: planning (EMPlanner) and preprocessing {self.options.configuration} ...", flush=True)
        plan_and_preprocess(self.name, configurations=[self.options.configuration],
                            num_processes=self.options.num_processes)

    def _context(self) -> RunContext:
        with open(os.path.join(self.preprocessed, self.options.plans + ".json")) as handle:
            plans = json.load(handle)
        configuration = plans["configurations"][self.options.configuration]
        identifier = configuration.get("data_identifier", f"{self.options.plans}_{self.options.configuration}")
        settings = EMSettings.resolve(plans.get(PLANS_KEY),
                                      {"rounds": self.options.rounds} if self.options.rounds else None,
                                      source=os.path.join(self.preprocessed, self.options.plans + ".json"))
        dataset_json = checks.load_dataset_json(os.path.join(self.raw, "dataset.json"))
        raters = () if self.raters is None else tuple(
            (rater, tuple(sorted(self.raters.files[rater].items()))) for rater in self.raters.raters)
        return RunContext(self.name, self.raw, self.preprocessed, identifier, dataset_json["file_ending"],
                          self.layout, self.options, settings.to_plans_block(), tuple(sorted(self.weak.items())),
                          raters)

    def locked(self):
        """Hold the dataset's run lock (released when the process ends, however it ends)."""
        return storage.dataset_lock(self.raw, self.preprocessed)

    def _check_identity(self, *, write: bool) -> None:
        path = self.layout.file("run.json")
        identity = self.options.identity()
        identity["folds"] = list(identity["folds"])
        if os.path.isfile(path):
            with open(path) as handle:
                previous = json.load(handle)
            if previous != identity:
                raise EMInputError(f"{path}: this run was started with {previous}, now {identity}. Fix: use the same "
                                   f"options to continue it, or move that folder away to start a new run.")
        elif write:
            os.makedirs(self.layout.folder, exist_ok=True)
            storage.write_json(path, identity)

    # the loop -----------------------------------------------------------------------------------------------
    def run(self, client) -> dict:
        """Execute or continue the rounds; call inside ``locked()``."""
        storage.recover_activation(self.raw, self.preprocessed)
        checks.guard_label_versions(self.raw, self.name, continuing_run=self.run_name)
        self._check_identity(write=False)
        self._ensure_planned()
        context = self._context()
        split = self._ensure_split(context)
        self._check_identity(write=True)  # only now: a run refused above leaves nothing behind
        storage.fault_point("run_started")
        versions = context.versions()
        versions.keep_originals(self.labelled)
        changed = versions.changed_originals()
        if changed:
            raise EMInputError(f"{versions.root}/round_00: original labels changed ({changed[:3]}). Fix: "
                               f"restore them from a backup; nothing was modified.")
        unlabeled = {**{c: e["images"] for c, e in self.unlabeled_in_dataset.items()}, **self.extra_unlabeled}
        self._preprocess_unlabeled(client, context, unlabeled)
        if context.raters:
            futures = [client.submit(task_preprocess_ratings, context, case, self.labelled[case]["images"], pure=False)
                       for case in self.raters.cases()]
            _wait(client, futures, f"preprocessing the raters' labels of {len(futures)} case(s)")
        self.reviewed = self._ensure_reviewed(context)
        state = self._load_state()
        for round_index in range(1, context.em.rounds + 1):
            if state["converged"]:
                break
            if str(round_index) in state["rounds"]:
                continue
            summary = self._run_round(client, context, round_index, split, unlabeled)
            state["rounds"][str(round_index)] = summary
            state["converged"] = bool(summary["converged"])
            storage.write_json(self.layout.file("state.json"), state)
            storage.fault_point("state_written")
            reports.write_run_summary(self.layout.folder, state)
            if not context.options.keep_logits:  # only now: a rerun before this point still finds them
                shutil.rmtree(context.layout.logits_folder(round_index), ignore_errors=True)
                shutil.rmtree(context.layout.mirrored_logits_folder(round_index), ignore_errors=True)
        return {**state, "active": versions.active()}

    def _load_state(self) -> dict:
        path = self.layout.file("state.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        return {"dataset": self.name, "rounds": {}, "converged": False}

    def _ensure_reviewed(self, context: RunContext) -> list[str]:
        """Labelled cases a person reviewed (``nnunetv2_em review import``), with their preprocessed segmentation
        for this configuration (made once from the reviewed label file; images are not preprocessed again)."""
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        store = context.reviewed_labels()
        reviewed = sorted(case for case in store.records() if case in self.labelled)
        missing = [case for case in reviewed if not store.has_segmentation(case, context.data_identifier)]
        if missing:
            plans_manager, configuration_manager, dataset_json = managers(context)
            images = get_filenames_of_train_images_and_targets(self.raw, dataset_json)
            for case in missing:
                store.make_segmentation(case, images[case]["images"], plans_manager, configuration_manager,
                                        dataset_json)
        return reviewed

    def _ensure_split(self, context: RunContext) -> list[dict]:
        """nnU-Net's splits_final.json: created with one split per requested fold when missing."""
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        path = os.path.join(self.preprocessed, "splits_final.json")
        if os.path.isfile(path):
            with open(path) as handle:
                splits = json.load(handle)
        else:
            splits = generate_crossval_split(sorted(self.labelled), seed=12345, n_splits=len(self.options.folds))
            storage.write_json(path, splits)
        if max(self.options.folds) >= len(splits):
            raise EMInputError(f"{path}: has {len(splits)} splits, fold {max(self.options.folds)} requested. Fix: "
                               f"pick folds below {len(splits)}.")
        return splits

    def _preprocess_unlabeled(self, client, context, unlabeled: dict[str, list[str]]) -> None:
        if unlabeled:
            futures = [client.submit(task_preprocess_unlabeled, context, case, images, pure=False)
                       for case, images in sorted(unlabeled.items())]
            _wait(client, futures, f"preprocessing {len(futures)} unlabeled case(s)")

    def _run_round(self, client, context: RunContext, round_index: int, split: list[dict],
                   unlabeled: dict[str, list[str]]) -> dict:
        started = time.time()
        folds = list(self.options.folds)
        print(f"\nround {round_index}: M-step ({len(folds)} folds, trainer {self.options.trainer})", flush=True)
        trainings = [client.submit(task_train, context, round_index, fold, resources={engine.DEVICE: 1}, pure=False)
                     for fold in folds]
        _wait(client, trainings, "training folds", fault="fold_trained")
        trained = time.time()

        # out-of-fold: each labelled case from the fold that had it in validation
        out_of_fold = {case: fold for fold in folds for case in split[fold]["val"] if case in self.labelled}
        versions = context.versions()
        live = versions.live_data_folder()
        predictions = [client.submit(task_predict, context, round_index, [fold],
                                     {case: live for case, f in out_of_fold.items() if f == fold}, f"fold_{fold}",
                                     resources={engine.DEVICE: 1}, pure=False) for fold in folds]
        if context.em.second_opinion == "mirror":
            predictions += [client.submit(task_predict, context, round_index, [fold],
                                          {case: live for case, f in out_of_fold.items() if f == fold},
                                          f"fold_{fold}_mirrored", mirrored=True, resources={engine.DEVICE: 1},
                                          pure=False) for fold in folds]
        if unlabeled:
            predictions.append(client.submit(task_predict, context, round_index, folds,
                                             {case: context.unlabeled_folder() for case in unlabeled}, "unlabeled",
                                             embeddings=True, resources={engine.DEVICE: 1}, pure=False))
        _wait(client, predictions, "predicting out-of-fold")
        predicted = time.time()
        storage.write_json(context.layout.round_file(round_index, "out_of_fold.json"), out_of_fold)

        fit = self._fit(context, round_index, sorted(out_of_fold))
        kinds = {**{case: storage.REVIEWED if case in self.reviewed else storage.REFINED
                    for case in out_of_fold},
                 **{case: storage.PSEUDO for case in unlabeled}}
        refinements = [client.submit(task_refine, context, round_index, case, kind, pure=False)
                       for case, kind in sorted(kinds.items())]
        _wait(client, refinements, "E-step per case", fault="estep_case")
        refined = time.time()
        return self._finish_round(context, round_index, fit, kinds, split, unlabeled,
                                  timings={"seconds_training": trained - started,
                                           "seconds_prediction": predicted - trained,
                                           "seconds_estep": refined - predicted})

    def _fit(self, context: RunContext, round_index: int, cases: list[str]) -> dict:
        path = context.layout.round_file(round_index, "fit.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        _, _, dataset_json = managers(context)
        started = time.time()
        # with verified cases (checked annotations, reviewed cases drawn at random) the precision gate decides
        audited = [case for case in context.reviewed_labels().audited() if case in self.reviewed]
        inputs = RunCaseInputs(context, round_index, reviewed=self.reviewed)
        decision = estep_for_round(context, round_index, inputs, dataset_json).fit(
            cases, verified=[*self.verified, *audited])
        for note in decision.notes():
            print(f"round {round_index}: {note}", flush=True)
        result = {**decision.to_dict(), "cases": len(cases), "seconds": round(time.time() - started, 2)}
        storage.write_json(path, result)
        return result

    def _rank_unlabeled(self, context: RunContext, round_index: int, cases: list[str]) -> None:
        """``unlabeled_ranking.csv|json``: the round's unlabeled cases ranked by EXAMINE (the fold-0 network's
        encoder embeddings), entropy of the fold ensemble, random and foreground-aware random (``rank_unlabeled``;
        k-center needs the labelled cases' embeddings from one network and is left to ``rank-unlabeled``)."""
        from nnunetv2_em import rank_unlabeled, selection

        strategies = ("examine", "entropy", "random", "fg-random")
        files = [os.path.join(context.layout.embeddings_folder(round_index), f"{case}.npy") for case in cases]
        if not all(os.path.isfile(path) for path in files):  # predicted by a version without embeddings
            print(f"round {round_index}: no embeddings of the unlabeled cases; unlabeled_ranking.csv not written",
                  flush=True)
            return
        embeddings = np.asarray([np.load(path) for path in files])
        stats = []
        for case in cases:
            probabilities = estep.softmax(load_logits(context, round_index, case), 1.0)
            stats.append({"mean_entropy": selection.mean_entropy(probabilities),
                          "foreground_voxels": int(np.count_nonzero(probabilities.argmax(axis=0) > 0))})
        orders = rank_unlabeled.rankings(embeddings, stats, labelled_embeddings=None, strategies=strategies,
                                         seed=(context.options.seed or 0) + round_index)
        scores = selection.examine_scores(embeddings)
        rows = [{"case": case, **stats[i], "examine_score": float(scores[i]),
                 **{f"rank_{s}": order.index(i) + 1 for s, order in orders.items()}} for i, case in enumerate(cases)]
        rank_unlabeled.write_ranking(context.layout.round_file(round_index, "unlabeled_ranking.csv"), rows,
                                     {"round": round_index, "strategies": list(strategies)})

    def _finish_round(self, context, round_index, fit, kinds, split, unlabeled, timings) -> dict:
        versions = context.versions()
        scores = {}
        for case in kinds:
            with open(context.layout.case_file(round_index, case)) as handle:
                scores[case] = json.load(handle)
        labelled_scores = {c: s for c, s in scores.items() if s["provenance"] == storage.REFINED}
        summary = {"round": round_index, "noise_model": fit["noise_model"], "model_dice": fit["model_dice"],
                   "refinement_applied": fit["refine"], "refinement_refused": fit.get("refused"),
                   **estep.summarize_round(labelled_scores),
                   "pseudo_labelled_cases": len(unlabeled), **{k: round(v, 2) for k, v in timings.items()}}
        summary["converged"] = bool(fit["refine"] and
                                    summary["fraction_changed_since_previous"] < context.em.tolerance)
        if unlabeled:
            self._rank_unlabeled(context, round_index, sorted(unlabeled))
        to_rank = {c: s for c, s in scores.items() if s["provenance"] != storage.REVIEWED}  # reviewed: done
        reports.write_round_reports(context.layout.round_folder(round_index), summary, estep.rank_cases(to_rank))
        # cases no fold could judge keep their labels of the previous round, so the round folder stays complete
        for case in self.labelled:
            if case not in kinds:
                versions.copy_case(round_index - 1, round_index, case)
        manifest = {case: {"provenance": scores[case]["provenance"] if case in scores else storage.ORIGINAL,
                           **({k: v for k, v in scores[case].items() if k not in ("case", "provenance")}
                              if case in scores else {})} for case in [*self.labelled, *unlabeled]}
        for case in unlabeled:  # what a restore of this round needs to bring the case back
            manifest[case]["preprocessed_image"] = os.path.join(context.unlabeled_folder(), f"{case}.b2nd")
            if case in self.extra_unlabeled:
                manifest[case]["images"] = versions.keep_added_images(case, self.extra_unlabeled[case])
        with open(os.path.join(versions.round_folder(0), "dataset.json")) as handle:
            dataset_json = label_conventions.with_ignore_label(json.load(handle))
        dataset_json.pop("dataset", None)
        versions.write_round_metadata(round_index, dataset_json, manifest)
        storage.fault_point("round_staged")
        storage.activate(versions, round_index)
        storage.fault_point("round_activated")
        print(f"round {round_index}: log-likelihood {fit['noise_model']['log_likelihood']:.5f}, temperature "
              f"{fit['noise_model']['temperature']:.3f}, changed {100 * summary['fraction_changed']:.3f}%, ignored "
              f"{100 * summary['fraction_ignored']:.3f}%, {100 * summary['fraction_changed_since_previous']:.3f}% "
              f"differ from the previous round{' -> converged' if summary['converged'] else ''}", flush=True)
        return summary


def _wait(client, futures, description: str, *, fault: str | None = None) -> None:
    """Wait for futures with a progress bar; the first failure is raised. ``fault``: a fault-injection point
    reached after the first task is done (tests)."""
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(total=len(futures), desc=description, unit="task", file=sys.stdout) as bar:
        for future in as_completed(futures):
            future.result()
            bar.update()
            if fault:
                storage.fault_point(fault)


def run(options: RunOptions, *, scheduler: str | None = None, jobs=None) -> dict:
    """Check everything, then execute (or continue) the run on Dask: an embedded LocalCluster, the existing
    ``scheduler``, or worker jobs of a batch system (``jobs``: ``cluster.JobOptions``; their logs default to the
    run's ``cluster_logs/``)."""
    import dataclasses

    cross_fold = CrossFoldRun(options)
    if jobs is not None and jobs.log_directory is None:
        jobs = dataclasses.replace(jobs, log_directory=cross_fold.layout.file("cluster_logs"))
    # the client first: an unreachable scheduler is reported before anything is written, the lock included
    with engine.open_client(scheduler, device=options.device, jobs=jobs) as client, cross_fold.locked():
        return cross_fold.run(client)
