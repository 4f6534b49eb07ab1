"""Seeded annotation-noise models for benchmarks: pure array functions (numpy/scipy, no files).

Each model takes a clean label map ``(*spatial)`` (0 = background, 1..K-1 = classes) and a ``numpy`` Generator and
returns ``(noisy, record)``; ``record`` says what was done (JSON-serialisable). Which voxels changed is
``noisy != clean``. ``corrupt_cases`` picks the cases to corrupt for a named setting, reproducibly from a seed.

Protocols from the literature (re-implemented from the papers' descriptions; parameters in ``SETTINGS``):

- ``adele``: Liu et al., "Adaptive early-learning correction for segmentation from noisy annotations", CVPR 2022
  (their released code is MIT): per chosen case every structure is resized so its foreground is about 1000 voxels
  (per slice for 2D, per volume for 3D), eroded or dilated 2-4 iterations with a full 3x3 kernel, resized back.
- ``markov_boundary``: Yao et al., "Learning to segment from noisy annotations: a spatial correction approach",
  ICLR 2023 (their code has no licence: written from the paper): a Markov chain of boundary moves; each step
  dilates (probability ``p_dilate``) or erodes, and every voxel of the moving band flips with ``p_flip``, so a case
  drifts in one direction when ``p_dilate`` is not 0.5. Their 3D BraTS setting is 80 steps, 0.7 / 0.3, 0.05;
  tumours are ~10x the size of a hippocampus: on real Hippocampus labels 40 steps leave a Dice of ~0.5, so the
  benchmark uses 20 (Dice ~0.77, volume +26 % / -19 %, close to ADELE's settings).
- ``annotator``: Zhang et al., "Disentangling human error from the ground truth in segmentation of medical images",
  NeurIPS 2020: each case is drawn by one of five simulated annotators (good, over-, under-segmenting, wrong =
  fractured and over-segmenting, blank), acting on one target structure.
- ``lazy_slices``: a structure left blank on a contiguous run of its slices (an annotator who skipped part of it).
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


_FULL_KERNEL_ITERATIONS = (2, 4)  # ADELE: 2-4 iterations, drawn per case


def _resize_mask(mask: np.ndarray, shape) -> np.ndarray:
    from skimage.transform import resize

    return resize(mask.astype(np.float32), shape, order=1, mode="edge", anti_aliasing=False) >= 0.5


def _adele_morph(mask: np.ndarray, *, mode: str, iterations: int, target_voxels: int) -> np.ndarray:
    """One structure (bool ``(*spatial)``) resized to about ``target_voxels`` foreground, eroded/dilated with a full
    3^d kernel, resized back to its shape."""
    count = int(mask.sum())
    if count == 0:
        return mask
    scale = (target_voxels / count) ** (1.0 / mask.ndim)
    shape = tuple(max(1, int(round(n * scale))) for n in mask.shape)
    big = _resize_mask(mask, shape)
    kernel = np.ones((3,) * mask.ndim, bool)
    operation = ndimage.binary_erosion if mode == "under" else ndimage.binary_dilation
    # border_value 0 erodes at the edge like cv2's default; dilation needs headroom, so pad first
    padded = np.pad(big, iterations) if mode == "over" else big
    moved = operation(padded, structure=kernel, iterations=iterations)
    if mode == "over":
        moved = moved[tuple(slice(iterations, iterations + n) for n in shape)]
    return _resize_mask(moved, mask.shape)


def adele(label, *, rng, mode: str, iterations=_FULL_KERNEL_ITERATIONS, target_voxels: int = 1000,
          axis: int | None = 0):
    """ADELE under/over segmentation: every structure shrunk (``mode="under"``) or grown (``"over"``).

    Args:
        iterations: ``(low, high)``, inclusive; one count is drawn per case. axis: slices along this axis are
            treated one by one (the 2D protocol); ``None`` treats the volume as a whole (3D).
    """
    if mode not in ("under", "over"):
        raise ValueError(f"mode must be 'under' or 'over', got {mode!r}")
    k = int(rng.integers(iterations[0], iterations[1] + 1))
    noisy = label.copy()
    for c in _foreground_classes(label):
        mask = label == c
        moved = np.zeros_like(mask)
        if axis is None:
            moved = _adele_morph(mask, mode=mode, iterations=k, target_voxels=target_voxels)
        else:
            for s in np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))):
                index = [slice(None)] * mask.ndim
                index[axis] = int(s)
                moved[tuple(index)] = _adele_morph(mask[tuple(index)], mode=mode, iterations=k,
                                                   target_voxels=target_voxels)
        if mode == "under":
            noisy[mask & ~moved] = 0
        else:
            noisy[moved & (noisy == 0)] = c
    return noisy, {"model": "adele", "mode": mode, "iterations": k, "target_voxels": target_voxels,
                   "axis": axis}


def markov_boundary(label, *, rng, steps: int = 20, p_dilate: float = 0.7, p_flip: float = 0.05):
    """Every structure's boundary moved by a biased random walk: ``steps`` moves, each a dilation (probability
    ``p_dilate``) or an erosion of which every voxel of the one-voxel band happens with probability ``p_flip``.
    Grown voxels only take background; freed voxels become background."""
    noisy = label.copy()
    for c in _foreground_classes(label):
        mask = label == c
        for _ in range(steps):
            if rng.random() < p_dilate:
                band = ndimage.binary_dilation(mask) & ~mask & (label == 0)
                mask = mask | (band & (rng.random(mask.shape) < p_flip))
            else:
                band = mask & ~ndimage.binary_erosion(mask)
                mask = mask & ~(band & (rng.random(mask.shape) < p_flip))
        noisy[(label == c) & ~mask] = 0
        noisy[mask & (noisy == 0)] = c
    return noisy, {"model": "markov_boundary", "steps": steps, "p_dilate": p_dilate, "p_flip": p_flip}


ANNOTATORS = ("good", "over", "under", "wrong", "blank")


def annotator(label, *, rng, kind: str, k: int = 2, fractures: int = 3):
    """One simulated annotator (Zhang et al. 2020) on one target structure drawn at random: ``good`` (unchanged),
    ``over`` (dilated by ``k``), ``under`` (eroded by ``k``), ``wrong`` (dilated by 1 and cut by ``fractures``
    one-voxel planes across axis 0), ``blank`` (left out)."""
    if kind not in ANNOTATORS:
        raise ValueError(f"kind must be one of {ANNOTATORS}, got {kind!r}")
    classes = _foreground_classes(label)
    if not classes or kind == "good":
        return label.copy(), {"model": "annotator", "kind": kind, "class": int(rng.choice(classes)) if classes
                              else None}
    c = int(rng.choice(classes))
    mask = label == c
    noisy = label.copy()
    record = {"model": "annotator", "kind": kind, "class": c}
    if kind == "blank":
        noisy[mask] = 0
    elif kind == "under":
        noisy[mask & ~ndimage.binary_erosion(mask, iterations=k)] = 0
    else:
        grown = ndimage.binary_dilation(mask, iterations=k if kind == "over" else 1)
        noisy[grown & (noisy == 0)] = c
        if kind == "wrong":
            extent = np.flatnonzero(grown.any(axis=tuple(range(1, label.ndim))))
            cuts = np.sort(rng.choice(extent, size=min(fractures, extent.size), replace=False))
            for s in cuts:
                plane = noisy[int(s)]
                plane[plane == c] = 0
            record["fractures"] = cuts.tolist()
    return noisy, record


def lazy_slices(label, *, rng, fraction: float = 0.4, axis: int = 0):
    """One structure drawn at random left blank on a contiguous run of ``fraction`` of its slices along ``axis``."""
    classes = _foreground_classes(label)
    if not classes:
        return label.copy(), {"model": "lazy_slices", "class": None, "slices": []}
    c = int(rng.choice(classes))
    other_axes = tuple(a for a in range(label.ndim) if a != axis)
    with_class = np.flatnonzero((label == c).any(axis=other_axes))
    length = max(1, int(round(fraction * with_class.size)))
    start = int(rng.integers(0, with_class.size - length + 1))
    chosen = with_class[start:start + length]
    noisy = label.copy()
    index = [slice(None)] * label.ndim
    for s in chosen:
        index[axis] = int(s)
        view = noisy[tuple(index)]
        view[view == c] = 0
    return noisy, {"model": "lazy_slices", "class": c, "axis": axis, "slices": chosen.tolist()}


MODELS = {
    "erode": erode,
    "dilate": dilate,
    "missing_structure": missing_structure,
    "missing_component": missing_component,
    "spurious_blobs": spurious_blobs,
    "class_swap": class_swap,
    "dropped_slices": dropped_slices,
    "adele": adele,
    "markov_boundary": markov_boundary,
    "annotator": annotator,
    "lazy_slices": lazy_slices,
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
    "clean": NoiseSetting("clean", (), 0.0, "no noise: the do-no-harm control (EM must not damage clean labels)"),
    "adele_under": NoiseSetting("adele_under", (("adele", {"mode": "under"}),), 0.5,
                                "ADELE: half of the training cases under-segmented (each structure resized to ~1000 "
                                "voxels per slice, eroded 2-4 iterations with a 3x3 kernel, resized back)"),
    "adele_over": NoiseSetting("adele_over", (("adele", {"mode": "over"}),), 0.5,
                               "ADELE: half of the training cases over-segmented (as adele_under, dilated)"),
    "markov_over": NoiseSetting("markov_over", (("markov_boundary", {"steps": 20, "p_dilate": 0.7, "p_flip": 0.05}),),
                                0.5, "Markov boundary noise biased outwards on half of the training cases (20 steps, "
                                     "dilate with p 0.7, band flips with p 0.05)"),
    "markov_under": NoiseSetting("markov_under", (("markov_boundary", {"steps": 20, "p_dilate": 0.3,
                                                                         "p_flip": 0.05}),),
                                 0.5, "Markov boundary noise biased inwards on half of the training cases (20 steps, "
                                      "dilate with p 0.3, band flips with p 0.05)"),
    "annotators": NoiseSetting("annotators", tuple(("annotator", {"kind": kind}) for kind in ANNOTATORS), 1.0,
                               "every training case drawn by one of five simulated annotators (good, over, under, "
                               "wrong, blank; 2-voxel moves) acting on one structure"),
    "lazy": NoiseSetting("lazy", (("lazy_slices", {"fraction": 0.4}),), 0.5,
                         "half of the training cases with one structure left blank on a contiguous run of 40 % of "
                         "its slices"),
}


def corrupt_cases(labels: dict[str, np.ndarray], setting: NoiseSetting, *, seed: int):
    """Apply the setting's models to ``round(fraction * n)`` of the cases (one model drawn per case), reproducibly.

    Returns:
        ``(noisy labels {case: array}, records {case: record} of every chosen case, sorted list of corrupted cases)``:
        a chosen case whose label did not change (a ``good`` annotator) is recorded but not corrupted, and keeps its
        array object like every case that was not chosen.
    """
    rng = np.random.default_rng(seed)
    cases = sorted(labels)
    count = int(round(setting.fraction * len(cases)))
    chosen = sorted(str(c) for c in rng.choice(cases, size=count, replace=False)) if count else []
    noisy, records = dict(labels), {}
    for case in chosen:
        name, params = setting.models[int(rng.integers(len(setting.models)))]
        changed, record = MODELS[name](labels[case], rng=rng, **params)
        record["voxels_changed"] = int(np.count_nonzero(changed != labels[case]))
        records[case] = record
        if record["voxels_changed"]:
            noisy[case] = changed
    return noisy, records, [case for case in chosen if records[case]["voxels_changed"]]
