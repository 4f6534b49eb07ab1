"""One E-step over many cases: each case's fitting sample, the round's pooled fit, and whether to refine at all.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from nnunetv2_em.estep.fit import _sample_indices, fit_band_transitions, fit_noise_model
from nnunetv2_em.estep.model import (
    _TINY,
    TEMPERATURE_BOUNDS,
    NoiseModel,
    RefinementThresholds,
    _check_truths,
    boundary_bands,
    posterior,
)
from nnunetv2_em.estep.refine import refine_labels
from nnunetv2_em.estep.scores import foreground_dice

MAX_IGNORED_SHARE = 0.25  # a fit that would set more of the annotated voxels to ignore is refused


@dataclass(frozen=True)
class CaseSample:
    """What one case contributes to the round's noise-model fit (see ``sample_case``)."""

    logits: np.ndarray  # (C, N)
    annotations: np.ndarray  # (N,)
    weights: np.ndarray  # (N,)
    dice: tuple[float, ...]  # annotation vs. network argmax, per foreground class
    bands: np.ndarray | None = None  # (N,) boundary bands of the sampled voxels (boundary-aware models)
    truths: np.ndarray | None = None  # (N,) true class of the sampled voxels where known (reviewed), else -1


@dataclass(frozen=True)
class RoundFit:
    """The round's noise model, the network's agreement with the annotation, and whether to refine at all."""

    model: NoiseModel
    model_dice: float
    refine: bool
    refused: str | None = None  # why a fit that passed the quality gate was still not applied (degenerate)


def case_seed(seed: int, round_index: int, case: str) -> list[int]:
    """A sampling seed that depends on the case's name, not on the order in which cases are processed."""
    return [seed, round_index, zlib.crc32(case.encode())]


def voxels_per_class(total_voxels: int, *, num_cases: int, num_classes: int) -> int:
    """Per-case, per-class sample cap so that a round samples at most ``total_voxels`` voxels."""
    return max(1, total_voxels // max(1, num_cases * num_classes))


def sample_case(logits, annotations, *, max_voxels_per_class: int, seed, band_width: float | None = None,
                truth=None) -> CaseSample:
    """Stratified fitting sample of one case and its annotation-vs-prediction Dice.

    Args:
        logits: ``(C, *spatial)``. annotations: ``(*spatial)``. seed: anything ``numpy.random.default_rng`` takes.
        band_width: also record each sampled voxel's ``boundary_bands`` band at this width (boundary-aware fit).
        truth: ``(*spatial)`` the case's true labels (a reviewed case): the fit counts its (true, annotated) pairs
            as complete data; values outside ``0..C-1`` (ignore, outside the image) count as unknown.
    """
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    if logits.shape[1:] != annotations.shape:
        raise ValueError(f"logits {logits.shape} do not match annotations {annotations.shape}")
    num_classes = logits.shape[0]
    flat_annotations = annotations.reshape(-1)
    indices, weights = _sample_indices(flat_annotations, num_classes, max_voxels_per_class,
                                       np.random.default_rng(seed))
    bands = None
    if band_width is not None:
        bands = boundary_bands(annotations, num_classes=num_classes, width=band_width).reshape(-1)[indices]
        bands = bands.astype(np.int64)
    truths = None
    if truth is not None:
        if np.shape(truth) != annotations.shape:
            raise ValueError(f"truth {np.shape(truth)} does not match annotations {annotations.shape}")
        truths = _check_truths(np.asarray(truth).reshape(-1)[indices], flat_annotations[indices], num_classes)
    dice_values = foreground_dice(annotations, logits.argmax(axis=0), num_classes=num_classes)
    return CaseSample(logits.reshape(num_classes, -1)[:, indices].astype(np.float32),
                      flat_annotations[indices].astype(np.int64), weights, tuple(dice_values), bands, truths)


def degenerate_fit(samples: list[CaseSample], model: NoiseModel, *, thresholds: RefinementThresholds,
                   max_ignored_share: float = MAX_IGNORED_SHARE) -> str | None:
    """Why refining with ``model`` would be degenerate, or None: the temperature ran to a bound of its search
    (the fit explains the annotation away rather than calibrating the network), or the refinement would set more
    than ``max_ignored_share`` of the annotated voxels to ignore (estimated on the weighted fitting sample)."""
    low, high = TEMPERATURE_BOUNDS
    if not low * 1.01 < model.temperature < high / 1.01:
        return (f"temperature {model.temperature:.3g} at the bound of its search {TEMPERATURE_BOUNDS}: the network "
                f"does not explain the annotation")
    logits, annotations, weights, bands = _pooled(samples)
    num_classes = logits.shape[0]
    refined = refine_labels(posterior(logits, annotations, model, bands=bands), annotations, thresholds=thresholds,
                            ignore_label=num_classes)
    ignored_share = float(np.sum(weights * (refined == num_classes)) / max(np.sum(weights), _TINY))
    if ignored_share > max_ignored_share:
        return (f"{ignored_share:.1%} of the annotated voxels would become ignore (limit {max_ignored_share:.0%}): "
                f"the network disagrees with the annotation too broadly to refine it")
    return None


def _pooled(samples: list[CaseSample]):
    """All cases' samples as one ``(logits (C, N), annotations (N,), weights (N,), bands (N,) or None)``."""
    bands = None if any(s.bands is None for s in samples) else np.concatenate([s.bands for s in samples])
    return (np.concatenate([s.logits for s in samples], axis=1), np.concatenate([s.annotations for s in samples]),
            np.concatenate([s.weights for s in samples]), bands)


def _pooled_truths(samples: list[CaseSample]) -> np.ndarray | None:
    """``(N,)`` known true classes of all samples (``-1`` unknown), or None when no sample knows one."""
    if all(s.truths is None for s in samples):
        return None
    return np.concatenate([np.full(s.annotations.shape, -1, np.int64) if s.truths is None else s.truths
                           for s in samples])


def fit_round(samples: list[CaseSample], *, calibrate_temperature: bool, max_iterations: int,
              min_model_dice: float, thresholds: RefinementThresholds | None = None,
              max_ignored_share: float = MAX_IGNORED_SHARE, band_width: float | None = None,
              band_prior_strength: float = 100.0) -> RoundFit:
    """Fit the round's noise model on all cases' samples and decide whether the network is good enough to refine.

    The temperature and one ``T`` come from ``fit_noise_model``; with ``band_width`` (samples drawn with the same
    ``band_width``) each boundary band then gets its own ``T`` shrunk toward it (``fit_band_transitions``,
    ``band_prior_strength`` voxels), which can only raise the likelihood (the trace goes on; samples with known
    truths (``sample_case(truth=)``) enter ``fit_noise_model`` as complete data, the band stage as marginal
    terms). An untrained network
    would "explain" the annotation away as noise, so labels are only refined once the mean foreground Dice between
    the network and the annotation reaches ``min_model_dice``, and never with a degenerate fit
    (``degenerate_fit``; checked when ``thresholds`` are given).
    """
    if not samples:
        raise ValueError("no cases to fit the noise model on")
    logits, annotations, weights, bands = _pooled(samples)
    model = fit_noise_model(logits, annotations, weights=weights, calibrate_temperature=calibrate_temperature,
                            max_iterations=max_iterations, truths=_pooled_truths(samples))
    if band_width is not None:
        if bands is None:
            raise ValueError("a boundary-aware fit needs samples drawn with band_width (sample_case)")
        banded = fit_band_transitions(logits, annotations, bands, model, strength=band_prior_strength,
                                      width=band_width, weights=weights)
        model = dataclasses.replace(banded, trace=(*model.trace, banded.log_likelihood))
    dice_values = [d for s in samples for d in s.dice if not np.isnan(d)]
    model_dice = float(np.mean(dice_values)) if dice_values else 0.0
    refine = model_dice >= min_model_dice
    refused = (degenerate_fit(samples, model, thresholds=thresholds, max_ignored_share=max_ignored_share)
               if refine and thresholds is not None else None)
    return RoundFit(model, model_dice, refine and refused is None, refused)
