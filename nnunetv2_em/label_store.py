"""Label versions on disk. The only module that writes label files; every write is atomic (temp file + rename).

Layout for a training run (``EMTrainer``), next to nnU-Net's own folders, which are only ever read:

    nnUNet_preprocessed/<Dataset>/
        <data_identifier>/                       nnU-Net's preprocessed cases: the original labels, never written
        em_training_labels/<Trainer>__<Plans>__<configuration>/fold_<f>/
            <case>.b2nd          -> symlink to nnU-Net's image (images are never re-preprocessed)
            <case>_seg.b2nd      -> symlink to the original, or the refined segmentation of the last E-step
            <case>.pkl           -> symlink to the original, or a copy with recomputed class_locations
        em_training_labels/<Trainer>__<Plans>__<configuration>/exchange/fold_<f>/round_<r>/
            <case>_seg.b2nd, <case>.json   fold f's out-of-fold refinement of its validation case (FoldExchange)
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
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterable

import blosc2
import numpy as np

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.label_conventions import with_ignore_label
from nnunetv2_em.layout import run_folder
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


def write_label_image(path: str, seg: np.ndarray, properties: dict, reader_writer, *,
                      provenance: str | None = None) -> None:
    """Write a raw-geometry label map with nnU-Net's reader/writer (geometry from the case's ``properties``).

    ``provenance``: a label the E-step wrote (not an annotation) carries it inside the file (``stamp_label``), so
    that a plain copy of it into another dataset is still recognised as EM output.
    """
    seg = np.asarray(seg)

    def write(temp):
        reader_writer.write_seg(seg, temp, properties)
        if provenance:
            stamp_label(temp, provenance)

    atomic_write(path, write, suffix=_full_suffix(path))


# A label written by the E-step says so in its header (NIfTI ``descrip``, a metadata field of NRRD/MHA): the
# version marker in labelsTr is lost when files are copied one by one, this is not. SimpleITK keeps it when a file is
# read and saved again; an editor that drops header notes drops it too.
STAMP_PREFIX = "nnunetv2_em "
STAMPED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
STAMP_KEYS = ("ITK_FileNotes", "descrip")  # ITK writes the first into NIfTI's descrip and reads it back as both


def stamp_label(path: str, provenance: str) -> None:
    """Write ``nnunetv2_em <provenance>`` into the header of the label file ``path`` (formats SimpleITK writes with
    metadata; others stay as they are, see ``STAMPED_ENDINGS``)."""
    import SimpleITK as sitk

    if not path.endswith(STAMPED_ENDINGS):
        return
    image = sitk.ReadImage(path)
    for key in STAMP_KEYS:
        image.SetMetaData(key, (STAMP_PREFIX + provenance)[:79])  # NIfTI's descrip holds 80 bytes
    sitk.WriteImage(image, path, True)


def label_stamp(path: str) -> str | None:
    """The provenance ``stamp_label`` wrote into ``path``'s header, or None (an annotation; a header-only read)."""
    import SimpleITK as sitk

    if not path.endswith(STAMPED_ENDINGS):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # unreadable files are reported by the checks that read them
    for key in STAMP_KEYS:
        value = reader.GetMetaData(key) if reader.HasMetaDataKey(key) else ""
        if value.startswith(STAMP_PREFIX):
            return value[len(STAMP_PREFIX):]
    return None


def write_uncertainty(path: str, uncertainty: np.ndarray) -> None:
    """A proposal's uncertainty map (``estep.proposal_uncertainty``, values in [0, 1]) as uint8 x 255 (npz)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda temp: np.savez_compressed(
        temp, uncertainty=np.round(np.clip(uncertainty, 0, 1) * 255).astype(np.uint8)), suffix=".npz")


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
                    record = _read_json(path)
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


# ----------------------------------------------------------------------- a dataset's label versions (cross-fold)
ORIGINAL, REFINED, PSEUDO, REVIEWED = "original", "refined", "pseudo", "reviewed"
REVIEW_RUN = "em_review"  # the label versions that imports of reviewed labels activate: a "run" of their own
EM_LABELS = "em_labels"
SOFT_MAPS_FOLDER = "soft_targets"  # trainers/soft_targets.py reads the same folder
VERSION_MARKER = ".nnunetv2_em_version.json"  # in labelsTr (rounds >= 1)
PREPROCESSED_MARKER_SUFFIX = ".em_version.json"  # <data_identifier>.em_version.json beside nnU-Net's data folder
JOURNAL = "activation.json"  # in em_labels/: an activation that has started switching and not finished
STAGING_LABELS = ".em_staging_labelsTr"
PREVIOUS_LABELS = ".em_previous_labelsTr"
KILL_AT_ENV = "NNUNETV2_EM_KILL_AT"


def fault_point(name: str) -> None:
    """Fault-injection hook for tests: ``NNUNETV2_EM_KILL_AT=<name>`` kills this process here (SIGKILL)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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


def _read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EMInputError(f"{path}: not valid JSON ({error}); nnunetv2_em writes it atomically, so it was cut short "
                           f"or edited by hand. Fix: put it back from a backup{_json_fix(path)}.") from None


def _json_fix(path: str) -> str:
    if os.path.basename(path) == "active.json":
        return (", or delete it and run `nnunetv2_em restore -d <dataset> --round N` with the version labelsTr "
                "should hold (`nnunetv2_em status` lists them)")
    return ""


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
        return _read_json(self.manifest_path(round_index, run))

    def active(self) -> dict:
        """``{"run", "round", "data_identifier"}`` of the version labelsTr holds (round 0 when none was activated)."""
        if not os.path.isfile(self.active_path()):
            return {"run": None, "round": 0, "data_identifier": None}
        active = _read_json(self.active_path())
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
                entries[case] = {"provenance": ORIGINAL, "sha256": _verified_copy(source, copy)}
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
                    _verified_copy(os.path.join(self.live_data_folder(), name), copy)
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
                _verified_copy(image, target)
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

    def stage_reviewed_case(self, round_index: int, case: str, reviewed: ReviewedLabels) -> None:
        """Stage a reviewed case into a round: its reviewed label file byte for byte, and its preprocessed
        segmentation for this data identifier (``ReviewedLabels.write_segmentation`` made it)."""
        os.makedirs(self.labels_folder(round_index), exist_ok=True)
        copy_file(reviewed.label_path(case), self.label_path(round_index, case))
        if sha256(self.label_path(round_index, case)) != reviewed.records()[case]["sha256"]:
            raise OSError(f"{self.label_path(round_index, case)}: copy differs from {reviewed.label_path(case)}")
        os.makedirs(self.segmentation_folder(round_index), exist_ok=True)
        for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
            copy_file(os.path.join(reviewed.segmentation_folder(self.data_identifier), name),
                      os.path.join(self.segmentation_folder(round_index), name))

    # switching labelsTr to a version
    def activate(self, round_index: int, run: str | None = None) -> None:
        """Make a complete, staged version the dataset's labels: raw labelsTr + dataset.json, imagesTr of cases a
        run added, the preprocessed segmentations, splits_final.json and gt_segmentations (always the originals).

        1. stage: a full copy of the version's labels beside labelsTr, each file verified against the manifest
           (a kill here leaves only the staging folder, which the next command deletes);
        2. journal: ``em_labels/activation.json`` says what the switch does; from here on any command rolls it
           forward (``recover_activation``) before doing anything else;
        3. switch: labelsTr and the staged folder are exchanged in one atomic step (``renameat2``), so after a
           kill at any instant labelsTr is one complete version; then dataset.json, images, preprocessed files;
        4. ``active.json`` and the markers are written, the journal removed.
        """
        recover_activation(self.raw_folder, self.preprocessed_folder)
        run = None if round_index == 0 else (run or self.run)
        manifest = self.read_manifest(round_index, run)
        identifier = manifest.get("data_identifier") or self.data_identifier
        previous = self.active()
        if previous["round"] and not previous["run"]:
            raise EMInputError(f"{self.active_path()}: written by nnunetv2_em 0.1 (rounds without a run). Fix: copy "
                               f"{self.root}/round_00/labelsTr back into labelsTr by hand, then remove "
                               f"em_labels/active.json.")
        previous_path = self.manifest_path(previous["round"], previous["run"])
        previous_manifest = _read_json(previous_path) if os.path.isfile(previous_path) else {"cases": {}}
        token = uuid.uuid4().hex
        live, staging, _ = labels_switch_paths(self.raw_folder)
        check_switchable(self.raw_folder)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            for case, entry in manifest["cases"].items():
                destination = os.path.join(staging, case + self.file_ending)
                shutil.copyfile(self.label_path(round_index, case, run), destination)
                if sha256(destination) != entry["sha256"]:
                    raise EMInputError(f"{self.label_path(round_index, case, run)}: does not match its checksum in "
                                       f"{self.manifest_path(round_index, run)}; the kept version was changed after "
                                       f"it was written, and labelsTr was not changed. Fix: put the file back from a "
                                       f"backup, or restore another version (`nnunetv2_em status` lists them).")
            # whatever else labelsTr holds (notes, sidecars, folders) is the user's: it travels with every version
            for name in other_files(live, self.file_ending, versioned_cases=previous_manifest["cases"]):
                source = os.path.join(live, name)
                if name.endswith(self.file_ending) and name[:-len(self.file_ending)] in manifest["cases"]:
                    continue  # a label of the version replaces a hand-placed file of the same case
                if os.path.isdir(source) and not os.path.islink(source):
                    shutil.copytree(source, os.path.join(staging, name), symlinks=True)
                else:
                    shutil.copy2(source, os.path.join(staging, name), follow_symlinks=False)
            write_json(os.path.join(staging, VERSION_MARKER), {
                "run": run, "round": round_index, "token": token, "labels_sha256": manifest.get("labels_sha256"),
                "note": "labelsTr holds labels written by nnunetv2_em, not the original annotations (those are in "
                        "em_labels/round_00). `nnunetv2_em status` tells more."})
        except BaseException:  # a full disk while staging: labelsTr untouched, nothing left behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fault_point("staged")
        leaving = sorted(set(previous_manifest["cases"]) - set(manifest["cases"]))
        journal = {
            "token": token, "run": run, "round": round_index, "data_identifier": identifier,
            "file_ending": self.file_ending, "previous": previous,
            "remove_images": sorted({case for case in leaving if previous_manifest["cases"][case].get("images")}),
            "remove_live_cases": leaving,
            "reset_identifier": (previous["data_identifier"] if previous["round"] and previous["data_identifier"]
                                 not in (None, identifier) else None),
        }
        write_json(self.journal_path(), journal)
        fault_point("journal_written")
        _roll_forward(self.raw_folder, self.preprocessed_folder, journal)


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
        return _read_json(self.index_path)["cases"] if os.path.isfile(self.index_path) else {}

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
        return os.path.isfile(source) and _read_json(source).get("sha256") == self.records()[case]["sha256"]

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
            kept[case] = {**record, "version": version, "sha256": _verified_copy(source, target),
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
            target.stage_reviewed_case(round_index, case, reviewed)
            entries[case] = {"provenance": REVIEWED, "reviewed": reviewed.provenance(case)}
            continue
        target.copy_case(active["round"], round_index, case, from_run=active["run"])
        entries[case] = {key: value for key, value in entry.items() if key != "sha256"}
    dataset_json = _read_json(os.path.join(versions.round_folder(active["round"], active["run"]), "dataset.json"))
    target.write_round_metadata(round_index, dataset_json, entries,
                                extra={"base": {"run": active["run"], "round": active["round"]}})
    return round_index


def review_version_base(raw_folder: str, round_index: int) -> dict:
    """``{"run", "round"}`` of the version an ``em_review`` version was made from."""
    return _read_json(os.path.join(raw_folder, EM_LABELS, REVIEW_RUN, f"round_{round_index:02d}",
                                   "manifest.json")).get("base", {})


def read_labels_marker(labels_folder: str) -> dict | None:
    """The version marker of a labels folder (labelsTr or a staged one), or None (the originals carry none)."""
    path = os.path.join(labels_folder, VERSION_MARKER)
    return _read_json(path) if os.path.isfile(path) else None


def read_preprocessed_marker(data_folder: str) -> dict | None:
    """The version marker of a preprocessed data folder; kept beside it, since nnU-Net infers its dataset class
    from the file endings inside the folder."""
    path = preprocessed_marker_path(data_folder)
    return _read_json(path) if os.path.isfile(path) else None


def preprocessed_em_output(data_folder: str) -> dict | None:
    """The marker of a preprocessed data folder if it holds a run's segmentations (or a switch to them), else
    None: the folder holds nnU-Net's own preprocessing of the annotations."""
    marker = read_preprocessed_marker(data_folder)
    return marker if marker and (marker.get("round") or marker.get("switching")) else None


def preprocessed_marker_path(data_folder: str) -> str:
    return os.path.normpath(data_folder) + PREPROCESSED_MARKER_SUFFIX


def _verified_copy(source: str, destination: str) -> str:
    """Copy atomically and check the copy against the source; returns its SHA-256."""
    copy_file(source, destination)
    digest = sha256(destination)
    if digest != sha256(source):
        raise OSError(f"copy of {source} does not match the original; nothing was replaced")
    return digest


def recover_activation(raw_folder: str, preprocessed_folder: str) -> dict | None:
    """Finish a switch that a kill interrupted (rolled forward from its journal), and delete a staging folder
    that never reached the journal. Returns the journal that was completed, if any."""
    root = os.path.join(raw_folder, EM_LABELS)
    journal_path = os.path.join(root, JOURNAL)
    if not os.path.isfile(journal_path):
        _, staging, previous = labels_switch_paths(raw_folder)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
        return None
    journal = _read_json(journal_path)
    _roll_forward(raw_folder, preprocessed_folder, journal)
    return journal


def _switch_labels_folder(raw_folder: str, token: str) -> None:
    """labelsTr <- the staged folder, idempotent: the staged folder is recognised by the journal's token. A
    symlinked labelsTr keeps its link; the folder it points to is what is switched."""
    live, staging, old = labels_switch_paths(raw_folder)
    staged_marker = read_labels_marker(staging) if os.path.isdir(staging) else None
    if staged_marker and staged_marker.get("token") == token:  # not switched yet
        if not os.path.isdir(live):  # a two-rename switch was killed between its renames
            os.rename(staging, live)
        elif exchange_paths(staging, live):
            fault_point("exchanged")
            shutil.rmtree(staging)  # it now holds the previous labels
        else:
            shutil.rmtree(old, ignore_errors=True)
            os.rename(live, old)
            fault_point("between_renames")
            os.rename(staging, live)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _roll_forward(raw_folder: str, preprocessed_folder: str, journal: dict) -> None:
    run, round_index, identifier = journal["run"], journal["round"], journal["data_identifier"]
    versions = DatasetLabelVersions(raw_folder, preprocessed_folder, identifier, journal["file_ending"], run)
    manifest = versions.read_manifest(round_index, run)
    target_json = _read_json(os.path.join(versions.round_folder(round_index, run), "dataset.json"))
    live_json_path = os.path.join(raw_folder, "dataset.json")
    images_folder = os.path.join(raw_folder, "imagesTr")
    live = versions.live_data_folder()
    os.makedirs(live, exist_ok=True)
    write_json(preprocessed_marker_path(live), {"switching": True, "run": run, "round": round_index})

    # dataset.json valid for the labels before and after the switch: the ignore label if either has it
    current_json = _read_json(live_json_path)
    bridge = {**target_json, "labels": {**current_json["labels"], **target_json["labels"]},
              "numTraining": current_json.get("numTraining", target_json.get("numTraining"))}
    if bridge != current_json:
        write_json(live_json_path, bridge)
    fault_point("bridge_json")
    _switch_labels_folder(raw_folder, journal["token"])
    if round_index == 0:  # the originals, byte for byte: no marker
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(labels_switch_paths(raw_folder)[0], VERSION_MARKER))

    # images of cases a run added (--unlabeled): in for the target, out for cases leaving
    for case, entry in manifest["cases"].items():
        for index, relative in enumerate(entry.get("images", [])):
            target = os.path.join(images_folder, f"{case}_{index:04d}{versions.file_ending}")
            if not os.path.isfile(target):
                copy_file(os.path.join(versions.root, relative), target)
    for case in journal["remove_images"]:
        for name in os.listdir(images_folder):
            if name.startswith(case + "_") and name.endswith(versions.file_ending) and \
                    len(name) == len(case) + len("_0000") + len(versions.file_ending):
                os.remove(os.path.join(images_folder, name))
    copy_file(os.path.join(versions.round_folder(round_index, run), "dataset.json"), live_json_path)
    fault_point("raw_switched")

    # preprocessed: segmentations (+ class_locations) of the target, images of added cases, nothing of leavers
    for index, (case, entry) in enumerate(sorted(manifest["cases"].items())):
        for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
            copy_file(os.path.join(versions.segmentation_folder(round_index, run), name), os.path.join(live, name))
        staged_soft = soft_maps_path(versions.segmentation_folder(round_index, run), case)
        if os.path.isfile(staged_soft):  # the version's sampled maps travel with it; no stale maps stay behind
            copy_file(staged_soft, soft_maps_path(live, case))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(soft_maps_path(live, case))
        image = entry.get("preprocessed_image")
        if image and not os.path.isfile(os.path.join(live, f"{case}.b2nd")):
            copy_file(image, os.path.join(live, f"{case}.b2nd"))
        if index == 0:
            fault_point("preprocessed_partly")
    for case in journal["remove_live_cases"]:
        for path in (*(os.path.join(live, name) for name in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl")),
                     soft_maps_path(live, case)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if journal.get("reset_identifier"):  # the previous run used another configuration: back to its originals
        other = versions.live_data_folder(journal["reset_identifier"])
        originals = versions.segmentation_folder(0, data_identifier=journal["reset_identifier"])
        for case in versions.read_manifest(0)["cases"]:
            for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
                copy_file(os.path.join(originals, name), os.path.join(other, name))
        with contextlib.suppress(FileNotFoundError):
            os.remove(preprocessed_marker_path(other))
    _sync_splits(preprocessed_folder, manifest, journal["remove_live_cases"])
    _sync_preprocessed_dataset_json(preprocessed_folder)
    _restore_gt_segmentations(versions)

    write_json(versions.active_path(), {"run": run, "round": round_index, "data_identifier": identifier})
    write_json(preprocessed_marker_path(live), {"run": run, "round": round_index,
                                                "labels_sha256": manifest.get("labels_sha256")})
    fault_point("before_journal_removed")
    os.remove(versions.journal_path())


def soft_maps_path(data_folder: str, case: str) -> str:
    """A case's sampled label maps for ``SoftTargetTrainer`` in a preprocessed data folder (a subfolder: nnU-Net's
    case listing never sees them)."""
    return os.path.join(data_folder, SOFT_MAPS_FOLDER, f"{case}.b2nd")


def _sync_splits(preprocessed_folder: str, manifest: dict, leaving: list[str]) -> None:
    """Pseudo-labelled cases train in every fold (never validate: they have no annotation); leavers go."""
    path = os.path.join(preprocessed_folder, "splits_final.json")
    if not os.path.isfile(path):
        return
    splits = _read_json(path)
    pseudo = {case for case, entry in manifest["cases"].items() if entry.get("provenance") == PSEUDO}
    updated = [{**split, "train": sorted((set(split["train"]) - set(leaving)) | pseudo),
                "val": [case for case in split["val"] if case not in leaving]} for split in splits]
    if updated != splits:
        write_json(path, updated)


def _sync_preprocessed_dataset_json(preprocessed_folder: str) -> None:
    """Training reads the preprocessed dataset.json: it needs the ignore label and no list of excluded images."""
    path = os.path.join(preprocessed_folder, "dataset.json")
    if not os.path.isfile(path):
        return
    dataset_json = _read_json(path)
    updated = dict(with_ignore_label(dataset_json))
    updated.pop("dataset", None)
    if updated != dataset_json:
        write_json(path, updated)


def _restore_gt_segmentations(versions: DatasetLabelVersions) -> list[str]:
    """nnU-Net validates against gt_segmentations: it holds the original annotations, whatever labelsTr holds.
    Returns the cases put back."""
    changed = gt_segmentations_changed(versions)
    folder = os.path.join(versions.preprocessed_folder, "gt_segmentations")
    for case in changed:
        copy_file(versions.label_path(0, case), os.path.join(folder, case + versions.file_ending))
    return changed


# ------------------------------------------------------------------------------------ lock, restore, status
LOCK_SUFFIX = ".em_lock"  # beside the raw dataset folder: <nnUNet_raw>/<Dataset>.em_lock
LOCK_ENV = "NNUNETV2_EM_LOCK"  # set while the lock is held: every process started under it inherits it


def lock_path(raw_folder: str) -> str:
    """The dataset's lock file, keyed by the raw dataset's real folder (links followed), so two runs over the same
    raw dataset share it whatever their preprocessed folders. Beside the folder, not in it: nnU-Net lists only
    folders there, and the dataset's own tree stays untouched."""
    return os.path.realpath(raw_folder).rstrip(os.sep) + LOCK_SUFFIX


@contextlib.contextmanager
def dataset_lock(raw_folder: str, preprocessed_folder: str):
    """Hold the dataset's lock (runs, restores and review imports take it): an OS lock (``flock``) on a file that
    is never deleted, released by the kernel when the process ends, however it ends. One clear error when another
    process holds it. Taking it ends what a killed holder left running and removes its temp folders."""
    path = lock_path(raw_folder)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise EMInputError(f"{os.path.basename(os.path.normpath(raw_folder))}: an nnunetv2_em command is already "
                           f"working on this dataset ({holder}; lock {path}). Fix: wait for it to finish or stop it, "
                           f"then run again.") from None
    reap_leftover_processes(path)
    remove_stale_temp_folders(raw_folder, preprocessed_folder)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    previous_env = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = path
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous_env
        handle.seek(0)
        handle.truncate()  # under the lock: the file itself stays, so no one can ever lock a different inode
        handle.close()


def reap_leftover_processes(path: str) -> list[int]:
    """SIGKILL every process that a previous holder of the lock ``path`` started and that outlived it (a kill -9
    of a run leaves nnU-Net's augmentation workers behind): they carry ``NNUNETV2_EM_LOCK=<path>`` in their
    environment. Called with the lock held, so no live holder owns them. Returns the pids ended."""
    marker = f"{LOCK_ENV}={path}".encode()
    own = {os.getpid(), *_ancestors()}
    ended = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environment = handle.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marker in environment:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)
                ended.append(int(entry))
    return ended


def _ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def lock_holder(raw_folder: str) -> str | None:
    """Who holds the dataset's lock now, or None."""
    path = lock_path(raw_folder)
    if not os.path.isfile(path):
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def remove_stale_temp_folders(raw_folder: str, preprocessed_folder: str) -> list[str]:
    """Temp folders (``.em_tmp_*``) that a killed writer left where only lock holders write: the raw dataset, its
    labels, images and versions, the preprocessed versions and data folders. Call with the lock held."""
    found = []
    for top in (os.path.join(raw_folder, EM_LABELS), os.path.join(preprocessed_folder, EM_LABELS)):
        for folder, subfolders, _ in os.walk(top):
            found.extend(os.path.join(folder, name) for name in subfolders if name.startswith(TEMP_DIR_PREFIX))
            subfolders[:] = [name for name in subfolders if not name.startswith(TEMP_DIR_PREFIX)]
    data_folders = [os.path.join(preprocessed_folder, name) for name in os.listdir(preprocessed_folder)] \
        if os.path.isdir(preprocessed_folder) else []
    for folder in (raw_folder, os.path.join(raw_folder, "labelsTr"), os.path.join(raw_folder, "imagesTr"),
                   preprocessed_folder, *data_folders):
        if os.path.isdir(folder) and not os.path.islink(folder):
            found.extend(os.path.join(folder, name) for name in os.listdir(folder) if name.startswith(TEMP_DIR_PREFIX))
    removed = [path for path in found if os.path.isdir(path) and not os.path.islink(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def dataset_versions(raw_folder: str, preprocessed_folder: str) -> DatasetLabelVersions:
    """The version store of a dataset, set to the run and data identifier labelsTr currently belongs to."""
    file_ending = _read_json(os.path.join(raw_folder, "dataset.json"))["file_ending"]
    versions = DatasetLabelVersions(raw_folder, preprocessed_folder, "", file_ending)
    active = versions.active()
    versions.run, versions.data_identifier = active["run"], active["data_identifier"] or ""
    return versions


def restore(raw_folder: str, preprocessed_folder: str, *, round_index: int | None = None,
            run: str | None = None) -> dict:
    """Complete an interrupted switch, then (with ``round_index``) make that version labelsTr, atomically like a
    round's activation; gt_segmentations get the originals back (the stock planner copies labelsTr there). Then
    verify what it will claim: labelsTr against the active version's manifest, by checksum.

    Returns ``{"completed": journal or None, "active", "activated": bool, "labelsTr": labels_folder_state,
    "gt_repaired": [cases]}``. Raises ``EMInputError`` where labelsTr is not what the store says it is.
    """
    if round_index is not None and round_index < 0:
        raise ValueError(f"--round {round_index}: rounds are numbered from 0 (the original annotations)")
    completed = recover_activation(raw_folder, preprocessed_folder)
    versions = dataset_versions(raw_folder, preprocessed_folder)
    activated = False
    if round_index is not None:
        active = versions.active()
        if round_index > 0:
            runs = versions.runs()
            run = run or active["run"] or (next(iter(runs)) if len(runs) == 1 else None)
            if run is None:
                raise ValueError(f"several runs keep versions in {versions.root} ({sorted(runs)}): name one with --run")
            if round_index not in runs.get(run, []):
                raise ValueError(f"{versions.root}: run {run} has no complete round {round_index} (it has "
                                 f"{runs.get(run, [])})")
            versions.run = run
            versions.data_identifier = versions.read_manifest(round_index, run)["data_identifier"]
        elif not versions.has_originals():
            raise ValueError(f"{versions.root}/round_00: no originals kept; labelsTr was never replaced by nnunetv2_em")
        else:
            changed = versions.changed_originals()
            if changed:
                raise EMInputError(f"{versions.label_path(0, changed[0])}: the kept original annotation no longer "
                                   f"matches its checksum in {versions.manifest_path(0)} ({len(changed)} such "
                                   f"file(s)); labelsTr was not changed. Fix: put the original back from a backup, "
                                   f"then run the same command again.")
        if (active["run"], active["round"]) != (run if round_index else None, round_index) or \
                labels_folder_state(versions)["matches_active"] is False:
            versions.activate(round_index, run)
            activated = True
    state = labels_folder_state(versions)
    name = os.path.basename(os.path.normpath(raw_folder))
    if not versions.has_originals():
        stamped = state["marker"] or next((stamp for stamp in (label_stamp(path) for path in _label_files(versions))
                                           if stamp), None)
        if stamped:
            raise EMInputError(f"{versions.live_labels_folder()}: holds labels written by nnunetv2_em "
                               f"({stamped}), and the original annotations ({versions.root}/round_00) are missing; "
                               f"nothing was restored. Fix: put em_labels/ back from a backup, then `nnunetv2_em "
                               f"restore -d {name} --round 0`.")
    elif state["matches_active"] is False:
        active = versions.active()
        raise EMInputError(f"{versions.live_labels_folder()}: CHANGED: {len(state['differing'])} file(s) differ from "
                           f"{version_name(active['run'], active['round'])} (checksums in "
                           f"{versions.manifest_path(active['round'], active['run'])}), e.g. "
                           f"{state['differing'][:3]}. Fix: keep your edits (`nnunetv2_em status -d {name}` lists "
                           f"them), or `nnunetv2_em restore -d {name} --round {active['round']}` puts that version "
                           f"back.")
    gt_repaired = _restore_gt_segmentations(versions) if versions.has_originals() else []
    return {"completed": completed, "active": versions.active(), "activated": activated, "labelsTr": state,
            "gt_repaired": gt_repaired}


def _label_files(versions: DatasetLabelVersions) -> list[str]:
    folder = versions.live_labels_folder()
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(versions.file_ending)] \
        if os.path.isdir(folder) else []


def gt_segmentations_changed(versions: DatasetLabelVersions) -> list[str]:
    """Cases whose file in nnU-Net's ``gt_segmentations`` is not the original annotation (nnU-Net's own planner,
    run while labelsTr held a refined version, copies those labels there)."""
    folder = os.path.join(versions.preprocessed_folder, "gt_segmentations")
    if not os.path.isdir(folder) or not versions.has_originals():
        return []
    return [case for case, entry in versions.read_manifest(0)["cases"].items()
            if os.path.isfile(os.path.join(folder, case + versions.file_ending)) and
            sha256(os.path.join(folder, case + versions.file_ending)) != entry["sha256"]]


def labels_folder_state(versions: DatasetLabelVersions) -> dict:
    """What labelsTr holds, by checksum: whether it equals the active version, and which kept version it equals."""
    labels = versions.live_labels_folder()
    present = {name[:-len(versions.file_ending)]: sha256(os.path.join(labels, name))
               for name in sorted(os.listdir(labels)) if name.endswith(versions.file_ending)} \
        if os.path.isdir(labels) else {}
    digest = labels_digest(present)
    active = versions.active()
    matches_active, differing, equal_to = None, [], None
    if versions.has_originals():
        candidates = [(None, 0), *[(run, r) for run, rounds in versions.runs().items() for r in rounds]]
        for run, round_index in candidates:
            manifest = versions.read_manifest(round_index, run)
            expected = {case: entry["sha256"] for case, entry in manifest["cases"].items()}
            if labels_digest(expected) == digest:
                equal_to = {"run": run, "round": round_index}
            if (run, round_index) == (active["run"], active["round"]):
                differing = sorted(case for case in set(expected) | set(present)
                                   if expected.get(case) != present.get(case))
                matches_active = not differing
    return {"files": len(present), "marker": read_labels_marker(labels), "matches_active": matches_active,
            "differing": differing, "equal_to": equal_to}


def dataset_status(raw_folder: str, preprocessed_folder: str, results_folder: str | None = None) -> dict:
    """Everything ``nnunetv2_em status`` reports; reads only."""
    versions = dataset_versions(raw_folder, preprocessed_folder)
    journal_path = versions.journal_path()
    status = {
        "dataset": os.path.basename(os.path.normpath(raw_folder)),
        "versions_kept": versions.has_originals(),
        "active": versions.active(),
        "labelsTr": labels_folder_state(versions),
        "unfinished_switch": _read_json(journal_path) if os.path.isfile(journal_path) else None,
        "staging_left": os.path.isdir(labels_switch_paths(raw_folder)[1]),
        "lock_holder": lock_holder(raw_folder),
        "originals_changed": versions.changed_originals() if versions.has_originals() else [],
        "gt_segmentations_changed": gt_segmentations_changed(versions),
        "other_files": non_label_files(versions.live_labels_folder(), versions.file_ending),
        "runs": {},
        "preprocessed": {},
    }
    for run, rounds in versions.runs().items():
        state_file = os.path.join(run_folder(results_folder or "", status["dataset"], run), "state.json")
        state = _read_json(state_file) if results_folder and os.path.isfile(state_file) else None
        status["runs"][run] = {"rounds_kept": rounds, "rounds_done": sorted(int(r) for r in state["rounds"])
                               if state else None, "converged": state["converged"] if state else None}
    if os.path.isdir(preprocessed_folder):
        for name in sorted(os.listdir(preprocessed_folder)):
            if name.endswith(PREPROCESSED_MARKER_SUFFIX):
                status["preprocessed"][name[:-len(PREPROCESSED_MARKER_SUFFIX)]] = _read_json(
                    os.path.join(preprocessed_folder, name))
    return status
