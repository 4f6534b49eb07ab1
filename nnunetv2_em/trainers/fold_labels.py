"""The labels one ``EMTrainer`` fold trains on and judges: its private copy of the preprocessed segmentations, the
exchange of out-of-fold refinements between folds, the labels a person reviewed, the weak labels, and the round's
labels written back in raw geometry. Files only: what the E-step computes comes from ``estep``, how nnU-Net's spaces
convert from ``nnunet_data``, how files are written from ``storage``.
"""

from __future__ import annotations

import os

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json, load_pickle

from nnunetv2_em import nnunet_data, storage
from nnunetv2_em.errors import EMInputError


class FoldLabels:
    """What is on disk for one fold: ``training`` (``storage.TrainingLabelFolder``: nnU-Net reads its
    segmentations), ``exchange`` (``storage.FoldExchange``: every fold's published refinements), ``reviewed``
    (``storage.ReviewedLabels``; ``reviewed_cases`` are trained on as they are and never judged) and ``weak``
    (``{case: weak_labels.CaseConstraints}``). ``trainer`` is the nnU-Net trainer whose managers, dataset.json and
    folders say how the arrays are laid out."""

    def __init__(self, trainer, *, training: storage.TrainingLabelFolder, exchange: storage.FoldExchange,
                 reviewed: storage.ReviewedLabels, reviewed_cases: list[str], weak: dict, raters=None,
                 images: dict | None = None):
        self.trainer = trainer
        self.training = training
        self.exchange = exchange
        self.reviewed = reviewed
        self.reviewed_cases = reviewed_cases
        self.weak = weak
        self.raters = raters  # multi_rater.RaterSet, or None
        self.images = images or {}  # {case: raw image files}

    @property
    def fold(self):
        return self.trainer.fold

    def all_cases(self) -> list[str]:
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

        return nnUNetDatasetBlosc2.get_identifiers(self.training.original_folder)

    # ---------------------------------------------------------------------------- training labels
    def start_fresh(self, training_cases: list[str]) -> dict[str, dict]:
        """Back to the original segmentations, this fold's published refinements dropped; then the other folds'
        refinements and the reviewed labels applied. Returns the exchange records taken."""
        cases = self.all_cases()
        self.training.reset(cases)
        self.exchange.clear_fold(self.fold)
        self.complete_class_locations(cases)
        taken = self.take_exchanged(training_cases)
        self.apply_reviewed()
        return taken

    def resume(self) -> None:
        self.complete_class_locations(self.all_cases())
        self.apply_reviewed()  # reviewed since the last start (--c picks them up)

    def complete_class_locations(self, cases) -> None:
        """Plans from another planner lack the ignore label at preprocessing time, so their ``class_locations``
        lack the annotated-voxels key nnU-Net's loader needs once the ignore label exists: add it."""
        label_manager = self.trainer.label_manager
        annotated_key = (-1, *label_manager.all_labels)
        for case in cases:
            properties = load_pickle(self.training.properties_path(case))
            if annotated_key not in properties["class_locations"]:
                seg = self.training.read_current_seg(case)
                properties["class_locations"] = nnunet_data.class_locations(seg, label_manager)
                self.training.write_properties(case, properties)

    def apply_reviewed(self) -> None:
        """Train every reviewed case on its reviewed label (its preprocessed segmentation is made once per
        configuration from the reviewed file; images are not preprocessed again)."""
        trainer = self.trainer
        identifier = trainer.configuration_manager.data_identifier
        for case in self.reviewed_cases:
            if not self.reviewed.has_segmentation(case, identifier):
                from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

                raw_folder = join(os.environ["nnUNet_raw"], trainer.plans_manager.dataset_name)
                images = get_filenames_of_train_images_and_targets(raw_folder, trainer.dataset_json)[case]["images"]
                self.reviewed.make_segmentation(case, images, trainer.plans_manager, trainer.configuration_manager,
                                                trainer.dataset_json)
            self._train_on(case, self.reviewed.read_segmentation(case, identifier))

    def take_exchanged(self, training_cases) -> dict[str, dict]:
        """Train on the newest out-of-fold refinement another fold published for each training case (the others
        keep their current labels; reviewed cases keep their reviewed labels); returns the records taken."""
        taken = {}
        for case in training_cases:
            if case in self.reviewed_cases:
                continue
            record = self.exchange.latest(case, original_seg_path=self.training.original_seg_path(case),
                                          exclude_fold=self.fold)
            if record is None:
                continue
            self._train_on(case, storage.read_seg_b2nd(record["seg_path"]))
            taken[case] = record
        return taken

    def _train_on(self, case: str, segmentation: np.ndarray) -> None:
        properties = load_pickle(self.training.original_properties_path(case))
        properties["class_locations"] = nnunet_data.class_locations(segmentation, self.trainer.label_manager)
        self.training.write_case(case, segmentation, properties, self.trainer.configuration_manager.patch_size)

    def publish(self, round_index: int, case: str, labels: np.ndarray, *, applied: bool) -> dict:
        """This fold's refinement of a judged case, ``labels`` (x, y, z), for the other folds; returns its record."""
        original = self.training.original_seg_path(case)
        self.exchange.publish(self.fold, round_index, case, labels[None], original_seg_path=original,
                              patch_size=self.trainer.configuration_manager.patch_size, record={"refined": applied})
        return self.exchange.latest(case, original_seg_path=original)

    # ------------------------------------------------------------------------- the E-step's inputs
    def annotation(self, case: str) -> np.ndarray:
        """(x, y, z) the original preprocessed segmentation."""
        return self.training.read_original_seg(case)[0]

    def previous(self, case: str, round_index: int) -> np.ndarray:
        """(x, y, z) this fold's newest refinement before ``round_index``, or the annotation."""
        mine = self.exchange.latest(case, original_seg_path=self.training.original_seg_path(case),
                                    up_to_round=round_index - 1)
        return storage.read_seg_b2nd(mine["seg_path"])[0] if mine else self.annotation(case)

    def constraints(self, case: str, shape):
        """The case's weak labels in its preprocessed array of ``shape`` (x, y, z), or None."""
        if case not in self.weak:
            return None
        properties = load_pickle(self.training.original_properties_path(case))
        return nnunet_data.constraints_to_preprocessed(self.weak[case], properties, self.trainer.plans_manager,
                                                       shape)

    def reviewed_truth(self, case: str) -> np.ndarray | None:
        """(x, y, z) a reviewed case's labels in the preprocessed array (the fit's complete data, the gate's
        truth), or None."""
        if case not in self.reviewed_cases:
            return None
        return self.reviewed.read_segmentation(case, self.trainer.configuration_manager.data_identifier)[0]

    def ratings(self, case: str) -> np.ndarray | None:
        """``(R, *spatial)`` every rater's label in the preprocessed array (``-1`` where a rater did not annotate),
        each preprocessed once per configuration into the cache ``nnunetv2_em run`` shares; None without raters."""
        if self.raters is None or not self.raters.raters_of(case):
            return None
        from nnunetv2_em.layout import rater_segmentation_path

        trainer = self.trainer
        identifier = trainer.configuration_manager.data_identifier
        maps = {}
        for rater in self.raters.raters_of(case):
            path = rater_segmentation_path(trainer.preprocessed_dataset_folder_base, identifier, rater, case)
            if not os.path.isfile(path):
                segmentation, _ = nnunet_data.preprocess_label(self.raters.files[rater][case], self.images[case],
                                                               trainer.plans_manager, trainer.configuration_manager,
                                                               trainer.dataset_json)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                storage.write_seg_b2nd(path, segmentation, trainer.configuration_manager.patch_size)
            maps[rater] = storage.read_seg_b2nd(path)[0]
        shape = next(iter(maps.values())).shape
        stacked = np.stack([maps.get(rater, np.full(shape, -1, np.int16)) for rater in self.raters.raters])
        return np.where(stacked == int(trainer.label_manager.ignore_label), -1, stacked)

    # ------------------------------------------------------------------------------ raw geometry
    def gt_path(self, case: str) -> str:
        trainer = self.trainer
        return join(trainer.preprocessed_dataset_folder_base, "gt_segmentations",
                    case + trainer.dataset_json["file_ending"])

    def export_round(self, round_folder: str, records: dict[str, dict]) -> None:
        """The round's complete ``labelsTr`` in raw geometry: the exchange refinement in ``records`` (this fold's
        judged cases and the training cases taken from other folds), byte copies of the originals or reviewed
        labels for every other case."""
        trainer = self.trainer
        reader_writer = trainer.plans_manager.image_reader_writer_class()

        def refined_label(case):
            if case not in records:
                return None
            properties = load_pickle(self.training.original_properties_path(case))
            original_raw = np.asarray(reader_writer.read_seg(self.gt_path(case))[0][0]).astype(np.int32)
            raw = nnunet_data.refined_raw_label(original_raw, self.training.read_original_seg(case),
                                                storage.read_seg_b2nd(records[case]["seg_path"]), properties,
                                                trainer.plans_manager, trainer.configuration_manager)
            return raw, properties

        def as_is(case):
            return self.reviewed.label_path(case) if case in self.reviewed_cases else self.gt_path(case)

        storage.write_round_labels(
            join(round_folder, "labelsTr"), self.all_cases(), file_ending=trainer.dataset_json["file_ending"],
            original_label_path=as_is, refined_label=refined_label, reader_writer=reader_writer,
            provenance=f"refined, {os.path.basename(os.path.normpath(round_folder))} of "
                       f"{trainer.__class__.__name__} fold {self.fold}")
        storage.write_json(join(round_folder, "dataset.json"), trainer.dataset_json)

    # -------------------------------------------------------------------------------- originals
    def originals_manifest(self) -> dict:
        """Checksums of every original this fold reads (preprocessed segmentations and properties, nnU-Net's
        gt_segmentations)."""
        files = {}
        for case in self.all_cases():
            files[f"preprocessed/{case}_seg.b2nd"] = self.training.original_seg_path(case)
            files[f"preprocessed/{case}.pkl"] = self.training.original_properties_path(case)
            if os.path.isfile(self.gt_path(case)):
                files[f"gt_segmentations/{case}{self.trainer.dataset_json['file_ending']}"] = self.gt_path(case)
        return storage.checksum_manifest(files)

    @staticmethod
    def verify_originals(manifest_file: str) -> None:
        """Refuse to resume when an original changed since the manifest was written."""
        if not os.path.isfile(manifest_file):
            return
        changed = storage.changed_files(load_json(manifest_file))
        if changed:
            raise EMInputError(f"{len(changed)} original label file(s) changed since this run started, e.g. "
                               f"{changed[0]} (checksums in {manifest_file}). Fix: start a fresh training (without "
                               f"--c) on the current labels.")
