"""The run's Dask tasks: a fold's training, predictions, an unlabeled case's preprocessing, one case's E-step.

Each is idempotent (a finished task leaves a marker and returns at once when rerun) and runs nnU-Net's heavy work
in a child process.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from nnunetv2_em import checks, engine, label_conventions, storage
from nnunetv2_em.crossfold.options import RunContext
from nnunetv2_em.estep.pipeline import EStep, EStepOptions, RoundDecision


def _child_env(context: RunContext, round_index: int) -> dict:
    # the lock's variable marks the children as the run's: the next holder of the lock ends what a kill left behind
    return {**os.environ, storage.LOCK_ENV: storage.lock_path(context.raw),
            "nnUNet_raw": os.path.dirname(context.raw),
            "nnUNet_preprocessed": os.path.dirname(context.preprocessed),
            "nnUNet_results": context.layout.round_results(round_index),
            **engine.worker_device_env(context.options.device)}


def task_train(context: RunContext, round_index: int, fold: int) -> int:
    """M-step of one fold (a child process running nnU-Net's trainer)."""
    from nnunetv2_em.mstep import DONE_MARKER

    if os.path.isfile(os.path.join(context.layout.fold_folder(round_index, fold), DONE_MARKER)):
        return fold
    options = context.options
    command = [sys.executable, "-m", "nnunetv2_em.mstep", context.dataset_name, options.configuration, str(fold),
               "--trainer", options.trainer, "--plans", options.plans, "--device", options.device]
    if round_index > 1:
        command += ["--init-checkpoint", os.path.join(context.layout.fold_folder(round_index - 1, fold),
                                                      "checkpoint_final.pth"),
                    "--epoch-fraction", str(options.warm_fraction)]
    if not options.validate:
        command.append("--no-validation")
    if options.seed is not None:
        command += ["--seed", str(options.seed)]
    engine.run_child(command, env=_child_env(context, round_index),
                     log_file=os.path.join(context.layout.logs_folder(round_index), f"train_fold_{fold}.log"))
    return fold


def task_predict(context: RunContext, round_index: int, folds: list[int], cases: dict[str, str], name: str,
                 *, mirrored: bool = False, embeddings: bool = False) -> int:
    """Logits of ``cases`` ({case: preprocessed folder}) from ``folds`` (a child process); ``mirrored``: of the
    images mirrored along their last axis, mirrored back (the second opinion); ``embeddings``: also the cases'
    encoder embeddings (``round_NN/embeddings/``, for the ranking of unlabeled cases)."""
    cache = (context.layout.mirrored_logits_folder if mirrored else context.layout.logits_folder)(round_index)
    if all(os.path.isfile(os.path.join(cache, f"{case}.npy")) for case in cases):
        return 0
    spec_file = os.path.join(context.layout.logs_folder(round_index), f"predict_{name}.json")
    os.makedirs(os.path.dirname(spec_file), exist_ok=True)
    storage.write_json(spec_file, {"model_folder": context.layout.model_folder(round_index), "folds": folds,
                                   "cases": cases, "cache": cache, "mirroring": context.em.mirroring,
                                   "device": context.options.device, "flip_axis": 2 if mirrored else None,
                                   "embeddings_cache": context.layout.embeddings_folder(round_index)
                                   if embeddings else None})
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
    plans_manager, configuration_manager, dataset_json = managers(context)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    # without a label, nnU-Net's preprocessing returns the outside-image mask as -1 in ``seg``
    data, seg, properties = preprocessor.run_case(images, None, plans_manager, configuration_manager, dataset_json)
    os.makedirs(folder, exist_ok=True)
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    storage.atomic_write(os.path.join(folder, f"{case}.b2nd"), lambda temp: blosc2.asarray(
        data, urlpath=temp, chunks=chunks, blocks=blocks, cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5}),
        suffix=".b2nd")
    storage.write_seg_b2nd(os.path.join(folder, f"{case}_mask.b2nd"), seg, configuration_manager.patch_size)
    storage.write_pickle(os.path.join(folder, f"{case}.pkl"), properties)  # last: marks the case done
    return case


def task_preprocess_ratings(context: RunContext, case: str, images: list[str]) -> str:
    """Each rater's label of ``case`` preprocessed as nnU-Net preprocesses labels (once per configuration)."""
    from nnunetv2_em.nnunet_data import preprocess_label

    plans_manager, configuration_manager, dataset_json = managers(context)
    for rater, label in context.rater_files(case).items():
        path = context.rater_segmentation(rater, case)
        if os.path.isfile(path):
            continue
        segmentation, _ = preprocess_label(label, images, plans_manager, configuration_manager, dataset_json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.write_seg_b2nd(path, segmentation, configuration_manager.patch_size)
    return case


def managers(context: RunContext):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(context.plans_file())
    dataset_json = label_conventions.with_ignore_label(
        checks.load_dataset_json(os.path.join(context.preprocessed, "dataset.json")))
    return plans_manager, plans_manager.get_configuration(context.options.configuration), dataset_json


def load_logits(context: RunContext, round_index: int, case: str) -> np.ndarray:
    return np.load(context.layout.logits_file(round_index, case)).astype(np.float32)


class RunCaseInputs:
    """The E-step's inputs (``estep.pipeline.CaseInputs``) over a run's files: the round's cached logits, the
    round-0 (original) segmentations, the previous round's, the weak labels in each case's array, the reviewed
    labels of ``reviewed`` cases; ``pseudo``: the unlabeled cases (no annotation: 0 inside the image, -1 outside)."""

    def __init__(self, context: RunContext, round_index: int, *, pseudo=(), reviewed=()):
        self.context = context
        self.round_index = round_index
        self.versions = context.versions()
        self.pseudo = set(pseudo)
        self.reviewed = set(reviewed)
        self._plans_manager = None

    def logits(self, case: str) -> np.ndarray:
        return load_logits(self.context, self.round_index, case)

    def annotation(self, case: str) -> np.ndarray:
        if case in self.pseudo:
            outside = storage.read_seg_b2nd(os.path.join(self.context.unlabeled_folder(), f"{case}_mask.b2nd"))
            return np.where(outside[0] < 0, -1, 0)
        return self.versions.read_original_segmentation(case)[0]

    def previous(self, case: str) -> np.ndarray | None:
        return None if case in self.pseudo else self.versions.read_segmentation(self.round_index - 1, case)[0]

    def properties_path(self, case: str) -> str:
        if case in self.pseudo:
            return os.path.join(self.context.unlabeled_folder(), f"{case}.pkl")
        return self.versions.original_properties_path(case)

    def constraints(self, case: str):
        from batchgenerators.utilities.file_and_folder_operations import load_pickle

        from nnunetv2_em import nnunet_data

        weak = self.context.case_constraints(case)
        if weak is None:
            return None
        if self._plans_manager is None:
            self._plans_manager = managers(self.context)[0]
        shape = np.load(self.context.layout.logits_file(self.round_index, case), mmap_mode="r").shape[1:]
        return nnunet_data.constraints_to_preprocessed(weak, load_pickle(self.properties_path(case)),
                                                       self._plans_manager, shape)

    def truth(self, case: str) -> np.ndarray | None:
        if case not in self.reviewed:
            return None
        return self.context.reviewed_labels().read_segmentation(case, self.context.data_identifier)[0]

    def second_opinion(self, case: str) -> np.ndarray | None:
        return np.load(self.context.layout.mirrored_logits_file(self.round_index, case)).astype(np.float32)

    def ratings(self, case: str) -> np.ndarray | None:
        """Every rater's label in the preprocessed array (``task_preprocess_ratings`` made them), ``-1`` where a
        rater did not annotate; None for a dataset without raters or a case none of them annotated."""
        files = self.context.rater_files(case)
        if not files:
            return None
        ignore_label = int(managers(self.context)[2]["labels"]["ignore"])
        maps = {rater: storage.read_seg_b2nd(self.context.rater_segmentation(rater, case))[0] for rater in files}
        shape = next(iter(maps.values())).shape
        stacked = np.stack([maps.get(rater, np.full(shape, -1, np.int16)) for rater in self.context.rater_names()])
        return np.where(stacked == ignore_label, -1, stacked)


def estep_for_round(context: RunContext, round_index: int, inputs: RunCaseInputs, dataset_json: dict) -> EStep:
    """The round's E-step over the run's files (``dataset_json`` as ``managers`` gives it: with the ignore label)."""
    return EStep(EStepOptions.from_settings(context.em), inputs,
                 num_classes=len(checks.label_values(dataset_json, "dataset.json")),
                 ignore_label=int(dataset_json["labels"]["ignore"]), round_index=round_index)


def stage_case_labels(versions: storage.DatasetLabelVersions, round_index: int, case: str, labels: np.ndarray, *,
                      annotation: np.ndarray | None, properties: dict, plans_manager, configuration_manager,
                      dataset_json: dict, soft_maps: np.ndarray | None = None,
                      provenance: str = storage.REFINED) -> None:
    """Stage one case's round label from the E-step's ``labels`` (preprocessed geometry, ``(*spatial)``): the
    preprocessed segmentation and its ``class_locations`` are written directly (nnU-Net's preprocessing is not rerun),
    the raw label is the original with only the changed voxels mapped back (``annotation``: the preprocessed
    original, ``(*spatial)``; None for a pseudo-labelled case, whose raw label is the whole map reverted)."""
    from nnunetv2_em import nnunet_data

    reader_writer = plans_manager.image_reader_writer_class()
    if annotation is None:
        raw_label = nnunet_data.preprocessed_to_raw_geometry(labels, properties, plans_manager, configuration_manager)
    else:
        original_raw = np.asarray(reader_writer.read_seg(versions.original_label_path(case))[0][0]).astype(np.int32)
        raw_label = nnunet_data.refined_raw_label(original_raw, annotation, labels, properties, plans_manager,
                                                  configuration_manager)
    properties = dict(properties)
    properties["class_locations"] = nnunet_data.class_locations(labels[None],
                                                                plans_manager.get_label_manager(dataset_json))
    versions.write_case(round_index, case, raw_label=raw_label, raw_properties=properties,
                        reader_writer=reader_writer, segmentation=labels[None], properties=properties,
                        patch_size=configuration_manager.patch_size, soft_maps=soft_maps, provenance=provenance)


def task_refine(context: RunContext, round_index: int, case: str, kind: str) -> str:
    """E-step of one case: refine (labelled) or pseudo-label (unlabeled); stage the round's label files."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    marker = context.layout.case_file(round_index, case)
    if os.path.isfile(marker):
        return case
    versions = context.versions()
    if kind == storage.REVIEWED:  # frozen: the reviewed label, byte for byte
        reviewed = context.reviewed_labels()
        storage.stage_reviewed_case(versions, round_index, case, reviewed)
        storage.write_json(marker, {"case": case, "provenance": kind, "reviewed": reviewed.provenance(case)})
        return case
    pseudo = kind == storage.PSEUDO
    inputs = RunCaseInputs(context, round_index, pseudo=[case] if pseudo else [])
    with open(context.layout.round_file(round_index, "fit.json")) as handle:
        decision = RoundDecision.from_dict(json.load(handle))
    plans_manager, configuration_manager, dataset_json = managers(context)
    result = estep_for_round(context, round_index, inputs, dataset_json).case(case, decision, pseudo=pseudo)
    storage.write_uncertainty(context.layout.uncertainty_file(round_index, case), result.uncertainty)
    annotation = None if pseudo else inputs.annotation(case)
    stage_case_labels(versions, round_index, case, result.labels, annotation=annotation,
                      properties=load_pickle(inputs.properties_path(case)), plans_manager=plans_manager,
                      configuration_manager=configuration_manager, dataset_json=dataset_json,
                      soft_maps=result.soft_maps, provenance=kind)
    storage.write_json(marker, {"case": case, "provenance": kind, **result.scores})
    return case
