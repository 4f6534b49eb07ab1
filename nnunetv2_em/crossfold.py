"""``nnunetv2_em run``: cross-validated EM over a whole dataset, each case corrected by the fold that never saw it.

Each round: (1) M-step: train every fold with an nnU-Net trainer (later rounds warm-start from the previous round's
weights of the same fold with a shorter budget); (2) E-step on out-of-fold logits: fit temperature and noise model,
refine each labelled case, pseudo-label unlabeled cases with the fold ensemble, score and rank; (3) the round's
labels become the dataset's labels (raw ``labelsTr`` and the preprocessed segmentations; round 0 keeps the
originals). Every step leaves a marker file, so the same command continues a killed run without redoing finished
folds or cases.

Files (``run`` = ``nnUNet_results/<Dataset>/em_run__<Trainer>__<Plans>__<configuration>``)::

    run/run.json                       the options of the run (a rerun must use the same)
    run/state.json                     per-round summaries, converged flag
    run/summary.json|md, run/plots/    the run so far: table and PNG plots per round
    run/round_NN/nnUNet_results/       the round's fold trainings, in nnU-Net's layout (usable with its tools)
    run/round_NN/logits/               out-of-fold logits (deleted when the round completes, unless kept)
    run/round_NN/fit.json              temperature, T, likelihood, network-vs-annotation Dice
    run/round_NN/cases/<case>.json     per-case scores (its presence: the case is done)
    run/round_NN/cases.csv|json        ranked by review score;  run/round_NN/summary.json
    nnUNet_raw/<Dataset>/em_labels/    label versions (see label_store.DatasetLabelVersions)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from nnunetv2_em import checks, engine, estep, label_store, reports
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.settings import PLANS_KEY, EMSettings

UNLABELED_FOLDER = "em_unlabeled"


@dataclass(frozen=True)
class RunOptions:
    dataset: str
    configuration: str = "3d_fullres"
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rounds: int | None = None  # default: the plans' em.rounds
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    device: str = "cuda"
    warm_fraction: float = 0.5  # budget of rounds >= 2, relative to the trainer's, started from the last weights
    unlabeled: str | None = None  # folder of extra images (<case>_0000<ending>) to pseudo-label
    validate: bool = True  # nnU-Net's final validation of each fold (needed by its find_best_configuration)
    keep_logits: bool = False
    num_processes: int = 2  # planning / preprocessing workers

    def identity(self) -> dict:
        """What a rerun must repeat to continue this run (the rest may change between invocations)."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key in ("configuration", "folds", "trainer", "plans", "warm_fraction", "unlabeled")}


@dataclass(frozen=True)
class RunContext:
    """Resolved paths and nnU-Net facts shared by the driver and the tasks (picklable)."""

    dataset_name: str
    raw: str
    preprocessed: str
    data_identifier: str
    file_ending: str
    run_folder: str
    options: RunOptions
    settings: dict  # EMSettings.to_plans_block()

    @property
    def em(self) -> EMSettings:
        return EMSettings.resolve(self.settings, source="run")

    def versions(self) -> label_store.DatasetLabelVersions:
        return label_store.DatasetLabelVersions(self.raw, self.preprocessed, self.data_identifier, self.file_ending,
                                                run=self.run_name)

    @property
    def run_name(self) -> str:
        return os.path.basename(self.run_folder)

    def round_folder(self, round_index: int) -> str:
        return os.path.join(self.run_folder, f"round_{round_index:02d}")

    def round_results(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "nnUNet_results")

    def model_folder(self, round_index: int) -> str:
        return os.path.join(self.round_results(round_index), self.dataset_name,
                            f"{self.options.trainer}__{self.options.plans}__{self.options.configuration}")

    def fold_folder(self, round_index: int, fold: int) -> str:
        return os.path.join(self.model_folder(round_index), f"fold_{fold}")

    def logits_folder(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "logits")

    def case_file(self, round_index: int, case: str) -> str:
        return os.path.join(self.round_folder(round_index), "cases", f"{case}.json")

    def unlabeled_folder(self) -> str:
        return os.path.join(self.preprocessed, UNLABELED_FOLDER, self.data_identifier)

    def plans_file(self) -> str:
        return os.path.join(self.preprocessed, self.options.plans + ".json")


# ------------------------------------------------------------------------------------------------------ tasks
def _child_env(context: RunContext, round_index: int) -> dict:
    return {**os.environ, "nnUNet_raw": os.path.dirname(context.raw),
            "nnUNet_preprocessed": os.path.dirname(context.preprocessed),
            "nnUNet_results": context.round_results(round_index), **engine.worker_device_env(context.options.device)}


def task_train(context: RunContext, round_index: int, fold: int) -> int:
    """M-step of one fold (a child process running nnU-Net's trainer)."""
    from nnunetv2_em.mstep import DONE_MARKER

    if os.path.isfile(os.path.join(context.fold_folder(round_index, fold), DONE_MARKER)):
        return fold
    options = context.options
    command = [sys.executable, "-m", "nnunetv2_em.mstep", context.dataset_name, options.configuration, str(fold),
               "--trainer", options.trainer, "--plans", options.plans, "--device", options.device]
    if round_index > 1:
        command += ["--init-checkpoint", os.path.join(context.fold_folder(round_index - 1, fold),
                                                      "checkpoint_final.pth"),
                    "--epoch-fraction", str(options.warm_fraction)]
    if not options.validate:
        command.append("--no-validation")
    engine.run_child(command, env=_child_env(context, round_index),
                     log_file=os.path.join(context.round_folder(round_index), "logs", f"train_fold_{fold}.log"))
    return fold


def task_predict(context: RunContext, round_index: int, folds: list[int], cases: dict[str, str], name: str) -> int:
    """Logits of ``cases`` ({case: preprocessed folder}) from ``folds`` (a child process)."""
    cache = context.logits_folder(round_index)
    if all(os.path.isfile(os.path.join(cache, f"{case}.npy")) for case in cases):
        return 0
    spec_file = os.path.join(context.round_folder(round_index), "logs", f"predict_{name}.json")
    os.makedirs(os.path.dirname(spec_file), exist_ok=True)
    label_store.write_json(spec_file, {"model_folder": context.model_folder(round_index), "folds": folds,
                                       "cases": cases, "cache": cache, "mirroring": context.em.mirroring,
                                       "device": context.options.device})
    engine.run_child([sys.executable, "-m", "nnunetv2_em.oof", spec_file], env=_child_env(context, round_index),
                     log_file=spec_file[:-len(".json")] + ".log")
    return len(cases)


def task_preprocess_unlabeled(context: RunContext, case: str, images: list[str]) -> str:
    """Preprocess the images of an unlabeled case once, with nnU-Net's preprocessor and the dataset's plans."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    folder = context.unlabeled_folder()
    if os.path.isfile(os.path.join(folder, f"{case}.pkl")):
        return case
    plans_manager, configuration_manager, dataset_json = _managers(context)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    # without a label, nnU-Net's preprocessing returns the outside-image mask as -1 in ``seg``
    data, seg, properties = preprocessor.run_case(images, None, plans_manager, configuration_manager, dataset_json)
    os.makedirs(folder, exist_ok=True)
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    label_store.atomic_write(os.path.join(folder, f"{case}.b2nd"), lambda temp: blosc2.asarray(
        data, urlpath=temp, chunks=chunks, blocks=blocks, cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5}),
        suffix=".b2nd")
    label_store.write_seg_b2nd(os.path.join(folder, f"{case}_mask.b2nd"), seg, configuration_manager.patch_size)
    label_store.write_pickle(os.path.join(folder, f"{case}.pkl"), properties)  # last: marks the case done
    return case


def _managers(context: RunContext):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(context.plans_file())
    dataset_json = checks.with_ignore_label(checks.load_dataset_json(os.path.join(context.preprocessed,
                                                                                  "dataset.json")))
    return plans_manager, plans_manager.get_configuration(context.options.configuration), dataset_json


def _load_logits(context: RunContext, round_index: int, case: str) -> np.ndarray:
    return np.load(os.path.join(context.logits_folder(round_index), f"{case}.npy")).astype(np.float32)


def task_refine(context: RunContext, round_index: int, case: str, kind: str) -> str:
    """E-step of one case: refine (labelled) or pseudo-label (unlabeled); stage the round's label files."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    from nnunetv2_em import nnunet_data

    marker = context.case_file(round_index, case)
    if os.path.isfile(marker):
        return case
    versions = context.versions()
    plans_manager, configuration_manager, dataset_json = _managers(context)
    label_manager = plans_manager.get_label_manager(dataset_json)
    ignore_label = int(label_manager.ignore_label)
    with open(os.path.join(context.round_folder(round_index), "fit.json")) as handle:
        fit = json.load(handle)
    model = estep.NoiseModel(np.asarray(fit["noise_model"]["transition"]), fit["noise_model"]["temperature"])
    settings = context.em
    logits = _load_logits(context, round_index, case)
    reader_writer = plans_manager.image_reader_writer_class()
    if kind == label_store.PSEUDO:
        properties = load_pickle(os.path.join(context.unlabeled_folder(), f"{case}.pkl"))
        outside = label_store.read_seg_b2nd(os.path.join(context.unlabeled_folder(), f"{case}_mask.b2nd"))[0] < 0
        refined = estep.pseudo_label(logits, model, thresholds=settings.thresholds, ignore_label=ignore_label,
                                     outside=outside)
        scores = estep.score_pseudo_label(logits, refined, model, ignore_label=ignore_label)
        raw_label = nnunet_data.preprocessed_to_raw_geometry(refined, properties, plans_manager,
                                                             configuration_manager)
    else:
        properties = load_pickle(versions.original_properties_path(case))
        original = versions.read_original_segmentation(case)[0]
        previous = versions.read_segmentation(round_index - 1, case)[0]
        refined, scores = estep.refine_case(logits, original, model, thresholds=settings.thresholds,
                                            ignore_label=ignore_label, previous=previous, apply=fit["refine"])
        original_raw = np.asarray(reader_writer.read_seg(versions.original_label_path(case))[0][0]).astype(np.int32)
        raw_label = nnunet_data.refined_raw_label(original_raw, original, refined, properties, plans_manager,
                                                  configuration_manager)
    properties = dict(properties)
    properties["class_locations"] = nnunet_data.class_locations(refined[None], label_manager)
    versions.write_case(round_index, case, raw_label=raw_label, raw_properties=properties,
                        reader_writer=reader_writer, segmentation=refined[None], properties=properties,
                        patch_size=configuration_manager.patch_size)
    label_store.write_json(marker, {"case": case, "provenance": kind, **scores})
    return case


# ------------------------------------------------------------------------------------------------------ driver
class CrossFoldRun:
    """Resolves and checks everything up front; ``run(client)`` executes or continues the rounds."""

    def __init__(self, options: RunOptions):
        from nnunetv2_em.planning import dataset_name

        paths = checks.require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
        self.options = options
        self.name = dataset_name(options.dataset)
        raw = os.path.join(paths["nnUNet_raw"], self.name)
        preprocessed = os.path.join(paths["nnUNet_preprocessed"], self.name)
        if options.rounds is not None and options.rounds < 1:
            raise EMInputError(f"--rounds {options.rounds}: must be at least 1. Fix: pass --rounds 1 or more.")
        if not 0 < options.warm_fraction <= 1:
            raise EMInputError(f"--warm-fraction {options.warm_fraction}: must be in (0, 1]. Fix: e.g. 0.5.")
        if not options.folds or len(set(options.folds)) != len(options.folds) or min(options.folds) < 0:
            raise EMInputError(f"--folds {list(options.folds)}: need distinct fold numbers >= 0. Fix: e.g. 0 1 2.")
        if options.unlabeled and not os.path.isdir(options.unlabeled):
            raise EMInputError(f"--unlabeled {options.unlabeled}: not a folder. Fix: pass a folder of images named "
                               f"<case>_0000<file ending>.")
        self.run_folder = os.path.join(paths["nnUNet_results"], self.name,
                                       f"em_run__{options.trainer}__{options.plans}__{options.configuration}")
        checks.guard_label_versions(raw, self.name, continuing_run=self.run_name)
        self.labelled, self.unlabeled_in_dataset = self._check_raw(raw)
        self._check_folds(preprocessed)
        self.extra_unlabeled = self._extra_unlabeled()
        self._check_trainer()
        versions_folder = os.path.join(raw, label_store.EM_LABELS)
        for folder in (versions_folder if os.path.lexists(versions_folder) else raw, paths["nnUNet_preprocessed"],
                       paths["nnUNet_results"]):
            if os.path.lexists(folder):
                checks.check_writable(folder)
        self.raw, self.preprocessed = raw, preprocessed

    @property
    def run_name(self) -> str:
        return os.path.basename(self.run_folder)

    # checks -------------------------------------------------------------------------------------------------
    def _check_raw(self, raw):
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        versions_manifest = os.path.join(raw, "em_labels", "round_00", "manifest.json")
        if os.path.isfile(versions_manifest):  # a run in progress already replaced labelsTr: check the originals
            with open(versions_manifest) as handle:
                originals = sorted(json.load(handle)["cases"])
            dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
            cases = get_filenames_of_train_images_and_targets(raw, dataset_json)
            labelled = {case: cases[case] for case in originals if case in cases}
            # cases without an original label stay pseudo-labelled cases, whatever labelsTr holds for them now
            return labelled, {case: entry for case, entry in cases.items() if case not in labelled}
        labelled = checks.check_raw_dataset(raw, allow_unlabeled=True)
        dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
        _, unlabeled = checks.split_labelled(get_filenames_of_train_images_and_targets(raw, dataset_json))
        if unlabeled:
            checks.check_unlabeled_images({case: entry["images"] for case, entry in unlabeled.items()}, raw,
                                          f"{raw}/imagesTr")
        return labelled, unlabeled

    def _check_folds(self, preprocessed: str) -> None:
        path = os.path.join(preprocessed, "splits_final.json")
        if os.path.isfile(path):
            try:
                with open(path) as handle:
                    splits = json.load(handle)
                num_splits = len(splits)
                for split in splits:
                    split["train"], split["val"]  # noqa: B018 (the keys nnU-Net reads)
            except (json.JSONDecodeError, TypeError, KeyError):
                raise EMInputError(f"{path}: not a list of {{'train': [...], 'val': [...]}} splits. Fix: repair it or "
                                   f"delete it (the run then creates one split per fold).") from None
            if max(self.options.folds) >= num_splits:
                raise EMInputError(f"{path}: has {num_splits} splits, fold {max(self.options.folds)} requested. "
                                   f"Fix: pick folds below {num_splits}.")
            return
        if sorted(self.options.folds) != list(range(len(self.options.folds))) or len(self.options.folds) < 2:
            raise EMInputError(f"--folds {list(self.options.folds)}: without a splits_final.json the run creates "
                               f"one split per fold, so folds must be 0..K-1 with K >= 2. Fix: e.g. --folds 0 1 2.")
        if len(self.labelled) < len(self.options.folds):
            raise EMInputError(f"{self.name}: {len(self.labelled)} labelled case(s) for {len(self.options.folds)} "
                               f"folds; every fold needs at least one case to judge. Fix: pass fewer --folds (at "
                               f"least 2) or add labelled cases.")

    def _extra_unlabeled(self) -> dict[str, list[str]]:
        if not self.options.unlabeled:
            return {}
        from nnunetv2.utilities.utils import (
            create_lists_from_splitted_dataset_folder,
            get_identifiers_from_splitted_dataset_folder,
        )

        raw = os.path.join(os.environ["nnUNet_raw"], self.name)
        ending = checks.load_dataset_json(os.path.join(raw, "dataset.json"))["file_ending"]
        identifiers = list(get_identifiers_from_splitted_dataset_folder(self.options.unlabeled, ending))
        if not identifiers:
            raise EMInputError(f"--unlabeled {self.options.unlabeled}: no images named <case>_0000{ending}. Fix: "
                               f"use nnU-Net's naming.")
        clashes = sorted(set(identifiers) & set(self.labelled))
        if clashes:
            raise EMInputError(f"--unlabeled {self.options.unlabeled}: cases {clashes[:3]} already exist in the "
                               f"dataset. Fix: rename them.")
        images = dict(zip(identifiers, create_lists_from_splitted_dataset_folder(self.options.unlabeled, ending,
                                                                                  identifiers, 1), strict=True))
        checks.check_unlabeled_images(images, raw, f"--unlabeled {self.options.unlabeled}")
        return images

    def _check_trainer(self):
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        from nnunetv2_em.trainers.em_trainer import EMTrainer

        try:
            trainer_class = recursive_find_trainer_class_by_name(self.options.trainer)
        except RuntimeError:
            raise EMInputError(f"--trainer {self.options.trainer}: no such nnU-Net trainer. Fix: use a trainer "
                               f"name that nnUNetv2_train accepts, e.g. nnUNetTrainer.") from None
        if issubclass(trainer_class, EMTrainer):
            raise EMInputError(f"--trainer {self.options.trainer}: the cross-fold loop runs the E-steps itself and "
                               f"needs a plain trainer. Fix: e.g. nnUNetTrainer (GPU) or VanillaTrainer_cpu.")

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
        return RunContext(self.name, self.raw, self.preprocessed, identifier, dataset_json["file_ending"],
                          self.run_folder, self.options, settings.to_plans_block())

    def locked(self):
        """Hold the dataset's run lock (released when the process ends, however it ends)."""
        return label_store.dataset_lock(self.preprocessed, lambda holder, lock_file: EMInputError(
            f"{self.name}: an nnunetv2_em command is already working on this dataset ({holder}; lock {lock_file}). "
            f"Fix: wait for it to finish or stop it, then run again."))

    def _check_identity(self, *, write: bool) -> None:
        path = os.path.join(self.run_folder, "run.json")
        identity = self.options.identity()
        identity["folds"] = list(identity["folds"])
        if os.path.isfile(path):
            with open(path) as handle:
                previous = json.load(handle)
            if previous != identity:
                raise EMInputError(f"{path}: this run was started with {previous}, now {identity}. Fix: use the same "
                                   f"options to continue it, or move that folder away to start a new run.")
        elif write:
            os.makedirs(self.run_folder, exist_ok=True)
            label_store.write_json(path, identity)

    # the loop -----------------------------------------------------------------------------------------------
    def run(self, client) -> dict:
        """Execute or continue the rounds; call inside ``locked()``."""
        label_store.recover_activation(self.raw, self.preprocessed)
        checks.guard_label_versions(self.raw, self.name, continuing_run=self.run_name)
        self._check_identity(write=False)
        self._ensure_planned()
        context = self._context()
        split = self._ensure_split(context)
        self._check_identity(write=True)  # only now: a run refused above leaves nothing behind
        label_store.fault_point("run_started")
        versions = context.versions()
        versions.keep_originals(self.labelled)
        changed = versions.changed_originals()
        if changed:
            raise EMInputError(f"{versions.root}/round_00: original labels changed ({changed[:3]}). Fix: "
                               f"restore them from a backup; nothing was modified.")
        unlabeled = {**{c: e["images"] for c, e in self.unlabeled_in_dataset.items()}, **self.extra_unlabeled}
        self._preprocess_unlabeled(client, context, unlabeled)
        state = self._load_state()
        for round_index in range(1, context.em.rounds + 1):
            if state["converged"]:
                break
            if str(round_index) in state["rounds"]:
                continue
            summary = self._run_round(client, context, round_index, split, unlabeled)
            state["rounds"][str(round_index)] = summary
            state["converged"] = bool(summary["converged"])
            label_store.write_json(os.path.join(self.run_folder, "state.json"), state)
            label_store.fault_point("state_written")
            reports.write_run_summary(self.run_folder, state)
            if not context.options.keep_logits:  # only now: a rerun before this point still finds them
                shutil.rmtree(context.logits_folder(round_index), ignore_errors=True)
        return {**state, "active": versions.active()}

    def _load_state(self) -> dict:
        path = os.path.join(self.run_folder, "state.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        return {"dataset": self.name, "rounds": {}, "converged": False}

    def _ensure_split(self, context: RunContext) -> list[dict]:
        """nnU-Net's splits_final.json: created with one split per requested fold when missing."""
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        path = os.path.join(self.preprocessed, "splits_final.json")
        if os.path.isfile(path):
            with open(path) as handle:
                splits = json.load(handle)
        else:
            splits = generate_crossval_split(sorted(self.labelled), seed=12345, n_splits=len(self.options.folds))
            label_store.write_json(path, splits)
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
        if unlabeled:
            predictions.append(client.submit(task_predict, context, round_index, folds,
                                             {case: context.unlabeled_folder() for case in unlabeled}, "unlabeled",
                                             resources={engine.DEVICE: 1}, pure=False))
        _wait(client, predictions, "predicting out-of-fold")
        predicted = time.time()
        label_store.write_json(os.path.join(context.round_folder(round_index), "out_of_fold.json"), out_of_fold)

        fit = self._fit(context, round_index, sorted(out_of_fold))
        kinds = {**{case: label_store.REFINED for case in out_of_fold},
                 **{case: label_store.PSEUDO for case in unlabeled}}
        refinements = [client.submit(task_refine, context, round_index, case, kind, pure=False)
                       for case, kind in sorted(kinds.items())]
        _wait(client, refinements, "E-step per case", fault="estep_case")
        refined = time.time()
        return self._finish_round(context, round_index, fit, kinds, split, unlabeled,
                                  timings={"seconds_training": trained - started,
                                           "seconds_prediction": predicted - trained,
                                           "seconds_estep": refined - predicted})

    def _fit(self, context: RunContext, round_index: int, cases: list[str]) -> dict:
        path = os.path.join(context.round_folder(round_index), "fit.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        settings = context.em
        versions = context.versions()
        _, _, dataset_json = _managers(context)
        num_classes = len(checks.label_values(dataset_json, "dataset.json"))
        cap = estep.voxels_per_class(settings.fit_sample_voxels, num_cases=len(cases), num_classes=num_classes)
        started = time.time()
        samples = [estep.sample_case(_load_logits(context, round_index, case),
                                     versions.read_original_segmentation(case)[0], max_voxels_per_class=cap,
                                     seed=estep.case_seed(settings.seed, round_index, case)) for case in cases]
        fit = estep.fit_round(samples, calibrate_temperature=settings.calibrate_temperature,
                              max_iterations=settings.fit_iterations, min_model_dice=settings.min_model_dice,
                              thresholds=settings.thresholds, max_ignored_share=settings.max_ignored_share)
        if fit.refused:
            print(f"round {round_index}: labels kept as they are: {fit.refused}", flush=True)
        result = {"noise_model": fit.model.to_dict(), "model_dice": fit.model_dice, "refine": fit.refine,
                  "refused": fit.refused,
                  "cases": len(cases), "seconds": round(time.time() - started, 2)}
        label_store.write_json(path, result)
        return result

    def _finish_round(self, context, round_index, fit, kinds, split, unlabeled, timings) -> dict:
        versions = context.versions()
        scores = {}
        for case in kinds:
            with open(context.case_file(round_index, case)) as handle:
                scores[case] = json.load(handle)
        labelled_scores = {c: s for c, s in scores.items() if s["provenance"] == label_store.REFINED}
        summary = {"round": round_index, "noise_model": fit["noise_model"], "model_dice": fit["model_dice"],
                   "refinement_applied": fit["refine"], "refinement_refused": fit.get("refused"),
                   **estep.summarize_round(labelled_scores),
                   "pseudo_labelled_cases": len(unlabeled), **{k: round(v, 2) for k, v in timings.items()}}
        summary["converged"] = bool(fit["refine"] and
                                    summary["fraction_changed_since_previous"] < context.em.tolerance)
        reports.write_round_reports(context.round_folder(round_index), summary, estep.rank_cases(scores))
        # cases no fold could judge keep their labels of the previous round, so the round folder stays complete
        for case in self.labelled:
            if case not in kinds:
                versions.copy_case(round_index - 1, round_index, case)
        manifest = {case: {"provenance": scores[case]["provenance"] if case in scores else label_store.ORIGINAL,
                           **({k: v for k, v in scores[case].items() if k not in ("case", "provenance")}
                              if case in scores else {})} for case in [*self.labelled, *unlabeled]}
        for case in unlabeled:  # what a restore of this round needs to bring the case back
            manifest[case]["preprocessed_image"] = os.path.join(context.unlabeled_folder(), f"{case}.b2nd")
            if case in self.extra_unlabeled:
                manifest[case]["images"] = versions.keep_added_images(case, self.extra_unlabeled[case])
        with open(os.path.join(versions.round_folder(0), "dataset.json")) as handle:
            dataset_json = checks.with_ignore_label(json.load(handle))
        dataset_json.pop("dataset", None)
        versions.write_round_metadata(round_index, dataset_json, manifest)
        label_store.fault_point("round_staged")
        versions.activate(round_index)
        label_store.fault_point("round_activated")
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
                label_store.fault_point(fault)


def run(options: RunOptions, *, scheduler: str | None = None) -> dict:
    """Check everything, then execute (or continue) the run on Dask."""
    cross_fold = CrossFoldRun(options)
    # the client first: an unreachable scheduler is reported before anything is written, the lock included
    with engine.open_client(scheduler, device=options.device) as client, cross_fold.locked():
        return cross_fold.run(client)
