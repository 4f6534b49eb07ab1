"""What labs do with several raters before training, as baselines for the per-rater EM: majority vote, STAPLE
(SimpleITK's multi-label STAPLE, Warfield et al. 2004; Rohlfing et al. 2004) or the first rater, and
``nnunetv2_em fuse``, which writes a new raw dataset whose ``labelsTr`` holds the fused labels (vanilla nnU-Net then
trains on it as on any dataset)."""

from __future__ import annotations

import os
import shutil

import numpy as np

from nnunetv2_em import checks, storage
from nnunetv2_em.errors import EMInputError

METHODS = ("majority", "staple", "first")


def majority_vote(ratings, *, num_classes: int) -> np.ndarray:
    """The class most raters gave each voxel, ``(*spatial)`` int16; ties go to the lowest class, voxels nobody
    rated are ``-1``.

    Args:
        ratings: ``(R, *spatial)``, ``0..C-1`` rated, anything else not rated.
    """
    ratings = np.asarray(ratings)
    if ratings.ndim < 2:
        raise ValueError(f"expected ratings (R, *spatial), got {ratings.shape}")
    votes = np.stack([(ratings == c).sum(axis=0) for c in range(num_classes)])
    fused = votes.argmax(axis=0).astype(np.int16)
    fused[votes.sum(axis=0) == 0] = -1
    return fused


def staple(ratings, *, num_classes: int) -> np.ndarray:
    """SimpleITK's multi-label STAPLE over the raters who rated the case, ``(*spatial)`` int16; voxels STAPLE leaves
    undecided get the majority vote. STAPLE needs complete maps: a rater who rated only part of the case is refused.

    Args:
        ratings: ``(R, *spatial)``, a rater's map all ``-1`` when they did not rate the case.
    """
    import SimpleITK as sitk

    ratings = np.asarray(ratings)
    rated = [r for r in range(ratings.shape[0]) if np.any(ratings[r] >= 0)]
    if not rated:
        raise ValueError("no rater rated this case")
    partial = [r for r in rated if np.any((ratings[r] < 0) | (ratings[r] >= num_classes))]
    if partial:
        raise ValueError(f"rater(s) {partial} left part of the case unrated; STAPLE needs complete maps")
    if len(rated) == 1:
        return ratings[rated[0]].astype(np.int16)
    undecided = 255
    fused = sitk.MultiLabelSTAPLEImageFilter()
    fused.SetLabelForUndecidedPixels(undecided)
    result = sitk.GetArrayFromImage(fused.Execute([sitk.GetImageFromArray(ratings[r].astype(np.uint8))
                                                   for r in rated])).astype(np.int16)
    fallback = majority_vote(ratings[rated], num_classes=num_classes)
    return np.where(result == undecided, fallback, result)


def fuse(ratings, *, method: str, num_classes: int) -> np.ndarray:
    """``method`` (``majority``, ``staple`` or ``first``: the first rater who rated the case) over ``ratings``."""
    if method == "majority":
        return majority_vote(ratings, num_classes=num_classes)
    if method == "staple":
        return staple(ratings, num_classes=num_classes)
    if method == "first":
        ratings = np.asarray(ratings)
        rated = [r for r in range(ratings.shape[0]) if np.any(ratings[r] >= 0)]
        if not rated:
            raise ValueError("no rater rated this case")
        return ratings[rated[0]].astype(np.int16)
    raise ValueError(f"unknown fusion method {method!r}; one of {METHODS}")


def fuse_dataset(source: str, output: str, *, method: str, link: bool = False) -> dict:
    """A new raw dataset ``$nnUNet_raw/output`` with ``source``'s images and, per case its raters annotated, the
    fused label (voxels no rater annotated get the ignore label; cases without raters keep their ``labelsTr``
    label). Written beside the target and renamed into place; returns ``{case: number of raters}``."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnunetv2_em import label_conventions, multi_rater
    from nnunetv2_em.planning import dataset_name

    if method not in METHODS:
        raise EMInputError(f"--method {method}: unknown. Fix: one of {', '.join(METHODS)}.")
    raw_root = checks.require_env("nnUNet_raw")["nnUNet_raw"]
    name = dataset_name(source)
    raw = os.path.join(raw_root, name)
    if not output.startswith("Dataset") or "_" not in output or not output[7:10].isdigit():
        raise EMInputError(f"-o {output}: expected DatasetXXX_Name. Fix: e.g. -o Dataset951_Staple.")
    taken = [n for n in os.listdir(raw_root) if n.startswith(output[:10])]
    if taken:
        raise EMInputError(f"{os.path.join(raw_root, output)}: dataset id {output[7:10]} is taken ({taken[0]}). Fix: "
                           f"pick another id.")
    cases = checks.check_raw_dataset(raw)
    dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
    rater_set = multi_rater.load_raters(raw, dataset_json, cases)
    if rater_set is None:
        raise EMInputError(f"{multi_rater.raters_path(raw)}: missing; nothing to fuse. Fix: add the raters' labels "
                           f"(see docs/multi_rater.md).")
    fused_json = label_conventions.with_ignore_label(dataset_json)
    ignore_label = int(fused_json["labels"]["ignore"])
    num_classes = len(checks.label_values(dataset_json, os.path.join(raw, "dataset.json")))
    ending = dataset_json["file_ending"]
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, cases[next(iter(cases))]["images"][0])()
    staging = os.path.join(raw_root, f".{output}.partial_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    counts, unrated = {}, False
    try:
        for case, entry in sorted(cases.items()):
            storage.place_case_images(entry["images"], staging, case, ending, link=link)
            label = os.path.join(staging, "labelsTr", case + ending)
            os.makedirs(os.path.dirname(label), exist_ok=True)
            counts[case] = len(rater_set.raters_of(case))
            if not counts[case]:
                storage.copy_file(entry["label"], label)
                continue
            ratings = multi_rater.read_ratings(rater_set, case, reader_writer, ignore_label=ignore_label)
            try:
                fused = fuse(ratings, method=method, num_classes=num_classes)
            except ValueError as error:
                raise EMInputError(f"{case}: {error}. Fix: fuse with --method majority, or complete the raters' "
                                   f"maps.") from None
            unrated |= bool(np.any(fused < 0))
            _, properties = reader_writer.read_seg(entry["label"])
            storage.write_label_image(label, np.where(fused < 0, ignore_label, fused).astype(np.uint8), properties,
                                      reader_writer)
        # the ignore label only where a voxel no rater annotated needs it (or the source declared one)
        fused_json = {key: value for key, value in (fused_json if unrated else dataset_json).items()
                      if key != "dataset"}
        fused_json.update(name=output.split("_", 1)[1],
                          description=f"{method} of the raters of {name} (nnunetv2_em fuse)")
        storage.write_json(os.path.join(staging, "dataset.json"), fused_json)
        os.rename(staging, os.path.join(raw_root, output))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts

