"""``-tr EMTrainer``: nnU-Net training with an E-step after every round of epochs.

The trainer is glue: the E-step's arithmetic is in ``nnunetv2_em.estep``, every label file it writes goes through
``nnunetv2_em.storage``, and conversions between nnU-Net's spaces through ``nnunetv2_em.nnunet_data``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_em import checks, label_conventions, multi_rater, reports, storage, weak_labels
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.estep.pipeline import EStep, EStepOptions
from nnunetv2_em.layout import TrainerLayout, exchange_folder, training_labels_folder
from nnunetv2_em.run_state import TrainerRunState
from nnunetv2_em.sampling import patch_sampling
from nnunetv2_em.settings import PLANS_KEY, EMSettings
from nnunetv2_em.trainers.fold_labels import FoldLabels


@dataclasses.dataclass(frozen=True)
class TrainerInputs:
    """What an EMTrainer fold reads besides nnU-Net's own inputs, checked before anything is written."""

    settings: EMSettings
    dataset_json: dict  # with the ignore label EM writes (declared or added)
    verified_cases: list  # checked annotations (em_verified_cases.json): the gate's evidence
    reviewed: storage.ReviewedLabels
    reviewed_cases: list  # reviewed labels (`review import`): trained on as they are, never judged, trusted
    weak: dict  # {case: CaseConstraints} from em_weak_labels.json
    raters: object = None  # multi_rater.RaterSet of em_raters.json, or None
    images: dict = dataclasses.field(default_factory=dict)  # {case: raw image files} (to preprocess raters' labels)


def check_inputs(plans: dict, configuration: str, dataset_json: dict, *, overrides: dict) -> TrainerInputs:
    """The plans' ``em`` block (with a variant's ``overrides``), the labels, the preprocessed folder, the
    verified / reviewed / weak labels: one ``EMInputError`` naming the file and the fix on the first problem."""
    paths = checks.require_env("nnUNet_preprocessed", "nnUNet_results")
    dataset_folder = join(paths["nnUNet_preprocessed"], plans["dataset_name"])
    plans_file = join(dataset_folder, plans["plans_name"] + ".json")
    settings = EMSettings.resolve(plans.get(PLANS_KEY), overrides, source=plans_file)
    if settings.soft_targets:
        raise EMInputError(f"{plans_file}: em.soft_targets is {settings.soft_targets}, but EMTrainer "
                           f"trains on its hard labels; sampled label maps are staged by `nnunetv2_em run` for "
                           f"SoftTargetTrainer. Fix: set em.soft_targets to 0 in the plans' em block, or run "
                           f"`nnunetv2_em run --trainer SoftTargetTrainer`.")
    classes = checks.label_values(dataset_json, join(dataset_folder, "dataset.json"))
    if dist.is_available() and dist.is_initialized():
        raise EMInputError("EMTrainer runs on one device per fold; multi-GPU (DDP) training of one fold is not "
                           "supported. Fix: train without -num_gpus, one fold per GPU.")
    data_folder = join(dataset_folder, PlansManager(plans).get_configuration(configuration).data_identifier)
    if not os.path.isdir(data_folder):
        raise EMInputError(f"{data_folder}: not found. Fix: nnUNetv2_plan_and_preprocess -d "
                           f"{plans['dataset_name']} -pl EMPlanner -c {configuration}.")
    marker = storage.preprocessed_em_output(data_folder)
    if marker:
        raise EMInputError(f"{data_folder}: holds the segmentations of "
                           f"{storage.version_name(marker.get('run'), int(marker.get('round', 0)))} written "
                           f"by `nnunetv2_em run`{' (switch interrupted)' if marker.get('switching') else ''}, not "
                           f"the annotations; EMTrainer would take them for originals. Fix: `nnunetv2_em restore "
                           f"-d {plans['dataset_name']} --round 0`, then train again.")
    cases = nnUNetDatasetBlosc2.get_identifiers(data_folder)
    if not cases:
        raise EMInputError(f"{data_folder}: no blosc2 (.b2nd) cases. Fix: rerun nnUNetv2_plan_and_preprocess "
                           f"with nnU-Net >= 2.7.")
    dataset_json = label_conventions.with_ignore_label(dataset_json)
    checks.check_preprocessed_segmentations(data_folder, cases,
                                            set(classes) | {int(dataset_json["labels"]["ignore"])})
    has_raw = bool(os.environ.get("nnUNet_raw"))
    raw_folder = join(os.environ.get("nnUNet_raw", ""), plans["dataset_name"])
    reviewed = storage.ReviewedLabels(raw_folder, dataset_folder, dataset_json["file_ending"])
    # nnU-Net preprocesses only cases with a label file, so weak-only cases belong to `nnunetv2_em run`
    weak = (weak_labels.load_weak_labels(raw_folder, dataset_json, labelled=cases, images=cases)
            if os.path.isfile(weak_labels.weak_labels_path(raw_folder)) else {})
    raters, images = None, {}
    if has_raw and os.path.isfile(multi_rater.raters_path(raw_folder)):
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        entries = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
        images = {case: entry["images"] for case, entry in entries.items() if case in cases}
        raters = multi_rater.load_raters(raw_folder, dataset_json, {case: entries[case] for case in images})
    return TrainerInputs(settings=settings, dataset_json=dataset_json,
                         verified_cases=checks.load_verified_cases(raw_folder, cases) if has_raw else [],
                         reviewed=reviewed,
                         reviewed_cases=sorted(set(reviewed.records()) & set(cases)) if has_raw else [],
                         weak=weak, raters=raters, images=images)


class EMTrainer(nnUNetTrainer):
    """R rounds of (M-step epochs on the current labels, E-step over the fold's training cases) in one training.

    Settings come from the plans' ``em`` block (``-pl EMPlanner`` writes it; other plans get the defaults),
    overridden by a variant's ``em_overrides``. ``num_epochs`` is ``rounds x epochs_per_round``, so the learning
    rate schedule spans the whole run. Resume with ``--c`` works from any point, E-steps included.
    """

    em_overrides: dict = {}  # variants override settings of the plans' em block here

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # everything that can reject the input runs before nnUNetTrainer.__init__ creates the output folder
        inputs = check_inputs(plans, configuration, dataset_json, overrides=self.em_overrides)
        self.em_settings = inputs.settings
        super().__init__(plans, configuration, fold, inputs.dataset_json, device)
        self.num_epochs = self.em_settings.total_epochs
        self.layout = TrainerLayout(self.output_folder)
        self._inputs = inputs
        self.labels: FoldLabels | None = None  # made in initialize, when nnU-Net's folders are known
        self._em_state: TrainerRunState | None = None

    # ----------------------------------------------------------------------------------- nnU-Net hooks
    def initialize(self):
        if not self.was_initialized:
            # train from a fold-private copy of the preprocessed folder whose segmentations the E-step replaces
            original_folder = self.preprocessed_dataset_folder
            output_name = os.path.basename(self.output_folder_base)
            training = storage.TrainingLabelFolder(
                original_folder, training_labels_folder(self.preprocessed_dataset_folder_base, output_name, self.fold))
            training.ensure(nnUNetDatasetBlosc2.get_identifiers(original_folder))
            exchange = storage.FoldExchange(exchange_folder(self.preprocessed_dataset_folder_base, output_name))
            self.labels = FoldLabels(self, training=training, exchange=exchange, reviewed=self._inputs.reviewed,
                                     reviewed_cases=self._inputs.reviewed_cases, weak=self._inputs.weak,
                                     raters=self._inputs.raters, images=self._inputs.images)
            self.preprocessed_dataset_folder = training.folder
        super().initialize()

    def get_dataloaders(self):
        with patch_sampling(self.em_settings.patch_sampling):
            return super().get_dataloaders()

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self._start_or_resume_em()
        super().on_train_start()

    def run_training(self):
        self.on_train_start()
        while self.current_epoch < self.num_epochs and not self._em_state.converged:
            self._train_one_epoch()
            if self.current_epoch % self.em_settings.epochs_per_round == 0:
                self._complete_round(self.current_epoch // self.em_settings.epochs_per_round)
        self.on_train_end()

    # ------------------------------------------------------------------------------------- the EM loop
    def _train_one_epoch(self):
        """One epoch exactly as ``nnUNetTrainer.run_training`` runs it."""
        self.on_epoch_start()
        self.on_train_epoch_start()
        train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
        self.on_train_epoch_end(train_outputs)
        with torch.no_grad():
            self.on_validation_epoch_start()
            val_outputs = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]
            self.on_validation_epoch_end(val_outputs)
        self.on_epoch_end()

    def _start_or_resume_em(self):
        state_file = self.layout.state_file
        training_cases, _ = self.do_split()
        if self.current_epoch == 0:
            # nnU-Net starts from scratch (no --c, or nothing to continue from): so does EM. A final checkpoint
            # of an earlier run would otherwise be what a later --c resumes from, with this run's labels
            stale_final = join(self.output_folder, "checkpoint_final.pth")
            if os.path.isfile(stale_final):
                self.print_to_log_file("EM: fresh start, removing the previous run's checkpoint_final.pth")
                os.remove(stale_final)
            if os.path.isdir(self.layout.em_folder):
                shutil.rmtree(self.layout.em_folder)
            taken = self.labels.start_fresh(training_cases)
            if taken:
                self.print_to_log_file(f"EM: training on other folds' out-of-fold refinements of {len(taken)} "
                                       f"case(s) from the start", also_print_to_console=True)
            os.makedirs(self.layout.em_folder)
            storage.write_json(self.layout.originals_file, self.labels.originals_manifest())
            self._em_state = TrainerRunState.new(state_file, self.em_settings, training_cases)
            self._em_state.save()
            return
        self._em_state = TrainerRunState.load_or_new(state_file, self.em_settings, training_cases)
        self._em_state.check_compatible(self.em_settings, training_cases)
        FoldLabels.verify_originals(self.layout.originals_file)
        self.labels.resume()
        boundary_round = self.current_epoch // self.em_settings.epochs_per_round
        if boundary_round > self._em_state.completed_rounds and not self._em_state.converged:
            self.print_to_log_file(f"EM: resuming the interrupted E-step of round {boundary_round}",
                                   also_print_to_console=True)
            self._run_estep(boundary_round)

    def _complete_round(self, round_index: int):
        # the checkpoint at the round's end is where --c restarts an interrupted E-step
        self.current_epoch -= 1  # nnU-Net's convention: a checkpoint stores current_epoch + 1
        self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        self.current_epoch += 1
        self._stop_dataloaders()
        self._run_estep(round_index)
        if self.current_epoch < self.num_epochs and not self._em_state.converged:
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()

    def _stop_dataloaders(self):
        old_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
        try:
            for loader in (self.dataloader_train, self.dataloader_val):
                if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                    loader._finish()
        finally:
            sys.stdout.close()
            sys.stdout = old_stdout
        self.dataloader_train = self.dataloader_val = None

    def held_out_cases(self) -> list[str]:
        """The cases this fold's E-step may judge: its validation cases, never a case its network trained on
        (``fold all`` has none: it only trains on what the other folds refined)."""
        training_cases, validation_cases = self.do_split()
        return sorted(set(validation_cases) - set(training_cases))

    def _run_estep(self, round_index: int):
        started = time.time()
        settings = self.em_settings
        cases = self.held_out_cases()
        round_folder = self.layout.round_folder(round_index)
        if not cases:
            taken = self.labels.take_exchanged(self._em_state.training_cases)
            summary = {"round": round_index, "epochs_trained": self.current_epoch, "judged_cases": [],
                       "refinement_applied": False,
                       "exchanged_cases": {case: {"fold": r["fold"], "round": r["round"]} for case, r in taken.items()},
                       "refinement_refused": f"fold {self.fold} has no validation cases, and a network never judges "
                                             f"cases it trained on; it trains on the other folds' refinements "
                                             f"({len(taken)} case(s) so far)",
                       "seconds_total": round(time.time() - started, 2)}
            self.labels.export_round(round_folder, {})
            reports.write_round_reports(round_folder, summary, [])
            self._em_state.complete_round(summary, converged=False)
            self.print_to_log_file(f"EM round {round_index}: {summary['refinement_refused']}",
                                   also_print_to_console=True)
            self.set_deep_supervision_enabled(self.enable_deep_supervision)
            self.network.train()
            return
        logits_cache = self.layout.logits_cache
        os.makedirs(logits_cache, exist_ok=True)
        inputs = _TrainerCaseInputs(self.labels, logits_cache, round_index)
        self._predict_logits(cases, logits_cache)
        prediction_seconds = time.time() - started
        step = EStep(EStepOptions.from_settings(settings), inputs,
                     num_classes=self.label_manager.num_segmentation_heads,
                     ignore_label=int(self.label_manager.ignore_label), round_index=round_index)
        # the gate's evidence: checked annotations and reviewed cases drawn at random (review export --audit)
        audited = [case for case in self.labels.reviewed.audited() if case in self.labels.reviewed_cases]
        decision = step.fit(cases, verified=[*self._inputs.verified_cases, *audited])
        for note in decision.notes():
            self.print_to_log_file(f"EM round {round_index}: {note}")
        refine, gate, verified = decision.refine, decision.gate, list(decision.verified)
        fit_done = time.time()

        scores, refined_cases = {}, {}
        for case in cases:
            if case in self.labels.reviewed_cases:  # frozen: trained on and exported as reviewed
                continue
            result = step.case(case, decision)
            scores[case] = result.scores
            storage.write_uncertainty(self.layout.uncertainty_file(round_index, case), result.uncertainty)
            refined_cases[case] = self.labels.publish(round_index, case, result.labels, applied=result.applied)
        shutil.rmtree(logits_cache)
        taken = self.labels.take_exchanged(self._em_state.training_cases)
        self.labels.apply_reviewed()
        refine_done = time.time()
        self.labels.export_round(round_folder, {**refined_cases, **taken})
        summary = {
            "round": round_index,
            "epochs_trained": self.current_epoch,
            "judged_cases": cases,
            "exchanged_cases": {case: {"fold": r["fold"], "round": r["round"]} for case, r in taken.items()},
            "noise_model": decision.model.to_dict(),
            **({"raters": decision.raters.to_dict()} if decision.raters is not None else {}),
            "model_dice": decision.model_dice,
            "refinement_applied": refine,
            "refinement_refused": decision.refused,
            "gate": gate,
            "verified": verified,
            **step.summary(scores, refine=refine),
            "seconds_prediction": round(prediction_seconds, 2),
            "seconds_fit": round(fit_done - started - prediction_seconds, 2),
            "seconds_refine": round(refine_done - fit_done, 2),
            "seconds_export": round(time.time() - refine_done, 2),
            "seconds_total": round(time.time() - started, 2),
        }
        reports.write_round_reports(round_folder, summary, step.ranking(scores))
        converged = summary["converged"]
        self._em_state.complete_round(summary, converged=converged)
        self._log_round(summary, converged)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        self.network.train()

    def _predict_logits(self, cases: list[str], logits_cache: str) -> None:
        """Each case's logits (and with ``em.second_opinion: mirror`` those of its image mirrored along the last
        axis, mirrored back, as ``nnunetv2_em run`` predicts them) into ``logits_cache``, as float16: a resumed
        E-step sees exactly the same numbers."""
        predictor = self._estep_predictor()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, cases)
        mirrored = (False, True) if self.em_settings.second_opinion == "mirror" else (False,)
        for case in cases:
            data = np.ascontiguousarray(dataset.load_case(case)[0][:])
            for mirror in mirrored:
                image = np.ascontiguousarray(np.flip(data, axis=-1)) if mirror else data
                logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(image)).float().cpu().numpy()
                if mirror:
                    logits = np.flip(logits, axis=-1)
                np.save(_TrainerCaseInputs.logits_file(logits_cache, case, mirrored=mirror),
                        np.ascontiguousarray(logits).astype(np.float16))

    def _estep_predictor(self) -> nnUNetPredictor:
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        if self.inference_allowed_mirroring_axes is None:
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=self.em_settings.mirroring,
                                    perform_everything_on_device=True, device=self.device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        return predictor

    def _log_round(self, summary: dict, converged: bool):
        noise = summary["noise_model"]
        if not summary["refinement_applied"]:
            self.print_to_log_file(
                f"EM round {summary['round']}: labels kept: the network's Dice with the annotation "
                f"({summary['model_dice']:.3f}) is below em.min_model_dice ({self.em_settings.min_model_dice})",
                also_print_to_console=True)
        self.print_to_log_file(
            f"EM round {summary['round']}: log-likelihood {noise['log_likelihood']:.5f} per voxel, temperature "
            f"{noise['temperature']:.3f}, changed {100 * summary['fraction_changed']:.3f}% / ignored "
            f"{100 * summary['fraction_ignored']:.3f}% of annotated voxels, "
            f"{100 * summary['fraction_changed_since_previous']:.3f}% differ from the previous round"
            f"{' -> converged' if converged else ''} ({summary['seconds_total']:.1f} s)",
            also_print_to_console=True)
        self.print_to_log_file(f"EM round {summary['round']}: transition[true, annotated] = "
                               f"{np.round(np.asarray(noise['transition']), 4).tolist()}", also_print_to_console=True)


class _TrainerCaseInputs:
    """The E-step's inputs (``estep.pipeline.CaseInputs``) over a fold's files: the round's logits cache and
    ``FoldLabels`` (the original preprocessed segmentations, this fold's newest refinement in the exchange, the weak
    labels and the reviewed labels)."""

    def __init__(self, labels: FoldLabels, logits_cache: str, round_index: int):
        self.labels = labels
        self.logits_cache = logits_cache
        self.round_index = round_index

    @staticmethod
    def logits_file(cache: str, case: str, *, mirrored: bool = False) -> str:
        return join(cache, f"{case}{'_mirrored' if mirrored else ''}.npy")

    def logits(self, case: str) -> np.ndarray:
        return np.load(self.logits_file(self.logits_cache, case)).astype(np.float32)

    def annotation(self, case: str) -> np.ndarray:
        return self.labels.annotation(case)

    def previous(self, case: str) -> np.ndarray:
        return self.labels.previous(case, self.round_index)

    def constraints(self, case: str):
        shape = np.load(self.logits_file(self.logits_cache, case), mmap_mode="r").shape[1:]
        return self.labels.constraints(case, shape)

    def truth(self, case: str) -> np.ndarray | None:
        return self.labels.reviewed_truth(case)

    def second_opinion(self, case: str) -> np.ndarray:
        return np.load(self.logits_file(self.logits_cache, case, mirrored=True)).astype(np.float32)

    def ratings(self, case: str) -> np.ndarray | None:
        return self.labels.ratings(case)
