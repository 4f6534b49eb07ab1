"""``EMTrainer``'s labels on disk: a fold-private view of nnU-Net's preprocessed folder whose segmentations the
E-step replaces, the exchange of out-of-fold refinements between folds, and a round's complete ``labelsTr``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable

import numpy as np

from nnunetv2_em.storage.files import (
    copy_file,
    read_json,
    read_seg_b2nd,
    sha256,
    temporary_folder,
    write_json,
    write_label_image,
    write_pickle,
    write_seg_b2nd,
)


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
        with temporary_folder(self.folder) as temp_folder:
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


class FoldExchange:
    """Out-of-fold refinements that the folds of one ``EMTrainer`` configuration hand each other.

    A network never judges a case it trained on: fold f's E-step refines only fold f's validation cases and
    publishes them here (``fold_<f>/round_<r>/<case>_seg.b2nd`` plus ``<case>.json``, written last, so a record
    exists only for a complete segmentation). Every fold trains on the latest refinement another fold published for
    each of its training cases. A record carries the checksum of the original segmentation it refined; a refinement
    of different originals is never handed on.
    """

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)

    def _round_folder(self, fold, round_index: int) -> str:
        return os.path.join(self.folder, f"fold_{fold}", f"round_{round_index:02d}")

    def publish(self, fold, round_index: int, case: str, seg: np.ndarray, *, original_seg_path: str,
                patch_size, record: dict | None = None) -> None:
        """Store fold ``fold``'s round ``round_index`` refinement ``seg`` ``(1, *spatial)`` of ``case``."""
        folder = self._round_folder(fold, round_index)
        write_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"), seg, patch_size)
        write_json(os.path.join(folder, f"{case}.json"),
                   {"case": case, "fold": fold, "round": round_index, "original_sha256": sha256(original_seg_path),
                    **(record or {})})

    def records(self, case: str) -> list[dict]:
        """Every complete record of ``case``, any fold, oldest round first (ties: by fold)."""
        found = []
        if not os.path.isdir(self.folder):
            return found
        for fold_name in sorted(os.listdir(self.folder)):
            fold_folder = os.path.join(self.folder, fold_name)
            if not fold_name.startswith("fold_") or not os.path.isdir(fold_folder):
                continue
            for round_name in sorted(os.listdir(fold_folder)):
                path = os.path.join(fold_folder, round_name, f"{case}.json")
                if os.path.isfile(path):
                    record = read_json(path)
                    record["seg_path"] = os.path.join(fold_folder, round_name, f"{case}_seg.b2nd")
                    found.append(record)
        return sorted(found, key=lambda r: (int(r["round"]), str(r["fold"])))

    def latest(self, case: str, *, original_seg_path: str, exclude_fold=None, up_to_round: int | None = None
               ) -> dict | None:
        """The newest record of ``case`` from a fold other than ``exclude_fold`` that refined the current
        original (``original_seg_path``'s checksum); None when there is none."""
        checksum = None
        for record in reversed(self.records(case)):
            if str(record["fold"]) == str(exclude_fold):
                continue
            if up_to_round is not None and int(record["round"]) > up_to_round:
                continue
            checksum = checksum or sha256(original_seg_path)
            if record.get("original_sha256") == checksum:
                return record
        return None

    def clear_fold(self, fold) -> None:
        """Forget everything fold ``fold`` published (its fresh start): renamed away first, so a kill leaves all
        of it or none of it."""
        folder = os.path.join(self.folder, f"fold_{fold}")
        if os.path.isdir(folder):
            doomed = os.path.join(self.folder, f".removing_fold_{fold}_{os.getpid()}")
            os.replace(folder, doomed)
            shutil.rmtree(doomed)


def write_round_labels(labels_folder: str, cases: Iterable[str], *, file_ending: str,
                       original_label_path: Callable[[str], str],
                       refined_label: Callable[[str], tuple[np.ndarray, dict] | None], reader_writer,
                       provenance: str) -> None:
    """Fill ``labels_folder`` with a complete set of labels: refined where ``refined_label(case)`` gives
    ``(array, properties)`` (stamped with ``provenance``), else a byte copy of the original. Cases already written
    are overwritten, so a resumed round produces the same folder."""
    os.makedirs(labels_folder, exist_ok=True)
    for case in cases:
        destination = os.path.join(labels_folder, case + file_ending)
        refined = refined_label(case)
        if refined is None:
            copy_file(original_label_path(case), destination)
        else:
            write_label_image(destination, refined[0], refined[1], reader_writer, provenance=provenance)
