"""Seeded annotation-noise models for benchmarks: pure array functions (numpy/scipy, no files).

Each model takes a clean label map ``(*spatial)`` (0 = background, 1..K-1 = classes) and a ``numpy`` Generator and
returns ``(noisy, record)``; ``record`` says what was done (JSON-serialisable). Which voxels changed is
``noisy != clean``. ``corrupt_cases`` picks the cases to corrupt for a named setting, reproducibly from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def _foreground_classes(label: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(label) if c > 0]


def erode(label, *, rng, k: int = 2):
    """Every foreground class shrunk by ``k`` voxels (a too-tight annotator); freed voxels become background."""
    noisy = label.copy()
    for c in _foreground_classes(label):
        mask = label == c
        kept = ndimage.binary_erosion(mask, iterations=k)
        noisy[mask & ~kept] = 0
    return noisy, {"model": "erode", "k": k}


def dilate(label, *, rng, k: int = 2):
    """Every foreground class grown by ``k`` voxels into background (a too-generous annotator)."""
    noisy = label.copy()
    for c in _foreground_classes(label):
        grown = ndimage.binary_dilation(label == c, iterations=k)
        noisy[grown & (noisy == 0)] = c
    return noisy, {"model": "dilate", "k": k}


def missing_structure(label, *, rng):
    """One foreground class (chosen at random) left unannotated: all its voxels become background."""
    classes = _foreground_classes(label)
    if not classes:
        return label.copy(), {"model": "missing_structure", "class": None}
    c = int(rng.choice(classes))
    noisy = label.copy()
    noisy[label == c] = 0
    return noisy, {"model": "missing_structure", "class": c}


def missing_component(label, *, rng):
    """The largest connected component of one random foreground class removed."""
    classes = _foreground_classes(label)
    if not classes:
        return label.copy(), {"model": "missing_component", "class": None}
    c = int(rng.choice(classes))
    components, count = ndimage.label(label == c)
    sizes = np.bincount(components.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    noisy = label.copy()
    noisy[components == largest] = 0
    return noisy, {"model": "missing_component", "class": c, "voxels": int(sizes[largest - 1])}


def spurious_blobs(label, *, rng, count: int = 2, radius: int = 3):
    """``count`` ball-shaped blobs of a random foreground class painted onto background voxels."""
    classes = _foreground_classes(label) or [1]
    background = np.argwhere(label == 0)
    noisy = label.copy()
    blobs = []
    grid = np.indices(label.shape)
    for _ in range(count):
        centre = background[rng.integers(len(background))]
        c = int(rng.choice(classes))
        distance = np.sqrt(sum((g - x) ** 2 for g, x in zip(grid, centre, strict=True)))
        ball = (distance <= radius) & (noisy == 0)
        noisy[ball] = c
        blobs.append({"centre": centre.tolist(), "class": c, "voxels": int(ball.sum())})
    return noisy, {"model": "spurious_blobs", "radius": radius, "blobs": blobs}


def class_swap(label, *, rng):
    """All voxels of one foreground class annotated as another (e.g. anterior marked posterior)."""
    classes = _foreground_classes(label)
    if len(classes) < 2:
        return label.copy(), {"model": "class_swap", "from": None, "to": None}
    source, target = (int(c) for c in rng.choice(classes, size=2, replace=False))
    noisy = label.copy()
    noisy[label == source] = target
    return noisy, {"model": "class_swap", "from": source, "to": target}


def dropped_slices(label, *, rng, fraction: float = 0.3, axis: int = 0):
    """A fraction of the slices (along ``axis``) that contain foreground left unannotated (background)."""
    other_axes = tuple(a for a in range(label.ndim) if a != axis)
    with_foreground = np.flatnonzero((label > 0).any(axis=other_axes))
    n = int(round(fraction * len(with_foreground)))
    chosen = np.sort(rng.choice(with_foreground, size=n, replace=False)) if n else np.array([], int)
    noisy = label.copy()
    index = [slice(None)] * label.ndim
    for s in chosen:
        index[axis] = int(s)
        noisy[tuple(index)] = 0
    return noisy, {"model": "dropped_slices", "axis": axis, "slices": chosen.tolist()}


MODELS = {
    "erode": erode,
    "dilate": dilate,
    "missing_structure": missing_structure,
    "missing_component": missing_component,
    "spurious_blobs": spurious_blobs,
    "class_swap": class_swap,
    "dropped_slices": dropped_slices,
}


@dataclass(frozen=True)
class NoiseSetting:
    """A named benchmark setting: which models, with what parameters, on what fraction of the cases."""

    name: str
    models: tuple[tuple[str, dict], ...]  # one is drawn per corrupted case
    fraction: float
    description: str = ""


SETTINGS = {
    "erode2": NoiseSetting("erode2", (("erode", {"k": 2}),), 0.5,
                           "half of the training cases eroded by 2 voxels"),
    "dilate2": NoiseSetting("dilate2", (("dilate", {"k": 2}),), 0.5,
                            "half of the training cases dilated by 2 voxels"),
    "missing": NoiseSetting("missing", (("missing_structure", {}),), 0.3,
                            "30 % of the training cases miss one structure"),
    "blobs": NoiseSetting("blobs", (("spurious_blobs", {"count": 2, "radius": 3}),), 0.5,
                          "half of the training cases get 2 spurious blobs"),
    "swap": NoiseSetting("swap", (("class_swap", {}),), 0.3,
                         "30 % of the training cases have one class swapped into another"),
    "slices": NoiseSetting("slices", (("dropped_slices", {"fraction": 0.3}),), 0.5,
                           "half of the training cases lose 30 % of their labelled slices"),
    "mix": NoiseSetting("mix", (("erode", {"k": 2}), ("dilate", {"k": 2}), ("missing_structure", {}),
                                ("spurious_blobs", {"count": 2, "radius": 3}), ("class_swap", {}),
                                ("dropped_slices", {"fraction": 0.3})), 0.5,
                        "half of the training cases, each with one model drawn from all of the above"),
}


def corrupt_cases(labels: dict[str, np.ndarray], setting: NoiseSetting, *, seed: int):
    """Corrupt ``round(fraction * n)`` of the cases with the setting's models, reproducibly.

    Returns:
        ``(noisy labels {case: array}, records {case: record}, sorted list of corrupted cases)``; uncorrupted
        cases are returned as they are (same array objects).
    """
    rng = np.random.default_rng(seed)
    cases = sorted(labels)
    count = int(round(setting.fraction * len(cases)))
    corrupted = sorted(str(c) for c in rng.choice(cases, size=count, replace=False)) if count else []
    noisy, records = dict(labels), {}
    for case in corrupted:
        name, params = setting.models[int(rng.integers(len(setting.models)))]
        noisy[case], record = MODELS[name](labels[case], rng=rng, **params)
        record["voxels_changed"] = int(np.count_nonzero(noisy[case] != labels[case]))
        records[case] = record
    return noisy, records, corrupted
