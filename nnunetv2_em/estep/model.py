"""E-step of the label EM, as pure array functions (numpy and scipy only: no torch, no file I/O).

The true label of a voxel is missing data. The network gives a prior ``p(true | image)`` (softmax of its logits at a
temperature ``tau``); the annotator is modelled by a transition matrix ``T[true, annotated]`` (each row sums to 1).
Then the posterior of the true label given the image and the annotation is

    q(k) ∝ softmax(z / tau)_k · T[k, a]

and the annotations' marginal log-likelihood is ``Σ_v log Σ_k softmax(z_v / tau)_k T[k, a_v]``. ``T`` is
re-estimated in closed form (Dawid-Skene update) and ``tau`` by a bounded 1-D search; both steps never decrease the
likelihood, so fitting them alternately is EM.

Conventions shared by every function here:

* ``logits``: float array ``(C, *spatial)`` or, for fitted samples, ``(C, N)``; ``C`` counts background.
* ``annotations``: int array ``(*spatial)`` or ``(N,)``; values ``0..C-1`` are annotated classes, anything else
  (nnU-Net's ignore label, ``-1`` outside the image's nonzero mask) is "not annotated" and is never changed.
* ``transition``: ``(C, C)``, ``transition[true, annotated]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

TEMPERATURE_BOUNDS = (0.05, 20.0)
_TINY = 1e-30


@dataclass(frozen=True)
class NoiseModel:
    """Annotation-noise model: ``transition[true, annotated]`` and the network's calibration temperature."""

    transition: np.ndarray
    temperature: float = 1.0
    log_likelihood: float = float("nan")  # mean per annotated voxel, at these parameters
    trace: tuple[float, ...] = field(default_factory=tuple)  # mean log-likelihood after each fitting step
    # boundary-aware model: one T[true, annotated] per band of distance to the annotated boundary (boundary_bands),
    # (NUM_BANDS, C, C); None: ``transition`` for every voxel
    band_transitions: np.ndarray | None = None
    band_width: float | None = None  # voxels; the bands' edge

    def to_dict(self) -> dict:
        result = {
            # full precision: rounding made exact zeros that the update can never leave again
            "transition": np.asarray(self.transition, dtype=np.float64).tolist(),
            "temperature": float(self.temperature),
            "log_likelihood": float(self.log_likelihood),
            "trace": [float(v) for v in self.trace],
        }
        if self.band_transitions is not None:
            result["band_transitions"] = np.asarray(self.band_transitions, dtype=np.float64).tolist()
            result["band_width"] = float(self.band_width)
        return result

    @classmethod
    def from_dict(cls, data: dict) -> NoiseModel:
        """The model ``to_dict`` wrote (a round's ``fit.json`` / summary)."""
        bands = data.get("band_transitions")
        return cls(np.asarray(data["transition"], dtype=np.float64), float(data["temperature"]),
                   float(data.get("log_likelihood", float("nan"))), tuple(data.get("trace", ())),
                   None if bands is None else np.asarray(bands, dtype=np.float64), data.get("band_width"))


@dataclass(frozen=True)
class RefinementThresholds:
    """When a voxel's annotation is changed, kept, or replaced by the ignore label (see ``refine_labels``)."""

    change_threshold: float = 0.9
    keep_threshold: float = 0.5

    def __post_init__(self):
        if not 0.5 < self.change_threshold <= 1.0:
            raise ValueError(f"change_threshold must be in (0.5, 1], got {self.change_threshold}")
        if not 0.0 <= self.keep_threshold <= 1.0:
            raise ValueError(f"keep_threshold must be in [0, 1], got {self.keep_threshold}")


def default_transition(num_classes: int, *, flip_rate: float = 0.05) -> np.ndarray:
    """Starting point of the fit: ``1 - flip_rate`` on the diagonal, the rest spread evenly.

    The identity is a fixed point of the transition update, so the fit must not start there.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    transition = np.full((num_classes, num_classes), flip_rate / (num_classes - 1))
    np.fill_diagonal(transition, 1.0 - flip_rate)
    return transition


def softmax(logits: np.ndarray, temperature: float = 1.0, *, dtype=np.float64) -> np.ndarray:
    """Softmax over axis 0 of ``logits / temperature`` (numerically stable); float64 unless ``dtype`` says."""
    scaled = np.array(logits, dtype=dtype) * dtype(1.0 / float(temperature))
    scaled -= scaled.max(axis=0, keepdims=True)
    np.exp(scaled, out=scaled)
    scaled /= scaled.sum(axis=0, keepdims=True)
    return scaled


def annotated_mask(annotations: np.ndarray, num_classes: int) -> np.ndarray:
    """Boolean mask of voxels carrying an annotated class (``0 <= a < num_classes``)."""
    return (annotations >= 0) & (annotations < num_classes)


NUM_BANDS = 3


def boundary_bands(annotations, *, num_classes: int, width: float, spacing=None) -> np.ndarray:
    """Band of every annotated voxel by its distance to the nearest voxel annotated with another class.

    A covariate of the noise model, not part of the observation, and on both sides of the boundary alike: a band
    defined by the side would fix the annotated class within it, and ``T[true, annotated]`` would carry no
    information there. With both sides in one band, over-segmentation raises the band's ``T[background, class]``
    and under-segmentation its ``T[class, background]``, both near the boundary, while errors far from any boundary
    (a missed or invented structure) fall in the far band; one ``T`` for all voxels averages them away.

    Args:
        annotations: ``(*spatial)`` int; values outside ``0..num_classes-1`` are not annotated.
        width: distance (in ``spacing`` units, voxels by default) up to which a voxel is "near" the boundary.
        spacing: per-axis voxel spacing for the distance, or None.

    Returns:
        ``(*spatial)`` int8: 0 within 1 voxel of the boundary, 1 within ``width``, 2 farther;
        -1 not annotated. A class with no other annotated class in the case is "far".
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    annotations = np.asarray(annotations)
    bands = np.full(annotations.shape, -1, np.int8)
    annotated = annotated_mask(annotations, num_classes)
    for annotated_class in range(num_classes):
        region = annotations == annotated_class
        if not region.any():
            continue
        others = annotated & ~region
        if not others.any():
            bands[region] = 2
            continue
        distance = ndimage.distance_transform_edt(~others, sampling=spacing)[region]
        bands[region] = np.where(distance <= 1.0, 0, np.where(distance <= width, 1, 2))
    return bands


def _check_bands(bands, annotations) -> np.ndarray:
    bands = np.asarray(bands)
    if bands.shape != np.shape(annotations) or np.any((bands < 0) | (bands >= NUM_BANDS)):
        raise ValueError(f"bands must have the annotations' shape {np.shape(annotations)} with values in "
                         f"0..{NUM_BANDS - 1}")
    return bands.astype(np.int64)


def _check_samples(logits, annotations, weights):
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    if logits.ndim != 2 or annotations.ndim != 1 or logits.shape[1] != annotations.shape[0]:
        raise ValueError(f"expected logits (C, N) and annotations (N,), got {logits.shape} and {annotations.shape}")
    if not np.all(annotated_mask(annotations, logits.shape[0])):
        raise ValueError("fitting samples must all be annotated (values in 0..C-1)")
    if weights is None:
        weights = np.ones(annotations.shape[0])
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != annotations.shape or np.any(weights < 0):
        raise ValueError("weights must be non-negative with shape (N,)")
    return logits, annotations, weights


def _annotation_likelihoods(probs: np.ndarray, annotations: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """``probs[k, n] · T[k, a_n]`` as ``(C, N)``: the joint of true class k and the annotation."""
    return probs * transition[:, annotations]


def mean_log_likelihood(logits, annotations, transition, temperature, *, weights=None) -> float:
    """Weighted mean over samples of ``log Σ_k softmax(z/tau)_k T[k, a]``.

    Args:
        logits: ``(C, N)``. annotations: ``(N,)`` in ``0..C-1``. transition: ``(C, C)``. weights: ``(N,)`` or None.
    """
    logits, annotations, weights = _check_samples(logits, annotations, weights)
    return _mean_log_likelihood(logits, annotations, np.asarray(transition), temperature, weights)


def _mean_log_likelihood(logits, annotations, transition, temperature, weights, truths=None) -> float:
    # Σ_k p_k T[k, a] = (Tᵀ p)[a]: one small matrix product instead of gathering T's columns per sample
    probs = softmax(logits, temperature)
    marginal = np.take_along_axis(transition.T @ probs, annotations[None], axis=0)[0]
    if truths is not None:  # complete data: the joint of the known true class and the annotation
        known = truths >= 0
        marginal[known] = probs[truths[known], np.flatnonzero(known)] * transition[truths[known], annotations[known]]
    per_sample = np.log(np.maximum(marginal, _TINY))
    return float(np.dot(weights, per_sample) / max(weights.sum(), _TINY))


def _check_truths(truths, annotations, num_classes: int):
    """``(N,)`` int64 with ``-1`` for voxels whose true class is unknown, or None."""
    if truths is None:
        return None
    truths = np.asarray(truths)
    if truths.shape != annotations.shape:
        raise ValueError(f"truths {truths.shape} must have the annotations' shape {annotations.shape}")
    truths = truths.astype(np.int64)
    return np.where((truths >= 0) & (truths < num_classes), truths, -1)


def _transition_columns(model: NoiseModel, annotations: np.ndarray, bands) -> np.ndarray:
    """``T[:, a_n]`` per sample as ``(C, N)``, from the sample's band's ``T`` when the model has bands."""
    if model.band_transitions is None:
        return np.asarray(model.transition, dtype=np.float64)[:, annotations]
    if bands is None:
        raise ValueError("a boundary-aware model needs the samples' bands")
    return np.asarray(model.band_transitions, dtype=np.float64)[bands, :, annotations].T


def _model_mean_log_likelihood(logits, annotations, model: NoiseModel, weights, bands=None) -> float:
    marginal = np.sum(softmax(logits, model.temperature) * _transition_columns(model, annotations, bands), axis=0)
    return float(np.dot(weights, np.log(np.maximum(marginal, _TINY))) / max(weights.sum(), _TINY))


def posterior(logits, annotations, model: NoiseModel, *, bands=None) -> np.ndarray:
    """Posterior over the true class per voxel, ``(C, *spatial)`` float32.

    Annotated voxels: ``∝ softmax(z/tau) · T[:, a]`` (``T`` of the voxel's boundary band for a boundary-aware
    model; ``bands`` ``(*spatial)`` as ``boundary_bands`` gives them, computed from ``annotations`` when None).
    Voxels without an annotation get the calibrated prior.
    Computed in log space (float32 keeps memory per voxel small): a product of a tiny probability and a tiny
    transition entry underflows to zero in float32 for every class at once, which left such voxels all-zero.
    """
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    num_classes = logits.shape[0]
    if logits.shape[1:] != annotations.shape:
        raise ValueError(f"logits {logits.shape} do not match annotations {annotations.shape}")
    log_probs = np.array(logits, dtype=np.float32) * np.float32(1.0 / float(model.temperature))
    mask = annotated_mask(annotations, num_classes)
    if model.band_transitions is not None and bands is None:
        bands = boundary_bands(annotations, num_classes=num_classes, width=model.band_width)
    with np.errstate(divide="ignore"):  # log(0) = -inf: an impossible (true, annotated) pair; float32 tables
        if model.band_transitions is None:  # keep the (C, N) gather at 4 bytes per entry
            log_table = np.log(np.asarray(model.transition, dtype=np.float64)).astype(np.float32)
            log_columns = log_table[:, annotations[mask]]
        else:
            log_table = np.log(np.asarray(model.band_transitions, dtype=np.float64)).astype(np.float32)
            if np.shape(bands) != annotations.shape:
                raise ValueError(f"bands {np.shape(bands)} do not match annotations {annotations.shape}")
            log_columns = log_table[_check_bands(np.asarray(bands)[mask], annotations[mask]), :,
                                    annotations[mask]].T
    prior = log_probs[:, mask].copy()
    log_probs[:, mask] += log_columns
    highest = log_probs.max(axis=0, keepdims=True)
    impossible = ~np.isfinite(highest[0])  # an annotated class no true class produces (T column all zero)
    if impossible.any():  # nothing to learn from such an annotation: the network's prior
        log_probs[:, mask] = np.where(impossible[mask][None], prior, log_probs[:, mask])
        highest = log_probs.max(axis=0, keepdims=True)
    log_probs -= highest
    np.exp(log_probs, out=log_probs)
    log_probs /= log_probs.sum(axis=0, keepdims=True)
    return log_probs
