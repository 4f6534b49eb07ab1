"""Label versions on disk. The only module that writes label files; every write is atomic (temp file + rename).

Layout for a training run (``EMTrainer``), next to nnU-Net's own folders, which are only ever read:

    nnUNet_preprocessed/<Dataset>/
        <data_identifier>/                       nnU-Net's preprocessed cases: the original labels, never written
        em_training_labels/<Trainer>__<Plans>__<configuration>/fold_<f>/
            <case>.b2nd          -> symlink to nnU-Net's image (images are never re-preprocessed)
            <case>_seg.b2nd      -> symlink to the original, or the refined segmentation of the last E-step
            <case>.pkl           -> symlink to the original, or a copy with recomputed class_locations
    nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>/fold_<f>/em/
        state.json               resumable state of the loop
        originals.json           SHA-256 of every original label file the run reads
        round_<r>/labelsTr/      the round's labels in raw geometry: a complete labelsTr folder
        round_<r>/dataset.json   nnU-Net dataset.json for it (with the ignore label)
        round_<r>/cases.csv|json cases ranked by how much review they need
        round_<r>/summary.json   noise model, likelihood and change counts of the round

A run's training segmentations live in a folder of their own, so folds can train at the same time and a vanilla
nnU-Net training on the same preprocessed data still sees the original annotation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterable

import blosc2
import numpy as np

from nnunetv2_em.nnunet_data import SEG_DTYPE, blosc2_seg_layout

TEMP_DIR_PREFIX = ".em_tmp_"


# --------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def _temp_folder(folder: str):
    """A hidden folder of its own next to the target (nnU-Net lists folders by file ending and never sees it);
    one per write, so concurrent writers never remove each other's."""
    temp_folder = os.path.join(folder, f"{TEMP_DIR_PREFIX}{uuid.uuid4().hex}")
    os.makedirs(temp_folder)
    try:
        yield temp_folder
    finally:
        shutil.rmtree(temp_folder, ignore_errors=True)


def atomic_write(path: str, write: Callable[[str], None], *, suffix: str = "") -> None:
    """Write ``path`` through ``write(temp_path)`` and an ``os.replace``: readers see the old or the new file.

    ``suffix`` keeps writers that pick a format by extension (.nii.gz, .b2nd) happy.
    """
    with _temp_folder(os.path.dirname(os.path.abspath(path))) as temp_folder:
        temp_path = os.path.join(temp_folder, f"file{suffix}")
        write(temp_path)
        os.replace(temp_path, path)


def write_json(path: str, obj) -> None:
    def write(temp):
        with open(temp, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False, allow_nan=True)
            handle.write("\n")

    atomic_write(path, write, suffix=".json")


def write_text(path: str, text: str) -> None:
    def write(temp):
        with open(temp, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_pickle(path: str, obj) -> None:
    def write(temp):
        with open(temp, "wb") as handle:
            pickle.dump(obj, handle)

    atomic_write(path, write, suffix=".pkl")


def copy_file(source: str, destination: str) -> None:
    atomic_write(destination, lambda temp: shutil.copyfile(source, temp), suffix=_full_suffix(destination))


def write_seg_b2nd(path: str, seg: np.ndarray, patch_size) -> None:
    """Write a ``(1, *spatial)`` segmentation the way nnU-Net's preprocessor does (int16, its blosc2 layout)."""
    seg = np.ascontiguousarray(seg, dtype=SEG_DTYPE)
    blocks, chunks = blosc2_seg_layout(seg.shape, patch_size)

    def write(temp):
        blosc2.asarray(seg, urlpath=temp, chunks=chunks, blocks=blocks,
                       cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})

    atomic_write(path, write, suffix=".b2nd")


def write_label_image(path: str, seg: np.ndarray, properties: dict, reader_writer) -> None:
    """Write a raw-geometry label map with nnU-Net's reader/writer (geometry from the case's ``properties``)."""
    seg = np.asarray(seg)
    atomic_write(path, lambda temp: reader_writer.write_seg(seg, temp, properties), suffix=_full_suffix(path))


def read_seg_b2nd(path: str) -> np.ndarray:
    return blosc2.open(urlpath=path, mode="r")[:]


def _full_suffix(path: str) -> str:
    name = os.path.basename(path)
    return name[name.index("."):] if "." in name else ""


# ------------------------------------------------------------------------------------------------- checksums
def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_manifest(files: dict[str, str]) -> dict[str, dict]:
    """``{name: path}`` -> ``{name: {"path": path, "sha256": ...}}``."""
    return {name: {"path": os.path.abspath(path), "sha256": sha256(path)} for name, path in sorted(files.items())}


def changed_files(manifest: dict[str, dict]) -> list[str]:
    """Names in a checksum manifest whose file is missing or no longer has the recorded checksum."""
    return [name for name, entry in manifest.items()
            if not os.path.isfile(entry["path"]) or sha256(entry["path"]) != entry["sha256"]]


# -------------------------------------------------------------------------------- a run's training labels
class TrainingLabelFolder:
    """A fold-private view of nnU-Net's preprocessed folder whose segmentations the E-step may replace.

    Images are symlinks to nnU-Net's files. A segmentation (and its ``.pkl``, which holds ``class_locations``)
    is a symlink to the original until the E-step writes a refined version, as a regular file, atomically.
    """

    def __init__(self, original_folder: str, folder: str):
        self.original_folder = os.path.abspath(original_folder)
        self.folder = os.path.abspath(folder)

    def seg_path(self, case: str) -> str:
        return os.path.join(self.folder, f"{case}_seg.b2nd")

    def properties_path(self, case: str) -> str:
        return os.path.join(self.folder, f"{case}.pkl")

    def original_seg_path(self, case: str) -> str:
        return os.path.join(self.original_folder, f"{case}_seg.b2nd")

    def original_properties_path(self, case: str) -> str:
        return os.path.join(self.original_folder, f"{case}.pkl")

    def _link(self, name: str) -> None:
        link = os.path.join(self.folder, name)
        target = os.path.relpath(os.path.join(self.original_folder, name), self.folder)
        if os.path.islink(link) and os.readlink(link) == target:
            return
        with _temp_folder(self.folder) as temp_folder:
            os.symlink(target, os.path.join(temp_folder, "link"))
            os.replace(os.path.join(temp_folder, "link"), link)

    def ensure(self, cases: Iterable[str]) -> None:
        """Create the folder with links for every case that has no entry yet (existing refinements are kept)."""
        os.makedirs(self.folder, exist_ok=True)
        for case in cases:
            for name in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl"):
                if not os.path.lexists(os.path.join(self.folder, name)):
                    self._link(name)

    def reset(self, cases: Iterable[str]) -> None:
        """Point every case back at the original segmentation and properties (a fresh run starts here)."""
        os.makedirs(self.folder, exist_ok=True)
        for case in cases:
            for name in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl"):
                self._link(name)

    def is_refined(self, case: str) -> bool:
        return not os.path.islink(self.seg_path(case))

    def write_properties(self, case: str, properties: dict) -> None:
        write_pickle(self.properties_path(case), properties)

    def write_case(self, case: str, seg: np.ndarray, properties: dict, patch_size) -> None:
        """Store a refined segmentation and its properties; the segmentation first, so a kill in between leaves
        at worst stale ``class_locations``, which the resumed E-step rewrites."""
        write_seg_b2nd(self.seg_path(case), seg, patch_size)
        self.write_properties(case, properties)

    def read_original_seg(self, case: str) -> np.ndarray:
        return read_seg_b2nd(self.original_seg_path(case))

    def read_current_seg(self, case: str) -> np.ndarray:
        return read_seg_b2nd(self.seg_path(case))

def write_round_labels(labels_folder: str, cases: Iterable[str], *, file_ending: str,
                       original_label_path: Callable[[str], str],
                       refined_label: Callable[[str], tuple[np.ndarray, dict] | None], reader_writer) -> None:
    """Fill ``labels_folder`` with a complete set of labels: refined where ``refined_label(case)`` gives
    ``(array, properties)``, else a byte copy of the original. Cases already written are overwritten, so a
    resumed round produces the same folder."""
    os.makedirs(labels_folder, exist_ok=True)
    for case in cases:
        destination = os.path.join(labels_folder, case + file_ending)
        refined = refined_label(case)
        if refined is None:
            copy_file(original_label_path(case), destination)
        else:
            write_label_image(destination, refined[0], refined[1], reader_writer)


# ----------------------------------------------------------------------- a dataset's label versions (cross-fold)
ORIGINAL, REFINED, PSEUDO = "original", "refined", "pseudo"


class DatasetLabelVersions:
    """Versioned labels of one nnU-Net dataset for the cross-fold loop.

        nnUNet_raw/<Dataset>/labelsTr/                       the active round's labels (what nnU-Net trains on)
        nnUNet_raw/<Dataset>/em_labels/round_00/             the originals: labelsTr/, dataset.json, manifest.json
        nnUNet_raw/<Dataset>/em_labels/round_NN/             each round: a complete labelsTr/ + dataset.json +
                                                             manifest.json (per case: provenance, scores, sha256)
        nnUNet_raw/<Dataset>/em_labels/active.json           which round labelsTr holds
        nnUNet_preprocessed/<Dataset>/em_labels/round_NN/<data_identifier>/   the same versions as nnU-Net's
                                                             preprocessed segmentations (+ .pkl with class_locations)

    Round 0 is copied and verified (SHA-256 against the source) before any label of the dataset is replaced.
    """

    def __init__(self, raw_folder: str, preprocessed_folder: str, data_identifier: str, file_ending: str):
        self.raw_folder = raw_folder
        self.preprocessed_folder = preprocessed_folder
        self.data_identifier = data_identifier
        self.file_ending = file_ending
        self.root = os.path.join(raw_folder, "em_labels")

    # paths
    def round_folder(self, round_index: int) -> str:
        return os.path.join(self.root, f"round_{round_index:02d}")

    def labels_folder(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "labelsTr")

    def label_path(self, round_index: int, case: str) -> str:
        return os.path.join(self.labels_folder(round_index), case + self.file_ending)

    def segmentation_folder(self, round_index: int) -> str:
        return os.path.join(self.preprocessed_folder, "em_labels", f"round_{round_index:02d}", self.data_identifier)

    def live_data_folder(self) -> str:
        return os.path.join(self.preprocessed_folder, self.data_identifier)

    def manifest_path(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "manifest.json")

    def has_originals(self) -> bool:
        return os.path.isfile(self.manifest_path(0))

    def read_manifest(self, round_index: int) -> dict:
        with open(self.manifest_path(round_index)) as handle:
            return json.load(handle)

    def active_round(self) -> int:
        path = os.path.join(self.root, "active.json")
        if not os.path.isfile(path):
            return 0
        with open(path) as handle:
            return int(json.load(handle)["round"])

    # round 0
    def keep_originals(self, cases: Iterable[str]) -> dict:
        """Copy and verify the original raw labels, dataset.json and preprocessed segmentations (once)."""
        if self.has_originals():
            return self.read_manifest(0)
        cases = sorted(cases)
        entries = {}
        for case in cases:
            source = os.path.join(self.raw_folder, "labelsTr", case + self.file_ending)
            copy = self.label_path(0, case)
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            copy_file(source, copy)
            digest = sha256(copy)
            if digest != sha256(source):
                raise OSError(f"copy of {source} does not match the original; nothing was replaced")
            entries[case] = {"provenance": ORIGINAL, "sha256": digest}
            for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
                source = os.path.join(self.live_data_folder(), name)
                copy = os.path.join(self.segmentation_folder(0), name)
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                copy_file(source, copy)
                if sha256(copy) != sha256(source):
                    raise OSError(f"copy of {source} does not match the original; nothing was replaced")
        copy_file(os.path.join(self.raw_folder, "dataset.json"), os.path.join(self.round_folder(0), "dataset.json"))
        manifest = {"round": 0, "cases": entries}
        write_json(self.manifest_path(0), manifest)  # last: its presence means round 0 is complete
        return manifest

    def original_label_path(self, case: str) -> str:
        return self.label_path(0, case)

    def read_original_segmentation(self, case: str) -> np.ndarray:
        return read_seg_b2nd(os.path.join(self.segmentation_folder(0), f"{case}_seg.b2nd"))

    def original_properties_path(self, case: str) -> str:
        return os.path.join(self.segmentation_folder(0), f"{case}.pkl")

    def read_live_segmentation(self, case: str) -> np.ndarray:
        return read_seg_b2nd(os.path.join(self.live_data_folder(), f"{case}_seg.b2nd"))

    def changed_originals(self) -> list[str]:
        """Cases whose round-0 copy no longer has its recorded checksum (empty: the originals are intact)."""
        manifest = self.read_manifest(0)
        return [case for case, entry in manifest["cases"].items()
                if not os.path.isfile(self.label_path(0, case)) or sha256(self.label_path(0, case)) != entry["sha256"]]

    # a new round
    def write_case(self, round_index: int, case: str, *, raw_label: np.ndarray, raw_properties: dict,
                   reader_writer, segmentation: np.ndarray, properties: dict, patch_size) -> None:
        """Stage one case of a round: the raw-geometry label and the preprocessed segmentation (+ properties)."""
        write_label_image(self.label_path(round_index, case), raw_label, raw_properties, reader_writer)
        folder = self.segmentation_folder(round_index)
        os.makedirs(folder, exist_ok=True)
        write_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"), segmentation, patch_size)
        write_pickle(os.path.join(folder, f"{case}.pkl"), properties)

    def write_round_metadata(self, round_index: int, dataset_json: dict, cases: dict[str, dict]) -> None:
        """dataset.json and manifest of a round whose cases are all staged; ``cases``: {case: {provenance, ...}}."""
        entries = {case: {**entry, "sha256": sha256(self.label_path(round_index, case))}
                   for case, entry in sorted(cases.items())}
        write_json(os.path.join(self.round_folder(round_index), "dataset.json"),
                   {**dataset_json, "numTraining": len(entries)})
        write_json(self.manifest_path(round_index), {"round": round_index, "cases": entries})

    def activate(self, round_index: int, *, images_for_new_cases: dict[str, list[str]] | None = None,
                 preprocessed_images: dict[str, str] | None = None) -> None:
        """Make a staged round the dataset's labels: raw labelsTr, dataset.json and the preprocessed
        segmentations. Cases new to the dataset (pseudo-labelled) also get their images copied in. Idempotent."""
        if not self.has_originals():
            raise RuntimeError("the originals must be kept (round 0) before any round is activated")
        manifest = self.read_manifest(round_index)
        for case, entry in manifest["cases"].items():
            destination = os.path.join(self.raw_folder, "labelsTr", case + self.file_ending)
            if not (os.path.isfile(destination) and sha256(destination) == entry["sha256"]):
                copy_file(self.label_path(round_index, case), destination)
            for index, image in enumerate((images_for_new_cases or {}).get(case, [])):
                target = os.path.join(self.raw_folder, "imagesTr", f"{case}_{index:04d}{self.file_ending}")
                if not os.path.isfile(target):
                    copy_file(image, target)
            if preprocessed_images and case in preprocessed_images:
                target = os.path.join(self.live_data_folder(), f"{case}.b2nd")
                if not os.path.isfile(target):
                    copy_file(preprocessed_images[case], target)
            for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
                copy_file(os.path.join(self.segmentation_folder(round_index), name),
                          os.path.join(self.live_data_folder(), name))
        copy_file(os.path.join(self.round_folder(round_index), "dataset.json"),
                  os.path.join(self.raw_folder, "dataset.json"))
        write_json(os.path.join(self.root, "active.json"), {"round": round_index})
