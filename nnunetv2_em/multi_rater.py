"""Several annotators per case: the dataset layout, its checks, and the ratings of a case as one array.

A multi-rater dataset is an ordinary nnU-Net raw dataset (``labelsTr`` holds one label per case: any one rater's or a
fused one, so the stock commands work) plus::

    em_raters.json                 {"version": 1, "raters": {"<rater>": ["<case>", ...], ...}}
    em_raters/<rater>/<case><file ending>

Each rater lists the cases they annotated (partial coverage allowed: a case may have one rater or several). A rater's
file holds the dataset's label values; the ignore label means "this rater did not annotate here". Every problem is
one ``EMInputError`` naming the file and the fix; nothing is written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from nnunetv2_em import checks
from nnunetv2_em.errors import EMInputError

RATERS_FILE = "em_raters.json"
RATERS_FOLDER = "em_raters"
FORMAT_VERSION = 1
_RATER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def raters_path(raw_folder: str) -> str:
    return os.path.join(raw_folder, RATERS_FILE)


def rater_label_path(raw_folder: str, rater: str, case: str, file_ending: str) -> str:
    return os.path.join(raw_folder, RATERS_FOLDER, rater, case + file_ending)


@dataclass(frozen=True)
class RaterSet:
    """The raters of a dataset: ``raters`` (their order is the ratings' first axis) and ``files``
    ``{rater: {case: label file}}``."""

    raters: tuple[str, ...]
    files: dict

    def cases(self) -> list[str]:
        return sorted({case for files in self.files.values() for case in files})

    def raters_of(self, case: str) -> list[str]:
        return [rater for rater in self.raters if case in self.files[rater]]

    def coverage(self) -> dict[str, int]:
        """How many raters annotated each case."""
        return {case: len(self.raters_of(case)) for case in self.cases()}


def parse_raters(content, *, source: str, cases: set[str]) -> dict[str, list[str]]:
    """``{rater: [case, ...]}`` from the parsed ``em_raters.json`` ``content``; ``cases``: the dataset's cases."""
    if not isinstance(content, dict) or content.get("version") != FORMAT_VERSION or \
            not isinstance(content.get("raters"), dict) or not content["raters"]:
        raise EMInputError(f"{source}: expected {{\"version\": {FORMAT_VERSION}, \"raters\": {{\"<rater>\": "
                           f"[\"<case>\", ...]}}}} with at least one rater. Fix: write it in that form.")
    listed = {}
    for rater, rated in content["raters"].items():
        if not _RATER_NAME.match(str(rater)):
            raise EMInputError(f"{source}: rater name {rater!r} is not a plain folder name. Fix: use letters, "
                               f"digits, '.', '_' or '-' (it names em_raters/<rater>/).")
        if not isinstance(rated, list) or not rated or not all(isinstance(c, str) for c in rated):
            raise EMInputError(f"{source}: rater {rater}: expected a non-empty list of case ids. Fix: list the cases "
                               f"{rater} annotated.")
        if len(set(rated)) != len(rated):
            raise EMInputError(f"{source}: rater {rater} lists a case twice. Fix: list each case once.")
        unknown = sorted(set(rated) - cases)
        if unknown:
            raise EMInputError(f"{source}: rater {rater}: case {unknown[0]} is not in the dataset's imagesTr. Fix: "
                               f"correct the id or add the case.")
        listed[str(rater)] = sorted(rated)
    return listed


def load_raters(raw_folder: str, dataset_json: dict, cases: dict) -> RaterSet | None:
    """The dataset's raters, every file checked (decodes, known label values, the image's geometry), or None when
    the dataset has no ``em_raters.json``.

    Args:
        cases: ``{case: {"images": [...], ...}}`` of the dataset (as nnU-Net maps it).
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    path = raters_path(raw_folder)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise EMInputError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}). Fix: repair it.") from None
    listed = parse_raters(content, source=path, cases=set(cases))
    ending = dataset_json["file_ending"]
    folder = os.path.join(raw_folder, RATERS_FOLDER)
    for rater in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        unlisted = sorted(name for name in os.listdir(os.path.join(folder, rater))
                          if name.endswith(ending) and name[:-len(ending)] not in listed.get(rater, []))
        if unlisted:
            raise EMInputError(f"{os.path.join(folder, rater, unlisted[0])}: not listed for rater {rater} in {path}. "
                               f"Fix: list the case under \"{rater}\" or move the file away.")
    allowed = set(checks.label_values(dataset_json, os.path.join(raw_folder, "dataset.json")))
    if "ignore" in dataset_json["labels"]:
        allowed.add(int(dataset_json["labels"]["ignore"]))
    first_images = cases[next(iter(sorted(cases)))]["images"]
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, first_images[0])()
    files = {}
    for rater, rated in listed.items():
        files[rater] = {}
        for case in rated:
            label = rater_label_path(raw_folder, rater, case, ending)
            if not os.path.isfile(label):
                raise EMInputError(f"{label}: missing ({path} lists {case} for {rater}). Fix: add the file or remove "
                                   f"the case from the list.")
            _check_rater_label(label, cases[case]["images"][0], reader_writer, allowed)
            files[rater][case] = label
    return RaterSet(tuple(listed), files)


def _check_rater_label(label: str, image_path: str, reader_writer, allowed: set[int]) -> None:
    checks.check_file_decodes(label)
    try:
        seg, seg_properties = reader_writer.read_seg(label)
        image, image_properties = reader_writer.read_images([image_path])
    except Exception as error:  # noqa: BLE001 (any reader failure is bad input here)
        raise EMInputError(f"{label}: cannot be read ({error}). Fix: export it again.") from None
    values = np.unique(seg)
    if np.any(values != np.round(values)):
        raise EMInputError(f"{label}: non-integer label values. Fix: write the label as integers, resampled with "
                           f"nearest neighbour.")
    unexpected = sorted(set(values.astype(int).tolist()) - allowed)
    if unexpected:
        raise EMInputError(f"{label}: label values {unexpected} are not in dataset.json (allowed {sorted(allowed)}). "
                           f"Fix: correct the file or add the classes to dataset.json.")
    checks.check_same_geometry(label, seg, seg_properties, image_path, image, image_properties)


def read_ratings(rater_set: RaterSet, case: str, reader_writer, *, ignore_label: int | None) -> np.ndarray:
    """``(R, *spatial)`` int16: each rater's label of ``case`` in nnU-Net's reader order, ``-1`` where the rater did
    not annotate (the whole case for raters who did not rate it, the ignore label's voxels for those who did)."""
    maps, shape = {}, None
    for rater in rater_set.raters_of(case):
        seg = np.asarray(reader_writer.read_seg(rater_set.files[rater][case])[0][0]).astype(np.int16)
        if ignore_label is not None:
            seg[seg == ignore_label] = -1
        maps[rater], shape = seg, seg.shape
    if shape is None:
        raise ValueError(f"no rater annotated {case}")
    return np.stack([maps.get(rater, np.full(shape, -1, np.int16)) for rater in rater_set.raters])
