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

TEMP_DIR_NAME = ".em_tmp"


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_write(path: str, write: Callable[[str], None], *, suffix: str = "") -> None:
    """Write ``path`` through ``write(temp_path)`` and an ``os.replace``: readers see the old or the new file.

    The temp file lives in a hidden sibling folder so that nnU-Net, which lists folders by file ending, never
    sees a half-written file. ``suffix`` keeps writers that pick a format by extension (.nii.gz, .b2nd) happy.
    """
    folder = os.path.dirname(os.path.abspath(path))
    temp_folder = os.path.join(folder, TEMP_DIR_NAME)
    os.makedirs(temp_folder, exist_ok=True)
    temp_path = os.path.join(temp_folder, f"{uuid.uuid4().hex}{suffix}")
    try:
        write(temp_path)
        os.replace(temp_path, path)
    finally:
        if os.path.lexists(temp_path):
            os.remove(temp_path)
        try:
            os.rmdir(temp_folder)
        except OSError:
            pass  # another write in progress, or leftovers to keep for inspection


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
        temp = os.path.join(self.folder, TEMP_DIR_NAME, uuid.uuid4().hex)
        os.makedirs(os.path.dirname(temp), exist_ok=True)
        os.symlink(target, temp)
        os.replace(temp, link)

    def ensure(self, cases: Iterable[str]) -> None:
        """Create the folder with links for every case that has no entry yet (existing refinements are kept)."""
        os.makedirs(self.folder, exist_ok=True)
        for case in cases:
            for name in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl"):
                if not os.path.lexists(os.path.join(self.folder, name)):
                    self._link(name)
        self._remove_empty_temp_folder()

    def reset(self, cases: Iterable[str]) -> None:
        """Point every case back at the original segmentation and properties (a fresh run starts here)."""
        os.makedirs(self.folder, exist_ok=True)
        for case in cases:
            for name in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl"):
                self._link(name)
        self._remove_empty_temp_folder()

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

    def _remove_empty_temp_folder(self) -> None:
        try:
            os.rmdir(os.path.join(self.folder, TEMP_DIR_NAME))
        except OSError:
            pass


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
