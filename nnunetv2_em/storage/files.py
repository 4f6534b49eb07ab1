"""Writing and reading label files: every write atomic (temp file + rename), provenance stamps in label headers,
the preprocessed segmentation format, checksums, and the fault points the kill tests stop at.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import uuid
from collections.abc import Callable

import blosc2
import numpy as np

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.nnunet_data import SEG_DTYPE, blosc2_seg_layout

TEMP_DIR_PREFIX = ".em_tmp_"


@contextlib.contextmanager
def temporary_folder(folder: str):
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
    with temporary_folder(os.path.dirname(os.path.abspath(path))) as temp_folder:
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


KILL_AT_ENV = "NNUNETV2_EM_KILL_AT"


def fault_point(name: str) -> None:
    """Fault-injection hook for tests: ``NNUNETV2_EM_KILL_AT=<name>`` kills this process here (SIGKILL)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EMInputError(f"{path}: not valid JSON ({error}); nnunetv2_em writes it atomically, so it was cut short "
                           f"or edited by hand. Fix: put it back from a backup{json_fix(path)}.") from None


def json_fix(path: str) -> str:
    if os.path.basename(path) == "active.json":
        return (", or delete it and run `nnunetv2_em restore -d <dataset> --round N` with the version labelsTr "
                "should hold (`nnunetv2_em status` lists them)")
    return ""


def verified_copy(source: str, destination: str) -> str:
    """Copy atomically and check the copy against the source; returns its SHA-256."""
    copy_file(source, destination)
    digest = sha256(destination)
    if digest != sha256(source):
        raise OSError(f"copy of {source} does not match the original; nothing was replaced")
    return digest


def place_case_images(images: list[str], folder: str, case: str, file_ending: str, *, link: bool) -> None:
    """A case's image files into ``folder/imagesTr`` under nnU-Net's names (``<case>_<channel:04d><ending>``):
    symlinked when ``link``, else copied atomically."""
    for channel, image in enumerate(images):
        destination = os.path.join(folder, "imagesTr", f"{case}_{channel:04d}{file_ending}")
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if link:
            os.symlink(os.path.abspath(image), destination)
        else:
            copy_file(image, destination)
