"""A dataset's label versions (``nnunetv2_em run``, review imports): ``em_labels/`` with the originals
(round 0) and every round's complete labels, their manifests, the markers in ``labelsTr`` and beside the
preprocessed folder.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.storage.files import (
    TEMP_DIR_PREFIX,
    copy_file,
    fault_point,
    read_json,
    read_seg_b2nd,
    sha256,
    verified_copy,
    write_json,
    write_label_image,
    write_pickle,
    write_seg_b2nd,
)

ORIGINAL, REFINED, PSEUDO, REVIEWED = "original", "refined", "pseudo", "reviewed"
REVIEW_RUN = "em_review"  # the label versions that imports of reviewed labels activate: a "run" of their own
EM_LABELS = "em_labels"
SOFT_MAPS_FOLDER = "soft_targets"  # trainers/soft_targets.py reads the same folder
VERSION_MARKER = ".nnunetv2_em_version.json"  # in labelsTr (rounds >= 1)
PREPROCESSED_MARKER_SUFFIX = ".em_version.json"  # <data_identifier>.em_version.json beside nnU-Net's data folder
JOURNAL = "activation.json"  # in em_labels/: an activation that has started switching and not finished
STAGING_LABELS = ".em_staging_labelsTr"
PREVIOUS_LABELS = ".em_previous_labelsTr"


def exchange_paths(a: str, b: str) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). False where the
    platform or file system has no such call; the caller then falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(error, os.strerror(error), a)


def labels_switch_paths(raw_folder: str) -> tuple[str, str, str]:
    """``(live, staging, previous)``: the folder labelsTr is (a symlinked labelsTr is followed: the link stays and
    the folder it points to is switched) and the two folders beside it that a switch uses (same file system)."""
    live = os.path.realpath(os.path.join(raw_folder, "labelsTr"))
    parent, name = os.path.split(live)
    return live, os.path.join(parent, f".em_staging_{name}"), os.path.join(parent, f".em_previous_{name}")


def check_switchable(raw_folder: str) -> None:
    """One clear error, before anything moves, where labelsTr cannot be switched in place."""
    link = os.path.join(raw_folder, "labelsTr")
    live = labels_switch_paths(raw_folder)[0]
    if os.path.islink(link) and not os.path.isdir(live):
        raise EMInputError(f"{link}: a link to {os.readlink(link)}, which is not a folder here. Fix: mount or "
                           f"restore its target, then run again; nothing was changed.")
    if os.path.ismount(live):
        raise EMInputError(f"{live}: labelsTr is a mount point; a label version cannot be switched in one atomic "
                           f"step there. Fix: mount the share one level up and make labelsTr a folder (or a link "
                           f"to a folder) inside it; nothing was changed.")


def other_files(labels_folder: str, file_ending: str, *, versioned_cases=()) -> list[str]:
    """Names in a labels folder that no label version owns: anything but the version marker and the label files
    of ``versioned_cases`` (notes, sidecars, sub-folders, labels of other cases). They are never deleted: every
    switch of versions carries them over unchanged."""
    if not os.path.isdir(labels_folder):
        return []
    owned = {case + file_ending for case in versioned_cases} | {VERSION_MARKER}
    return sorted(name for name in os.listdir(labels_folder)
                  if name not in owned and not name.startswith(TEMP_DIR_PREFIX))


def non_label_files(labels_folder: str, file_ending: str) -> list[str]:
    """What a labels folder holds besides label files (``<case><file ending>``) and the version marker."""
    labels = [name[:-len(file_ending)] for name in os.listdir(labels_folder) if name.endswith(file_ending)] \
        if os.path.isdir(labels_folder) else []
    return other_files(labels_folder, file_ending, versioned_cases=labels)


def labels_digest(checksums: dict[str, str]) -> str:
    """One SHA-256 over ``{case: sha256 of its label file}``: the identity of a complete labelsTr."""
    return hashlib.sha256(json.dumps(sorted(checksums.items())).encode()).hexdigest()


def originals_manifest_path(raw_folder: str) -> str:
    """``em_labels/round_00/manifest.json``: its presence means the original annotations are kept (complete)."""
    return os.path.join(raw_folder, EM_LABELS, "round_00", "manifest.json")


def version_name(run: str | None, round_index: int) -> str:
    return "round 0 (the original annotations)" if round_index == 0 else f"round {round_index} of run {run}"


class DatasetLabelVersions:
    """Versioned labels of one nnU-Net dataset for the cross-fold loop; the only writer of ``labelsTr``.

        nnUNet_raw/<Dataset>/labelsTr/                 the active version (what nnU-Net trains on); from round 1 on
                                                       it holds .nnunetv2_em_version.json (run, round, checksum)
        nnUNet_raw/<Dataset>/em_labels/round_00/       the originals: labelsTr/, dataset.json, manifest.json
        nnUNet_raw/<Dataset>/em_labels/<run>/round_NN/ each round of each run: a complete labelsTr/ + dataset.json
                                                       + manifest.json (per case: provenance, scores, sha256)
        nnUNet_raw/<Dataset>/em_labels/<run>/added_images/   images a run brought in (--unlabeled), kept for restore
        nnUNet_raw/<Dataset>/em_labels/active.json     which version labelsTr holds (run, round, data identifier)
        nnUNet_raw/<Dataset>/em_labels/activation.json journal of a switch in progress (see ``activate``)
        nnUNet_preprocessed/<Dataset>/em_labels/[<run>/]round_NN/<data_identifier>/   the same versions as
                                                       nnU-Net's preprocessed segmentations (+ .pkl)

    Round 0 is copied and verified (SHA-256 against the source) before any label of the dataset is replaced. Each
    run (``em_run__<trainer>__<plans>__<configuration>``) keeps its rounds in a folder of its own, so a second run
    never overwrites the first one's versions.
    """

    def __init__(self, raw_folder: str, preprocessed_folder: str, data_identifier: str, file_ending: str,
                 run: str | None = None):
        self.raw_folder = raw_folder
        self.preprocessed_folder = preprocessed_folder
        self.data_identifier = data_identifier
        self.file_ending = file_ending
        self.run = run
        self.root = os.path.join(raw_folder, EM_LABELS)

    # paths
    def _version_parts(self, round_index: int, run: str | None) -> list[str]:
        if round_index == 0:
            return [f"round_{round_index:02d}"]
        run = run or self.run
        if not run:
            raise ValueError("rounds >= 1 belong to a run: pass run=")
        return [run, f"round_{round_index:02d}"]

    def round_folder(self, round_index: int, run: str | None = None) -> str:
        return os.path.join(self.root, *self._version_parts(round_index, run))

    def labels_folder(self, round_index: int, run: str | None = None) -> str:
        return os.path.join(self.round_folder(round_index, run), "labelsTr")

    def label_path(self, round_index: int, case: str, run: str | None = None) -> str:
        return os.path.join(self.labels_folder(round_index, run), case + self.file_ending)

    def segmentation_folder(self, round_index: int, run: str | None = None, data_identifier: str | None = None) -> str:
        return os.path.join(self.preprocessed_folder, EM_LABELS, *self._version_parts(round_index, run),
                            data_identifier or self.data_identifier)

    def live_data_folder(self, data_identifier: str | None = None) -> str:
        return os.path.join(self.preprocessed_folder, data_identifier or self.data_identifier)

    def live_labels_folder(self) -> str:
        return os.path.join(self.raw_folder, "labelsTr")

    def added_images_folder(self, run: str | None = None) -> str:
        return os.path.join(self.root, run or self.run, "added_images")

    def manifest_path(self, round_index: int, run: str | None = None) -> str:
        return os.path.join(self.round_folder(round_index, run), "manifest.json")

    def journal_path(self) -> str:
        return os.path.join(self.root, JOURNAL)

    def active_path(self) -> str:
        return os.path.join(self.root, "active.json")

    def has_originals(self) -> bool:
        return os.path.isfile(originals_manifest_path(self.raw_folder))

    def read_manifest(self, round_index: int, run: str | None = None) -> dict:
        return read_json(self.manifest_path(round_index, run))

    def active(self) -> dict:
        """``{"run", "round", "data_identifier"}`` of the version labelsTr holds (round 0 when none was activated)."""
        if not os.path.isfile(self.active_path()):
            return {"run": None, "round": 0, "data_identifier": None}
        active = read_json(self.active_path())
        return {"run": active.get("run"), "round": int(active["round"]),
                "data_identifier": active.get("data_identifier")}

    def runs(self) -> dict[str, list[int]]:
        """``{run: [rounds with a complete manifest]}`` kept in em_labels."""
        found = {}
        if os.path.isdir(self.root):
            for run in sorted(os.listdir(self.root)):
                folder = os.path.join(self.root, run)
                if run.startswith(("round_", ".")) or not os.path.isdir(folder):
                    continue
                found[run] = sorted(int(name.split("_")[1]) for name in os.listdir(folder)
                                    if name.startswith("round_") and
                                    os.path.isfile(os.path.join(folder, name, "manifest.json")))
        return found

    # round 0
    def keep_originals(self, cases: Iterable[str]) -> dict:
        """Copy and verify the original raw labels and dataset.json (once per dataset) and the preprocessed
        segmentations (once per data identifier)."""
        cases = sorted(cases)
        if not self.has_originals():
            entries = {}
            for case in cases:
                source = os.path.join(self.live_labels_folder(), case + self.file_ending)
                copy = self.label_path(0, case)
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                entries[case] = {"provenance": ORIGINAL, "sha256": verified_copy(source, copy)}
                fault_point("copying_originals")
            copy_file(os.path.join(self.raw_folder, "dataset.json"), os.path.join(self.round_folder(0), "dataset.json"))
            manifest = {"round": 0, "cases": entries, "labels_sha256": labels_digest(
                {case: entry["sha256"] for case, entry in entries.items()})}
            write_json(self.manifest_path(0), manifest)  # last: its presence means round 0 is complete
        complete = os.path.join(self.segmentation_folder(0), "complete.json")
        if not os.path.isfile(complete):
            live_marker = preprocessed_em_output(self.live_data_folder())
            if live_marker:
                raise EMInputError(f"{self.live_data_folder()}: holds EM output ({live_marker}), not the original "
                                   f"segmentations. Fix: `nnunetv2_em restore -d {os.path.basename(self.raw_folder)} "
                                   f"--round 0`, or preprocess this configuration again from the originals.")
            for case in self.read_manifest(0)["cases"]:
                for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
                    copy = os.path.join(self.segmentation_folder(0), name)
                    os.makedirs(os.path.dirname(copy), exist_ok=True)
                    verified_copy(os.path.join(self.live_data_folder(), name), copy)
            write_json(complete, {"data_identifier": self.data_identifier})
        return self.read_manifest(0)

    def original_label_path(self, case: str) -> str:
        return self.label_path(0, case)

    def read_segmentation(self, round_index: int, case: str) -> np.ndarray:
        return read_seg_b2nd(os.path.join(self.segmentation_folder(round_index), f"{case}_seg.b2nd"))

    def read_original_segmentation(self, case: str) -> np.ndarray:
        return self.read_segmentation(0, case)

    def original_properties_path(self, case: str) -> str:
        return os.path.join(self.segmentation_folder(0), f"{case}.pkl")

    def changed_originals(self) -> list[str]:
        """Cases whose round-0 copy no longer has its recorded checksum (empty: the originals are intact)."""
        manifest = self.read_manifest(0)
        return [case for case, entry in manifest["cases"].items()
                if not os.path.isfile(self.label_path(0, case)) or sha256(self.label_path(0, case)) != entry["sha256"]]

    # a new round
    def write_case(self, round_index: int, case: str, *, raw_label: np.ndarray, raw_properties: dict,
                   reader_writer, segmentation: np.ndarray, properties: dict, patch_size,
                   soft_maps: np.ndarray | None = None, provenance: str = REFINED) -> None:
        """Stage one case of a round: the raw-geometry label (stamped with its provenance, ``stamp_label``) and the
        preprocessed segmentation (+ properties), and optionally its sampled label maps ``(K, *spatial)`` for
        ``SoftTargetTrainer`` (``soft_targets/``)."""
        os.makedirs(self.labels_folder(round_index), exist_ok=True)
        write_label_image(self.label_path(round_index, case), raw_label, raw_properties, reader_writer,
                          provenance=f"{provenance}, round {round_index} of {self.run}")
        folder = self.segmentation_folder(round_index)
        os.makedirs(folder, exist_ok=True)
        if soft_maps is not None:
            write_seg_b2nd(soft_maps_path(folder, case), soft_maps, patch_size)
        write_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"), segmentation, patch_size)
        write_pickle(os.path.join(folder, f"{case}.pkl"), properties)

    def copy_case(self, from_round: int, to_round: int, case: str, *, from_run: str | None = None) -> None:
        """Stage a case unchanged from another round of this run (or round 0, or a round of ``from_run``)."""
        source = self.segmentation_folder(from_round, from_run)
        os.makedirs(self.labels_folder(to_round), exist_ok=True)
        copy_file(self.label_path(from_round, case, from_run), self.label_path(to_round, case))
        os.makedirs(self.segmentation_folder(to_round), exist_ok=True)
        for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
            copy_file(os.path.join(source, name), os.path.join(self.segmentation_folder(to_round), name))
        soft = soft_maps_path(source, case)
        if os.path.isfile(soft):
            copy_file(soft, soft_maps_path(self.segmentation_folder(to_round), case))

    def keep_added_images(self, case: str, images: list[str]) -> list[str]:
        """Copy a case's images from outside the dataset (--unlabeled) into the run's version folder, so that any
        later restore finds them; returns their paths relative to em_labels."""
        kept = []
        os.makedirs(self.added_images_folder(), exist_ok=True)
        for index, image in enumerate(images):
            target = os.path.join(self.added_images_folder(), f"{case}_{index:04d}{self.file_ending}")
            if not os.path.isfile(target):
                verified_copy(image, target)
            kept.append(os.path.relpath(target, self.root))
        return kept

    def write_round_metadata(self, round_index: int, dataset_json: dict, cases: dict[str, dict], *,
                             extra: dict | None = None) -> None:
        """dataset.json and manifest of a round whose cases are all staged; ``cases``: {case: {provenance, ...,
        optionally "images" (relative to em_labels) and "preprocessed_image" for cases the run adds}};
        ``extra``: more top-level manifest fields (a review version's ``base``)."""
        entries = {case: {**entry, "sha256": sha256(self.label_path(round_index, case))}
                   for case, entry in sorted(cases.items())}
        write_json(os.path.join(self.round_folder(round_index), "dataset.json"),
                   {**dataset_json, "numTraining": len(entries)})
        write_json(self.manifest_path(round_index), {
            "round": round_index, "run": self.run, "data_identifier": self.data_identifier, **(extra or {}),
            "labels_sha256": labels_digest({case: entry["sha256"] for case, entry in entries.items()}),
            "cases": entries})


def read_labels_marker(labels_folder: str) -> dict | None:
    """The version marker of a labels folder (labelsTr or a staged one), or None (the originals carry none)."""
    path = os.path.join(labels_folder, VERSION_MARKER)
    return read_json(path) if os.path.isfile(path) else None


def read_preprocessed_marker(data_folder: str) -> dict | None:
    """The version marker of a preprocessed data folder; kept beside it, since nnU-Net infers its dataset class
    from the file endings inside the folder."""
    path = preprocessed_marker_path(data_folder)
    return read_json(path) if os.path.isfile(path) else None


def preprocessed_em_output(data_folder: str) -> dict | None:
    """The marker of a preprocessed data folder if it holds a run's segmentations (or a switch to them), else
    None: the folder holds nnU-Net's own preprocessing of the annotations."""
    marker = read_preprocessed_marker(data_folder)
    return marker if marker and (marker.get("round") or marker.get("switching")) else None


def preprocessed_marker_path(data_folder: str) -> str:
    return os.path.normpath(data_folder) + PREPROCESSED_MARKER_SUFFIX


def soft_maps_path(data_folder: str, case: str) -> str:
    """A case's sampled label maps for ``SoftTargetTrainer`` in a preprocessed data folder (a subfolder: nnU-Net's
    case listing never sees them)."""
    return os.path.join(data_folder, SOFT_MAPS_FOLDER, f"{case}.b2nd")
