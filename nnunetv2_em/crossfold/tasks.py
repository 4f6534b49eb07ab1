"""The run's Dask tasks: a fold's training, predictions, an unlabeled case's preprocessing, one case's E-step.

Each is idempotent (a finished task leaves a marker and returns at once when rerun) and runs nnU-Net's heavy work
in a child process.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from nnunetv2_em import checks, engine, estep, label_store
from nnunetv2_em.crossfold.options import RunContext
from nnunetv2_em.estep import constraints as constrained


def _child_env(context: RunContext, round_index: int) -> dict:
    # the lock's variable marks the children as the run's: the next holder of the lock ends what a kill left behind
    return {**os.environ, label_store.LOCK_ENV: label_store.lock_path(context.raw),
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
    label_store.write_json(spec_file, {"model_folder": context.layout.model_folder(round_index), "folds": folds,
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
    label_store.atomic_write(os.path.join(folder, f"{case}.b2nd"), lambda temp: blosc2.asarray(
        data, urlpath=temp, chunks=chunks, blocks=blocks, cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5}),
        suffix=".b2nd")
    label_store.write_seg_b2nd(os.path.join(folder, f"{case}_mask.b2nd"), seg, configuration_manager.patch_size)
    label_store.write_pickle(os.path.join(folder, f"{case}.pkl"), properties)  # last: marks the case done
    return case


def managers(context: RunContext):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(context.plans_file())
    dataset_json = checks.with_ignore_label(checks.load_dataset_json(os.path.join(context.preprocessed,
                                                                                  "dataset.json")))
    return plans_manager, plans_manager.get_configuration(context.options.configuration), dataset_json


def load_logits(context: RunContext, round_index: int, case: str) -> np.ndarray:
    return np.load(context.layout.logits_file(round_index, case)).astype(np.float32)


def task_refine(context: RunContext, round_index: int, case: str, kind: str) -> str:
    """E-step of one case: refine (labelled) or pseudo-label (unlabeled); stage the round's label files."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    from nnunetv2_em import nnunet_data

    marker = context.layout.case_file(round_index, case)
    if os.path.isfile(marker):
        return case
    versions = context.versions()
    if kind == label_store.REVIEWED:  # frozen: the reviewed label, byte for byte
        reviewed = context.reviewed_labels()
        versions.stage_reviewed_case(round_index, case, reviewed)
        label_store.write_json(marker, {"case": case, "provenance": kind, "reviewed": reviewed.provenance(case)})
        return case
    plans_manager, configuration_manager, dataset_json = managers(context)
    label_manager = plans_manager.get_label_manager(dataset_json)
    ignore_label = int(label_manager.ignore_label)
    with open(context.layout.round_file(round_index, "fit.json")) as handle:
        fit = json.load(handle)
    model = estep.NoiseModel.from_dict(fit["noise_model"])
    settings = context.em
    logits = load_logits(context, round_index, case)
    reader_writer = plans_manager.image_reader_writer_class()
    weak = context.case_constraints(case)
    weak_report = None
    if kind == label_store.PSEUDO:
        properties = load_pickle(os.path.join(context.unlabeled_folder(), f"{case}.pkl"))
        outside = label_store.read_seg_b2nd(os.path.join(context.unlabeled_folder(), f"{case}_mask.b2nd"))[0] < 0
        annotations = np.where(outside, -1, 0)  # no annotation: inside the image, or not
    else:
        properties = load_pickle(versions.original_properties_path(case))
        annotations = versions.read_original_segmentation(case)[0]
    converted = None if weak is None else nnunet_data.constraints_to_preprocessed(weak, properties, plans_manager,
                                                                                  logits.shape[1:])
    apply = fit["refine"] and case not in fit.get("verified", ())
    allow_changes = fit["gate"].get("changes_allowed", True)
    posterior = constrained.proposal_posterior(logits, annotations, model, converted, pseudo=kind == label_store.PSEUDO,
                                               case_prior_strength=settings.case_prior,
                                               seed=estep.case_seed(settings.seed, round_index, case))
    if kind == label_store.PSEUDO:
        if weak is None:
            refined = estep.pseudo_label(logits, model, thresholds=settings.thresholds, ignore_label=ignore_label,
                                         outside=outside)
        else:  # a weak-only case: its tags constrain the pseudo-label
            refined, weak_report = constrained.constrained_labels(
                logits, annotations, model, converted, thresholds=settings.thresholds, ignore_label=ignore_label,
                mode=settings.weak_mode, samples=settings.weak_samples, agreement=settings.weak_agreement,
                seed=estep.case_seed(settings.seed, round_index, case))
        scores = estep.score_pseudo_label(logits, refined, model, ignore_label=ignore_label)
        raw_label = nnunet_data.preprocessed_to_raw_geometry(refined, properties, plans_manager,
                                                             configuration_manager)
    else:
        previous = versions.read_segmentation(round_index - 1, case)[0]
        second = None
        if settings.second_opinion == "mirror":
            second = np.load(context.layout.mirrored_logits_file(round_index, case)).astype(np.float32)
        refined, scores = constrained.refine_labelled_case(
            logits, annotations, model, converted, thresholds=settings.thresholds, ignore_label=ignore_label,
            previous=previous, apply=apply, allow_changes=allow_changes, case_prior_strength=settings.case_prior,
            mode=settings.weak_mode, samples=settings.weak_samples, agreement=settings.weak_agreement,
            seed=estep.case_seed(settings.seed, round_index, case), second_opinion=second, posterior=posterior)
        original_raw = np.asarray(reader_writer.read_seg(versions.original_label_path(case))[0][0]).astype(np.int32)
        raw_label = nnunet_data.refined_raw_label(original_raw, annotations, refined, properties, plans_manager,
                                                  configuration_manager)
    if weak_report is not None:
        scores = {**scores, "weak_labels": {"kind": constrained.weak_case_kind(weak), **weak_report}}
    label_store.write_uncertainty(context.layout.uncertainty_file(round_index, case),
                                  estep.proposal_uncertainty(posterior[0], refined))
    soft_maps = None
    if settings.soft_targets:
        soft_maps = _soft_maps(posterior[0], annotations, refined, case, round_index, settings,
                               pseudo=kind == label_store.PSEUDO or converted is not None,
                               changes_allowed=apply and allow_changes, ignore_label=ignore_label)
    properties = dict(properties)
    properties["class_locations"] = nnunet_data.class_locations(refined[None], label_manager)
    versions.write_case(round_index, case, raw_label=raw_label, raw_properties=properties,
                        reader_writer=reader_writer, segmentation=refined[None], properties=properties,
                        patch_size=configuration_manager.patch_size, soft_maps=soft_maps, provenance=kind)
    label_store.write_json(marker, {"case": case, "provenance": kind, **scores})
    return case


def _soft_maps(q, annotations, refined, case, round_index, settings, *, pseudo: bool, changes_allowed: bool,
               ignore_label: int):
    """The case's ``soft_targets`` sampled label maps from its posterior ``q``: drawn where the E-step was in doubt
    (changed or ignored voxels of a labelled case, only where changes are allowed; ignored voxels of a
    pseudo-labelled or constrained case), the hard labels elsewhere."""
    seed = [*estep.case_seed(settings.seed, round_index, case), 1]
    inside = refined != -1
    if pseudo:
        sample_where = inside & (refined == ignore_label)
    else:
        sample_where = (refined != annotations) & estep.annotated_mask(annotations, q.shape[0]) & changes_allowed
    return estep.soft_label_maps(q, refined, sample_where=sample_where, samples=settings.soft_targets, seed=seed)
