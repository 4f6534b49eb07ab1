"""The weak-label file beside a dataset: partial masks, case-level tags and weak-only cases, checked up front.

``nnUNet_raw/<Dataset>/em_weak_labels.json``::

    {
      "version": 1,
      "cases": {
        "hippocampus_001": {"annotated_classes": ["Anterior"]},
        "hippocampus_002": {"present": ["Anterior", "Posterior"], "count": {"Anterior": 1},
                            "volume": {"Posterior": {"min": 0.9, "max": 1.4, "unit": "ml"}},
                            "location": {"Anterior": {"box": [[0, 20], [10, 40], [0, 30]]},
                                         "Posterior": {"slices": [5, 25], "axis": 0}}},
        "hippocampus_003": {"absent": [2], "location": {"1": {"side": "high", "axis": 2}}}
      }
    }

Per case, every key is optional:

* ``annotated_classes``: the foreground classes the mask covers; where the mask says background, the truth is
  background or one of the other classes (a partial label). Without it a mask covers every class.
* ``present`` / ``absent``: classes the case does / does not contain.
* ``count``: number of connected components per class.
* ``volume``: ``{"min": a, "max": b, "unit": "voxels" | "ml"}`` per class (ml use the image's spacing).
* ``location``: per class one of ``{"box": [[start, stop], ...]}`` (one pair per axis), ``{"slices": [start,
  stop], "axis": k}`` or ``{"side": "low" | "high", "axis": k}`` (the half of the image along axis k). Voxel
  indices of the image array as nnU-Net's SimpleITK reader returns it (axes z, y, x), stop exclusive.

Classes are names from ``dataset.json`` or their integer values. A case listed here whose image is in ``imagesTr``
without a label file is **weak-only**: it joins training through its constrained pseudo-label. Any bad row is one
error naming the file, the case, the key and the fix; nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from nnunetv2_em import checks
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.estep.constraints import CaseConstraints

WEAK_LABELS_FILE = "em_weak_labels.json"
KEYS = ("annotated_classes", "present", "absent", "count", "volume", "location")
FORMAT_VERSION = 1


def weak_labels_path(raw_folder: str) -> str:
    return os.path.join(raw_folder, WEAK_LABELS_FILE)


def image_information(path: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(shape, spacing)`` of an image file in numpy axis order (z, y, x), from its header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return tuple(reversed(reader.GetSize())), tuple(reversed(reader.GetSpacing()))


def parse_weak_labels(content, *, source: str, class_names: dict[str, int], labelled: set[str],
                      images: set[str], image_info: Callable[[str], tuple[tuple[int, ...], tuple[float, ...]]]
                      ) -> dict[str, CaseConstraints]:
    """Check the file's content and turn each row into ``CaseConstraints`` (regions in voxels, volumes in voxels).

    Args:
        content: the parsed JSON. source: the file (named in errors). class_names: ``{name: value}`` of the
            foreground classes. labelled: cases with a label file. images: cases with images.
        image_info: ``case -> (shape, spacing)`` of its image (numpy axis order).

    Raises:
        EMInputError: the first bad row, naming ``source``, the case, the key and the fix.
    """
    if not isinstance(content, dict) or not isinstance(content.get("cases"), dict):
        raise EMInputError(f'{source}: expected {{"version": {FORMAT_VERSION}, "cases": {{case id: {{...}}}}}}. '
                           f"Fix: see the format in docs/weak_labels.md.")
    if content.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise EMInputError(f"{source}: version {content.get('version')!r} is not supported. Fix: write version "
                           f"{FORMAT_VERSION}.")
    parsed = {}
    for case, row in sorted(content["cases"].items()):
        if case not in images:
            raise EMInputError(f"{source}: case {case}: no image in imagesTr. Fix: list only cases of this dataset "
                               f"(or add their images).")
        parsed[case] = _parse_row(case, row, source=source, class_names=class_names, weak_only=case not in labelled,
                                  image_info=image_info)
    return parsed


def _parse_row(case: str, row, *, source: str, class_names: dict[str, int], weak_only: bool,
               image_info) -> CaseConstraints:
    values = set(class_names.values())

    def fail(key: str, problem: str, fix: str):
        raise EMInputError(f"{source}: case {case}, {key}: {problem}. Fix: {fix}.")

    if not isinstance(row, dict) or not row:
        fail("row", "expected a non-empty object of constraints", f"use some of {', '.join(KEYS)}")
    unknown = sorted(set(row) - set(KEYS))
    if unknown:
        fail(unknown[0], "unknown key", f"use only {', '.join(KEYS)}")

    def klass(key: str, name) -> int:
        if isinstance(name, str) and name in class_names:
            return class_names[name]
        if isinstance(name, str) and name.lstrip("-").isdigit():
            name = int(name)
        if isinstance(name, int) and not isinstance(name, bool) and name in values:
            return name
        fail(key, f"{name!r} is not a foreground class",
             f"use one of {sorted(class_names)} or their values {sorted(values)}")

    def class_list(key: str) -> frozenset[int]:
        items = row.get(key, [])
        if not isinstance(items, list):
            fail(key, "expected a list of classes", 'e.g. ["Anterior"]')
        return frozenset(klass(key, item) for item in items)

    def class_map(key: str) -> dict:
        items = row.get(key, {})
        if not isinstance(items, dict):
            fail(key, "expected an object {class: ...}", '{"Anterior": ...}')
        return {klass(key, name): value for name, value in items.items()}

    shape, spacing = image_info(case)
    annotated = class_list("annotated_classes") if "annotated_classes" in row else None
    if weak_only and annotated is not None:
        fail("annotated_classes", "the case has no label file", "drop the key (a weak-only case annotates nothing) "
                                                                "or add its label to labelsTr")
    count = {}
    for c, n in class_map("count").items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            fail("count", f"{n!r} for class {c} is not an integer >= 0", "give a component count, e.g. 1")
        count[c] = n
    volume = {}
    for c, spec in class_map("volume").items():
        if not isinstance(spec, dict) or set(spec) - {"min", "max", "unit"} or not {"min", "max"} <= set(spec):
            fail("volume", f'class {c}: expected {{"min": a, "max": b, "unit": "voxels" | "ml"}}',
                 'e.g. {"min": 0.9, "max": 1.4, "unit": "ml"}')
        unit = spec.get("unit", "voxels")
        if unit not in ("voxels", "ml"):
            fail("volume", f"class {c}: unit {unit!r}", 'use "voxels" or "ml"')
        low, high = spec["min"], spec["max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) \
                or not 0 <= low <= high:
            fail("volume", f"class {c}: empty or negative range [{low}, {high}]", "give 0 <= min <= max")
        voxel_ml = float(np.prod(spacing)) / 1000.0  # spacing in mm
        scale = 1.0 / voxel_ml if unit == "ml" else 1.0
        volume[c] = (float(low) * scale, float(high) * scale)
    region = {}
    for c, spec in class_map("location").items():
        region[c] = _region(spec, shape, lambda problem, fix, c=c: fail("location", f"class {c}: {problem}", fix))
    constraints = CaseConstraints(annotated_classes=annotated, present=class_list("present"),
                                  absent=class_list("absent"), count=count, volume=volume, region=region,
                                  weak_only=weak_only)
    try:
        constraints.check(max(values) + 1, shape)
    except ValueError as error:
        fail("constraints", str(error), "make the row consistent")
    return constraints


def _region(spec, shape, fail) -> tuple[tuple[int, int], ...]:
    if not isinstance(spec, dict) or len(set(spec) & {"box", "slices", "side"}) != 1:
        fail('expected one of {"box": [[start, stop], ...]}, {"slices": [start, stop], "axis": k}, '
             '{"side": "low" | "high", "axis": k}', "pick one form")
    full = [(0, size) for size in shape]
    if "box" in spec:
        box = spec["box"]
        if not isinstance(box, list) or len(box) != len(shape) or not all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair) for pair in box):
            fail(f"box must be {len(shape)} [start, stop] integer pairs (image {shape})", "one pair per axis")
        full = [tuple(pair) for pair in box]
    else:
        axis = spec.get("axis")
        if not isinstance(axis, int) or not 0 <= axis < len(shape):
            fail(f"axis {axis!r} is not an axis of the image {shape}", f"use 0..{len(shape) - 1}")
        if "slices" in spec:
            pair = spec["slices"]
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                fail("slices must be [start, stop] integers", "e.g. [5, 25]")
            full[axis] = tuple(pair)
        else:
            half = shape[axis] // 2
            if spec["side"] not in ("low", "high"):
                fail(f"side {spec['side']!r}", 'use "low" or "high"')
            full[axis] = (0, max(half, 1)) if spec["side"] == "low" else (half, shape[axis])
    for (start, stop), size in zip(full, shape, strict=True):
        if not 0 <= start < stop <= size:
            fail(f"[{start}, {stop}) is empty or outside the image (size {size} on that axis, shape {shape})",
                 "give a range inside the image")
    return tuple(full)


def load_weak_labels(raw_folder: str, dataset_json: dict, *, labelled, images) -> dict[str, CaseConstraints]:
    """The dataset's weak labels (``{}`` without the file), checked; regions and volumes in raw image voxels."""
    path = weak_labels_path(raw_folder)
    if not checks.optional_file(path):
        return {}
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EMInputError(f"{path}: not valid JSON ({error}). Fix: correct the file or delete it.") from None
    class_names = {name: int(value) for name, value in dataset_json["labels"].items()
                   if name not in ("ignore", "background") and int(value) > 0}
    ending = dataset_json["file_ending"]

    def info(case):
        return image_information(os.path.join(raw_folder, "imagesTr", f"{case}_0000{ending}"))

    return parse_weak_labels(content, source=path, class_names=class_names, labelled=set(labelled),
                             images=set(images), image_info=info)
