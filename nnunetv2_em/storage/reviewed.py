"""Labels a person reviewed (``nnunetv2_em review import``): kept for good, trained on as they are, never judged.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from nnunetv2_em.storage.files import (
    copy_file,
    read_json,
    read_seg_b2nd,
    sha256,
    verified_copy,
    write_json,
    write_pickle,
    write_seg_b2nd,
)
from nnunetv2_em.storage.versions import EM_LABELS, REVIEW_RUN, REVIEWED, DatasetLabelVersions


class ReviewedLabels:
    """Labels a person reviewed (``nnunetv2_em review import``): kept for good, never changed by an E-step, and
    trusted (the noise model's complete data, the precision gate's verified cases). Survives every restore.

        nnUNet_raw/<Dataset>/em_labels/em_review/store/<case>/v<k><file ending>   every reviewed label ever imported
        nnUNet_raw/<Dataset>/em_labels/em_review/store/reviewed.json               {case: record of its latest}
        nnUNet_preprocessed/<Dataset>/em_labels/em_review/store/<data_identifier>/<case>_seg.b2nd, <case>.pkl,
                                                      <case>.json (the label checksum the segmentation was made from)
    """

    def __init__(self, raw_folder: str, preprocessed_folder: str, file_ending: str):
        self.raw_folder = raw_folder
        self.preprocessed_folder = preprocessed_folder
        self.file_ending = file_ending
        self.root = os.path.join(raw_folder, EM_LABELS, REVIEW_RUN, "store")

    @property
    def index_path(self) -> str:
        return os.path.join(self.root, "reviewed.json")

    def records(self) -> dict[str, dict]:
        """``{case: record}`` of the latest reviewed label per case (``{}`` before any import)."""
        return read_json(self.index_path)["cases"] if os.path.isfile(self.index_path) else {}

    def provenance(self, case: str) -> dict:
        """What a label version records of a reviewed case: which review, by whom, when, from which proposal."""
        record = self.records()[case]
        return {key: record[key] for key in ("version", "reviewer", "imported", "proposal") if key in record}

    def label_path(self, case: str, version: int | None = None) -> str:
        version = self.records()[case]["version"] if version is None else version
        return os.path.join(self.root, case, f"v{version}{self.file_ending}")

    def segmentation_folder(self, data_identifier: str) -> str:
        return os.path.join(self.preprocessed_folder, EM_LABELS, REVIEW_RUN, "store", data_identifier)

    def has_segmentation(self, case: str, data_identifier: str) -> bool:
        """The case's preprocessed segmentation exists and was made from its latest reviewed label."""
        source = os.path.join(self.segmentation_folder(data_identifier), f"{case}.json")
        return os.path.isfile(source) and read_json(source).get("sha256") == self.records()[case]["sha256"]

    def read_segmentation(self, case: str, data_identifier: str) -> np.ndarray:
        """``(1, *spatial)`` preprocessed reviewed labels."""
        return read_seg_b2nd(os.path.join(self.segmentation_folder(data_identifier), f"{case}_seg.b2nd"))

    def keep(self, cases: dict[str, tuple[str, dict]]) -> dict[str, dict]:
        """Copy and verify reviewed label files into the store: ``{case: (file, record)}``; returns the records
        with ``version``, ``sha256`` and ``file`` added. Nothing is visible until ``commit``."""
        kept = {}
        previous = self.records()
        for case, (source, record) in sorted(cases.items()):
            version = previous[case]["version"] + 1 if case in previous else 1
            target = self.label_path(case, version)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            kept[case] = {**record, "version": version, "sha256": verified_copy(source, target),
                          "file": os.path.relpath(target, self.root)}
        return kept

    def write_segmentation(self, case: str, data_identifier: str, segmentation: np.ndarray, properties: dict,
                           patch_size, label_sha256: str) -> None:
        folder = self.segmentation_folder(data_identifier)
        os.makedirs(folder, exist_ok=True)
        write_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"), segmentation, patch_size)
        write_pickle(os.path.join(folder, f"{case}.pkl"), properties)
        write_json(os.path.join(folder, f"{case}.json"), {"sha256": label_sha256})  # last: the pair is complete

    def audited(self) -> list[str]:
        """Reviewed cases drawn at random for review (``review export --audit``): the only ones from which the
        precision of an E-step's changes may be estimated (a ranked choice is not a sample of the dataset)."""
        return sorted(case for case, record in self.records().items() if record.get("selection") == "audit")

    def make_segmentation(self, case: str, image_files: list[str], plans_manager, configuration_manager,
                          dataset_json: dict, *, record: dict | None = None) -> None:
        """Preprocess the case's reviewed label into the segmentation nnU-Net trains on, for the configuration's
        data identifier (nnU-Net's preprocessing; the image is preprocessed in memory, never written).
        ``record``: a label kept but not yet committed (``keep``); default the case's latest."""
        from nnunetv2_em.nnunet_data import preprocess_label

        record = self.records()[case] if record is None else record
        segmentation, properties = preprocess_label(self.label_path(case, record["version"]), image_files,
                                                    plans_manager, configuration_manager, dataset_json)
        self.write_segmentation(case, configuration_manager.data_identifier, segmentation, properties,
                                configuration_manager.patch_size, record["sha256"])

    def commit(self, records: dict[str, dict]) -> None:
        """Make kept labels the cases' reviewed labels (one atomic write of the index)."""
        write_json(self.index_path, {"cases": {**self.records(), **records}})


def stage_reviewed_case(versions: DatasetLabelVersions, round_index: int, case: str, reviewed: ReviewedLabels
                        ) -> None:
    """Stage a reviewed case into a round: its reviewed label file byte for byte, and its preprocessed
    segmentation for this data identifier (``ReviewedLabels.write_segmentation`` made it)."""
    os.makedirs(versions.labels_folder(round_index), exist_ok=True)
    copy_file(reviewed.label_path(case), versions.label_path(round_index, case))
    if sha256(versions.label_path(round_index, case)) != reviewed.records()[case]["sha256"]:
        raise OSError(f"{versions.label_path(round_index, case)}: copy differs from {reviewed.label_path(case)}")
    os.makedirs(versions.segmentation_folder(round_index), exist_ok=True)
    for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
        copy_file(os.path.join(reviewed.segmentation_folder(versions.data_identifier), name),
                  os.path.join(versions.segmentation_folder(round_index), name))


def stage_review_version(versions: DatasetLabelVersions, reviewed: ReviewedLabels, cases: list[str]) -> int:
    """A new ``em_review`` version: the active version with ``cases`` replaced by their reviewed labels, staged
    complete (manifest last); returns its round number. ``versions``: set to the active run and data identifier."""
    active = versions.active()
    base_manifest = versions.read_manifest(active["round"], active["run"])
    target = DatasetLabelVersions(versions.raw_folder, versions.preprocessed_folder, versions.data_identifier,
                                  versions.file_ending, REVIEW_RUN)
    round_index = max(versions.runs().get(REVIEW_RUN, [0]), default=0) + 1
    shutil.rmtree(target.round_folder(round_index), ignore_errors=True)  # an import killed while staging
    shutil.rmtree(target.segmentation_folder(round_index), ignore_errors=True)
    entries = {}
    for case, entry in base_manifest["cases"].items():
        if case in cases:
            stage_reviewed_case(target, round_index, case, reviewed)
            entries[case] = {"provenance": REVIEWED, "reviewed": reviewed.provenance(case)}
            continue
        target.copy_case(active["round"], round_index, case, from_run=active["run"])
        entries[case] = {key: value for key, value in entry.items() if key != "sha256"}
    dataset_json = read_json(os.path.join(versions.round_folder(active["round"], active["run"]), "dataset.json"))
    target.write_round_metadata(round_index, dataset_json, entries,
                                extra={"base": {"run": active["run"], "round": active["round"]}})
    return round_index


def review_version_base(raw_folder: str, round_index: int) -> dict:
    """``{"run", "round"}`` of the version an ``em_review`` version was made from."""
    return read_json(os.path.join(raw_folder, EM_LABELS, REVIEW_RUN, f"round_{round_index:02d}",
                                   "manifest.json")).get("base", {})
