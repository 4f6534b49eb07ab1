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

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize

TEMPERATURE_BOUNDS = (0.05, 20.0)
MAX_IGNORED_SHARE = 0.25  # a fit that would set more of the annotated voxels to ignore is refused
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


def update_transition(probs, annotations, transition, *, weights=None, truths=None) -> np.ndarray:
    """One closed-form EM update of ``T`` given fixed network probabilities.

    ``T_new[k, j] = Σ_{n: a_n = j} w_n q_n(k) / Σ_n w_n q_n(k)`` with ``q_n`` the posterior under the current ``T``,
    or the one-hot of the true class where ``truths`` knows it (complete data, e.g. reviewed cases: their pairs
    (true, annotated) are counted as they are). Rows of classes that receive no mass keep their old values.

    Args:
        probs: ``(C, N)`` probabilities (already temperature-scaled). annotations: ``(N,)``. transition: ``(C, C)``.
        truths: ``(N,)`` true class per sample, ``-1`` where unknown; None: all unknown.
    """
    probs, annotations, weights = _check_samples(probs, annotations, weights)
    transition = np.asarray(transition, dtype=np.float64)
    num_classes = probs.shape[0]
    truths = _check_truths(truths, annotations, num_classes)
    joint = _annotation_likelihoods(probs, annotations, transition)
    posterior = joint / np.maximum(joint.sum(axis=0, keepdims=True), _TINY)
    if truths is not None:
        known = np.flatnonzero(truths >= 0)
        posterior[:, known] = 0.0
        posterior[truths[known], known] = 1.0
    weighted = posterior * weights[None]
    counts = np.zeros((num_classes, num_classes))
    for annotated_class in range(num_classes):
        counts[:, annotated_class] = weighted[:, annotations == annotated_class].sum(axis=1)
    row_mass = counts.sum(axis=1, keepdims=True)
    return np.where(row_mass > 0, counts / np.maximum(row_mass, _TINY), transition)


def fit_temperature(logits, annotations, transition, *, weights=None, current: float = 1.0,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS, truths=None) -> float:
    """Temperature maximising the annotations' marginal likelihood for a fixed ``T`` (bounded search on log tau);
    samples with a known true class (``truths``) contribute their complete-data likelihood.

    Returns ``current`` unless the search finds a strictly better value, so a fitting loop never loses likelihood.
    """
    logits, annotations, weights = _check_samples(logits, annotations, weights)
    transition = np.asarray(transition, dtype=np.float64)
    truths = _check_truths(truths, annotations, logits.shape[0])

    def negative_likelihood(log_temperature):
        return -_mean_log_likelihood(logits, annotations, transition, np.exp(log_temperature), weights, truths)

    result = optimize.minimize_scalar(negative_likelihood, bounds=np.log(bounds), method="bounded",
                                      options={"xatol": 1e-4})
    if result.fun < negative_likelihood(np.log(current)):
        return float(np.exp(result.x))
    return float(current)


def fit_noise_model(logits, annotations, *, weights=None, initial: NoiseModel | None = None,
                    calibrate_temperature: bool = True, max_iterations: int = 100,
                    tolerance: float = 1e-6, truths=None) -> NoiseModel:
    """Maximise the annotations' likelihood over ``T`` and the temperature by alternating updates: the marginal
    likelihood of voxels whose true class is unknown plus the complete-data likelihood of those whose true class
    is known (``truths``: reviewed cases). Both updates maximise that sum, so it never decreases.

    Args:
        logits: ``(C, N)`` sampled network logits. annotations: ``(N,)`` annotated classes of the same voxels.
        weights: ``(N,)`` sampling weights (see ``sample_voxels``), or None for equal weights.
        truths: ``(N,)`` the true class where known (reviewed), ``-1`` elsewhere; None: all unknown.
        initial: starting model; default ``default_transition(C)`` at temperature 1.
        calibrate_temperature: also fit the temperature (otherwise it stays at the initial value).
        max_iterations: maximum number of (temperature, transition) update pairs.
        tolerance: stop once one pair of updates gains less than this in mean log-likelihood.

    Returns:
        The fitted ``NoiseModel``; ``trace`` holds the mean log-likelihood at the start and after every update, and
        never decreases.
    """
    logits, annotations, weights = _check_samples(logits, annotations, weights)
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=0, keepdims=True)  # softmax is shift-invariant at any temperature
    num_classes = logits.shape[0]
    if initial is None:
        initial = NoiseModel(default_transition(num_classes), 1.0)
    transition = np.asarray(initial.transition, dtype=np.float64)
    if transition.shape != (num_classes, num_classes):
        raise ValueError(f"initial transition must be {(num_classes, num_classes)}, got {transition.shape}")
    temperature = float(initial.temperature)
    truths = _check_truths(truths, annotations, num_classes)

    def likelihood():
        return _mean_log_likelihood(logits, annotations, transition, temperature, weights, truths)

    trace = [likelihood()]
    for iteration in range(max_iterations):
        before = trace[-1]
        if calibrate_temperature:
            # after a first global search the optimum moves little: search near it (much cheaper)
            bounds = TEMPERATURE_BOUNDS if iteration == 0 else (
                max(TEMPERATURE_BOUNDS[0], temperature / 1.5), min(TEMPERATURE_BOUNDS[1], temperature * 1.5))
            temperature = fit_temperature(logits, annotations, transition, weights=weights, current=temperature,
                                          bounds=bounds, truths=truths)
            trace.append(likelihood())
        transition = update_transition(softmax(logits, temperature), annotations, transition, weights=weights,
                                       truths=truths)
        trace.append(likelihood())
        if trace[-1] - before < tolerance:
            break
    return NoiseModel(transition, temperature, trace[-1], tuple(trace))


def fit_case_transition(logits, annotations, model: NoiseModel, *, strength: float, weights=None,
                        max_iterations: int = 50, tolerance: float = 1e-7) -> NoiseModel:
    """One case's transition matrix, MAP-estimated under a Dirichlet prior centred on the dataset's ``model``.

    Each row ``k`` has the prior ``Dirichlet(strength · T[k] + 1)``, so the EM update is

        T_case[k, j] = (Σ_{n: a_n = j} w_n q_n(k) + strength · T[k, j]) / (Σ_n w_n q_n(k) + strength)

    with ``q_n`` the posterior under the current ``T_case``; it never decreases the log-likelihood plus log-prior
    (``trace``). ``strength`` is in voxels: a row with much more posterior mass than ``strength`` follows the case,
    a rare one stays near the dataset's. ``strength → ∞`` gives ``model.transition``; ``0`` the case's own
    maximum-likelihood ``T``. The temperature stays the dataset's: one case cannot calibrate a network.

    Args:
        logits: ``(C, N)`` the case's (sampled) logits. annotations: ``(N,)`` in ``0..C-1``. weights: ``(N,)``
            sampling weights (``sample_voxels``) so that counts are in voxels, or None.

    Returns:
        A ``NoiseModel`` with the case's transition and the dataset's temperature; ``log_likelihood`` is the case's
        mean log-likelihood (without the prior), ``trace`` the penalised objective per unit weight after each update.
    """
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    logits, annotations, weights = _check_samples(logits, annotations, weights)
    prior = np.asarray(model.transition, dtype=np.float64)
    num_classes = logits.shape[0]
    if prior.shape != (num_classes, num_classes):
        raise ValueError(f"model transition must be {(num_classes, num_classes)}, got {prior.shape}")
    probs = softmax(logits, model.temperature)
    total = max(float(weights.sum()), _TINY)

    def objective(transition):
        with np.errstate(divide="ignore"):
            log_transition = np.where(prior > 0, np.log(np.maximum(transition, _TINY)), 0.0)
        log_prior = float(np.sum(strength * prior * log_transition))
        return _mean_log_likelihood(logits, annotations, transition, model.temperature, weights) + log_prior / total

    transition = prior.copy()
    trace = [objective(transition)]
    for _ in range(max_iterations):
        joint = _annotation_likelihoods(probs, annotations, transition)
        weighted = joint / np.maximum(joint.sum(axis=0, keepdims=True), _TINY) * weights[None]
        counts = np.stack([weighted[:, annotations == j].sum(axis=1) for j in range(num_classes)], axis=1)
        counts += strength * prior
        row_mass = counts.sum(axis=1, keepdims=True)
        transition = np.where(row_mass > 0, counts / np.maximum(row_mass, _TINY), transition)
        trace.append(objective(transition))
        if trace[-1] - trace[-2] < tolerance:
            break
    return NoiseModel(transition, model.temperature,
                      _mean_log_likelihood(logits, annotations, transition, model.temperature, weights), tuple(trace))


def fit_band_transitions(logits, annotations, bands, model: NoiseModel, *, strength: float, width: float,
                         weights=None) -> NoiseModel:
    """One ``T`` per boundary band (``boundary_bands``), each MAP-estimated under a Dirichlet prior centred on
    ``model``'s (its band's ``T`` when ``model`` has bands, else its single ``T``), at ``model``'s temperature.

    Each band is an independent ``fit_case_transition`` on its own voxels. Starting at the prior's mode, every
    band's penalised likelihood rises while its log-prior can only fall, so the likelihood of the banded model is
    never below the prior model's: ``trace`` is ``(before, after)`` in mean log-likelihood per annotated voxel.
    A band without samples keeps its prior. Used on the whole dataset's sample (the round's model) and on one case
    (the case's model, shrunk toward the dataset's bands).

    Args:
        logits: ``(C, N)``. annotations: ``(N,)`` in ``0..C-1``. bands: ``(N,)`` in ``0..NUM_BANDS-1``.
        strength: prior strength in voxels per row of each band's ``T``. width: the bands' edge (recorded).
        weights: ``(N,)`` sampling weights or None.

    Returns:
        A ``NoiseModel`` with ``band_transitions`` ``(NUM_BANDS, C, C)``, ``band_width`` and ``model``'s single
        ``transition`` and temperature.
    """
    logits, annotations, weights = _check_samples(logits, annotations, weights)
    bands = _check_bands(bands, annotations)
    num_classes = logits.shape[0]
    if model.band_transitions is not None:
        priors = np.asarray(model.band_transitions, dtype=np.float64)
    else:
        priors = np.repeat(np.asarray(model.transition, dtype=np.float64)[None], NUM_BANDS, axis=0)
    if priors.shape != (NUM_BANDS, num_classes, num_classes):
        raise ValueError(f"model transitions do not match {num_classes} classes")
    fitted = []
    for band in range(NUM_BANDS):
        chosen = bands == band
        if not np.any(weights[chosen] > 0):
            fitted.append(priors[band])
            continue
        fitted.append(fit_case_transition(logits[:, chosen], annotations[chosen],
                                          NoiseModel(priors[band], model.temperature), strength=strength,
                                          weights=weights[chosen]).transition)
    before = NoiseModel(model.transition, model.temperature, band_transitions=priors, band_width=width)
    after = NoiseModel(model.transition, model.temperature, band_transitions=np.stack(fitted), band_width=width)
    start = _model_mean_log_likelihood(logits, annotations, before, weights, bands)
    end = _model_mean_log_likelihood(logits, annotations, after, weights, bands)
    return dataclasses.replace(after, log_likelihood=end, trace=(start, end))


def _sample_indices(flat_annotations: np.ndarray, num_classes: int, max_voxels_per_class: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of a stratified sample (up to ``max_voxels_per_class`` per annotated class) and their weights."""
    indices, weights = [], []
    for annotated_class in range(num_classes):
        candidates = np.flatnonzero(flat_annotations == annotated_class)
        if candidates.size == 0:
            continue
        if candidates.size > max_voxels_per_class:
            chosen = np.sort(rng.choice(candidates, size=max_voxels_per_class, replace=False))
        else:
            chosen = candidates
        indices.append(chosen)
        weights.append(np.full(chosen.size, candidates.size / chosen.size))
    if not indices:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(indices), np.concatenate(weights)


def sample_voxels(logits, annotations, *, max_voxels_per_class: int, rng: np.random.Generator):
    """Stratified voxel sample for fitting the noise model, with weights that keep the estimates unbiased.

    Up to ``max_voxels_per_class`` annotated voxels are drawn per annotated class (all of them when there are
    fewer); each drawn voxel weighs ``count_of_its_class / number_drawn``. Memory stays bounded however large
    the volume is.

    Args:
        logits: ``(C, *spatial)``. annotations: ``(*spatial)``.

    Returns:
        ``(logits (C, N) float32, annotations (N,) int64, weights (N,) float64)``.
    """
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    if logits.shape[1:] != annotations.shape:
        raise ValueError(f"logits {logits.shape} do not match annotations {annotations.shape}")
    if max_voxels_per_class < 1:
        raise ValueError("max_voxels_per_class must be >= 1")
    num_classes = logits.shape[0]
    flat_annotations = annotations.reshape(-1)
    indices, weights = _sample_indices(flat_annotations, num_classes, max_voxels_per_class, rng)
    return (logits.reshape(num_classes, -1)[:, indices].astype(np.float32),
            flat_annotations[indices].astype(np.int64), weights)


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


def refine_labels(posterior_probs, annotations, *, thresholds: RefinementThresholds, ignore_label: int,
                  allow_changes: bool = True) -> np.ndarray:
    """Refined label map: confident disagreements corrected, uncertain voxels ignored, the rest kept.

    For an annotated voxel with posterior ``q`` and annotation ``a``:
    * changed to ``argmax q`` when that differs from ``a`` and ``max q >= change_threshold`` (set to
      ``ignore_label`` instead when ``allow_changes`` is False: no class is ever written that the annotator did not);
    * kept as ``a`` when ``q[a] >= keep_threshold``;
    * otherwise set to ``ignore_label`` (the next M-step does not learn from it).
    Voxels without an annotation keep their value.

    Args:
        posterior_probs: ``(C, *spatial)``. annotations: ``(*spatial)`` int.

    Returns:
        Same shape and dtype as ``annotations``.
    """
    posterior_probs = np.asarray(posterior_probs)
    annotations = np.asarray(annotations)
    num_classes = posterior_probs.shape[0]
    if ignore_label < num_classes:
        raise ValueError(f"ignore_label {ignore_label} collides with the classes 0..{num_classes - 1}")
    mask = annotated_mask(annotations, num_classes)
    best = posterior_probs.argmax(axis=0)
    best_probability = posterior_probs.max(axis=0)
    safe_annotations = np.where(mask, annotations, 0)
    annotation_probability = np.take_along_axis(posterior_probs, safe_annotations[None], axis=0)[0]
    change = mask & (best != annotations) & (best_probability >= thresholds.change_threshold)
    keep = mask & ~change & (annotation_probability >= thresholds.keep_threshold)
    refined = annotations.copy()
    refined[change] = best[change] if allow_changes else ignore_label
    refined[mask & ~change & ~keep] = ignore_label
    return refined


def _components(mask: np.ndarray):
    labelled, count = ndimage.label(mask)
    return labelled, count


def component_changes(original, refined, *, foreground_classes) -> tuple[int, int]:
    """Connected components added and removed by a refinement, summed over foreground classes.

    Added: a component of class c in ``refined`` that touches no class-c voxel of ``original``. Removed: a
    component of class c in ``original`` none of whose voxels is still class c in ``refined``.
    """
    added = removed = 0
    for label in foreground_classes:
        before = original == label
        after = refined == label
        after_components, after_count = _components(after)
        if after_count:
            touched = np.unique(after_components[before & after])
            added += after_count - int(np.count_nonzero(touched))
        before_components, before_count = _components(before)
        if before_count:
            kept = np.unique(before_components[before & after])
            removed += before_count - int(np.count_nonzero(kept))
    return added, removed


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nnU-Net's convention)."""
    denominator = int(reference.sum()) + int(prediction.sum())
    if denominator == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(reference, prediction).sum()) / denominator


def foreground_dice(annotations, prediction, *, num_classes: int) -> list[float]:
    """Dice between annotation and prediction per foreground class ``1..C-1``, on annotated voxels only."""
    mask = annotated_mask(annotations, num_classes)
    return [dice((annotations == label) & mask, (prediction == label) & mask) for label in range(1, num_classes)]


def score_case(annotations, refined, posterior_probs, prediction, *, previous=None, ignore_label: int) -> dict:
    """Per-case scores of one E-step.

    Args:
        annotations: ``(*spatial)`` original annotation. refined: ``(*spatial)`` output of ``refine_labels``.
        posterior_probs: ``(C, *spatial)``. prediction: ``(*spatial)`` the network's argmax.
        previous: ``(*spatial)`` the labels this case had before this E-step (default: the annotation).
        ignore_label: value marking voxels the next M-step ignores.

    Returns:
        A dict of plain numbers: voxel counts, ``mean_entropy`` (nats, annotated voxels), ``expected_errors``
        (``Σ 1 - q(a)``), ``dice_<c>`` between annotation and prediction per foreground class,
        ``components_added/removed`` and ``review_score`` (expected mislabelled voxels per foreground voxel of
        the union of annotation and prediction: higher means the case needs review more).
    """
    num_classes = posterior_probs.shape[0]
    mask = annotated_mask(annotations, num_classes)
    if previous is None:
        previous = annotations
    annotated_count = int(mask.sum())
    changed = mask & (refined != annotations) & (refined != ignore_label)
    ignored = mask & (refined == ignore_label)
    q = posterior_probs[:, mask]
    entropy = -np.sum(q * np.log(np.maximum(q, np.float32(1e-30))), axis=0, dtype=np.float64)
    q_of_annotation = np.take_along_axis(q, annotations[mask][None].astype(np.int64), axis=0)[0]
    expected_errors = float(np.sum(1.0 - q_of_annotation, dtype=np.float64))
    foreground_extent = int(np.count_nonzero(mask & ((annotations > 0) | (prediction > 0))))
    added, removed = component_changes(np.where(mask, annotations, 0), np.where(mask, refined, 0),
                                       foreground_classes=range(1, num_classes))
    scores = {
        "voxels_annotated": annotated_count,
        "voxels_changed": int(changed.sum()),
        "voxels_ignored": int(ignored.sum()),
        "voxels_changed_since_previous": int(np.count_nonzero(mask & (refined != previous))),
        "fraction_changed": float(changed.sum() / max(annotated_count, 1)),
        "mean_entropy": float(entropy.mean()) if annotated_count else 0.0,
        "expected_errors": expected_errors,
        "components_added": added,
        "components_removed": removed,
        "review_score": expected_errors / max(foreground_extent, 1),
    }
    for label, value in enumerate(foreground_dice(annotations, prediction, num_classes=num_classes), start=1):
        scores[f"dice_{label}"] = value
    return scores


def rank_cases(scores_by_case: dict[str, dict]) -> list[dict]:
    """Cases ordered by how much review they need (``review_score`` descending, then case id), with ``rank`` 1..n."""
    ordered = sorted(scores_by_case.items(), key=lambda item: (-item[1]["review_score"], item[0]))
    return [{"rank": rank, "case": case, **scores} for rank, (case, scores) in enumerate(ordered, start=1)]


CASE_FIT_VOXELS_PER_CLASS = 50_000  # per-case fits sample at most this many voxels per annotated class


def case_posterior(logits, annotations, model: NoiseModel, *, case_prior_strength: float | None = None,
                   seed=0) -> tuple[np.ndarray, float | None]:
    """The case's posterior ``(C, *spatial)`` under ``model`` (its boundary bands if it has them), with the case's
    own ``T`` shrunk toward it when ``case_prior_strength`` is a number (fitted on a stratified sample drawn with
    ``seed``), and that ``T``'s expected flip rate (None without a per-case fit). ``refine_case`` is this plus
    ``refine_labels`` and the scores."""
    case_flip_rate = None
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    num_classes = logits.shape[0]
    bands = None
    if model.band_transitions is not None:
        bands = boundary_bands(annotations, num_classes=num_classes, width=model.band_width)
    if case_prior_strength is not None:
        flat_annotations = annotations.reshape(-1)
        indices, weights = _sample_indices(flat_annotations, num_classes, CASE_FIT_VOXELS_PER_CLASS,
                                           np.random.default_rng(seed))
        if indices.size:
            sampled_logits = logits.reshape(num_classes, -1)[:, indices].astype(np.float32)
            sampled_annotations = flat_annotations[indices].astype(np.int64)
            sampled_bands = None if bands is None else bands.reshape(-1)[indices].astype(np.int64)
            if bands is None:
                model = fit_case_transition(sampled_logits, sampled_annotations, model, strength=case_prior_strength,
                                            weights=weights)
            else:
                model = fit_band_transitions(sampled_logits, sampled_annotations, sampled_bands, model,
                                             strength=case_prior_strength, width=model.band_width, weights=weights)
            case_flip_rate = _expected_flip_rate(sampled_logits, sampled_annotations, weights, model, sampled_bands)
    probabilities = posterior(logits, annotations, model, bands=bands)
    return probabilities, case_flip_rate


def proposal_uncertainty(posterior_probs, labels) -> np.ndarray:
    """How unsure the posterior is of the proposed labels: ``1 - q(label)`` per voxel, ``1 - max q`` where the
    label is not a class (ignore), 0 outside the image (``label < 0``).

    Args:
        posterior_probs: ``(C, *spatial)``. labels: ``(*spatial)`` the proposal.

    Returns:
        ``(*spatial)`` float32 in [0, 1].
    """
    posterior_probs = np.asarray(posterior_probs)
    labels = np.asarray(labels)
    if posterior_probs.shape[1:] != labels.shape:
        raise ValueError(f"posterior {posterior_probs.shape} does not match labels {labels.shape}")
    num_classes = posterior_probs.shape[0]
    is_class = (labels >= 0) & (labels < num_classes)
    chosen = np.take_along_axis(posterior_probs, np.where(is_class, labels, 0)[None].astype(np.int64), axis=0)[0]
    confidence = np.where(is_class, chosen, posterior_probs.max(axis=0))
    return np.where(labels < 0, 0.0, 1.0 - confidence).clip(0.0, 1.0).astype(np.float32)


def soft_label_maps(posterior_probs, refined, *, sample_where, samples: int, seed) -> np.ndarray:
    """``samples`` label maps for ``SoftTargetTrainer``: ``refined`` everywhere, except where ``sample_where`` is
    True, where each map draws the voxel's class from its posterior (the E-step's doubt becomes a target
    distribution instead of the ignore label).

    Args:
        posterior_probs: ``(C, *spatial)``. refined: ``(*spatial)`` the hard labels. sample_where: ``(*spatial)``
            bool. seed: anything ``numpy.random.default_rng`` takes.

    Returns:
        ``(samples, *spatial)`` int16.
    """
    posterior_probs = np.asarray(posterior_probs)
    refined = np.asarray(refined)
    sample_where = np.asarray(sample_where, bool)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    maps = np.repeat(refined[None].astype(np.int16), samples, axis=0)
    if sample_where.any():
        cumulative = np.cumsum(posterior_probs[:, sample_where], axis=0)
        rng = np.random.default_rng(seed)
        for k in range(samples):
            draw = (rng.random(cumulative.shape[1])[None] > cumulative).sum(axis=0)
            maps[k][sample_where] = np.minimum(draw, posterior_probs.shape[0] - 1)
    return maps


def agree_on_changes(refined, annotations, second_posterior, *, thresholds: RefinementThresholds,
                     ignore_label: int) -> np.ndarray:
    """Keep a change only where a second opinion makes the same change with the same confidence.

    A network's own errors look like annotation noise to one model; a second model that did not train on the case
    (another round's network, the same network on the mirrored image) rarely makes the same confident error. A
    voxel ``refined`` changed (a class other than its annotation) stays changed only where ``second_posterior``'s
    most probable class is that class with at least ``change_threshold``; elsewhere it becomes ``ignore_label``
    (an uncertain model opinion leads to ignore, never to a change). Kept and ignored voxels are left alone.

    Args:
        refined, annotations: ``(*spatial)``. second_posterior: ``(C, *spatial)``, the second opinion's posterior
            under the same noise model.
    """
    refined = np.asarray(refined)
    annotations = np.asarray(annotations)
    second_posterior = np.asarray(second_posterior)
    changed = annotated_mask(annotations, second_posterior.shape[0]) & (refined != annotations) & \
        (refined != ignore_label)
    agrees = (second_posterior.argmax(axis=0) == refined) & \
        (second_posterior.max(axis=0) >= thresholds.change_threshold)
    return np.where(changed & ~agrees, ignore_label, refined).astype(refined.dtype)


def refine_case(logits, annotations, model: NoiseModel, *, thresholds: RefinementThresholds, ignore_label: int,
                previous=None, apply: bool = True, allow_changes: bool = True,
                case_prior_strength: float | None = None, seed=0,
                second_opinion=None, posterior=None) -> tuple[np.ndarray, dict]:
    """Posterior, refined labels and scores of one case.

    Args:
        logits: ``(C, *spatial)``. annotations: ``(*spatial)`` the original annotation (always the original: EM
            conditions on what the annotator wrote, not on an earlier round's refinement).
        previous: ``(*spatial)`` labels of the previous round, for the convergence count (default: annotations).
        apply: False keeps the annotation unchanged (the model is not trusted yet) but still scores the case.
        allow_changes: False turns every change into the ignore label (``refine_labels``): the precision of
            changes is not established (``gate_round``).
        case_prior_strength: None uses the dataset's ``model`` for every voxel; a number fits this case's own
            transition matrix shrunk toward it (``fit_case_transition``, on a stratified sample drawn with ``seed``).
        second_opinion: ``(C, *spatial)`` logits of a second model that did not train on the case (e.g. the mirrored
            image): changes it does not confirm become ignore (``agree_on_changes``).
        posterior: this case's ``case_posterior(logits, annotations, model, case_prior_strength=..., seed=...)``
            when the caller has it already (it keeps it for the uncertainty map and soft targets): not recomputed.

    Returns:
        ``(refined (*spatial) like annotations, scores dict of score_case)``; with a per-case model the scores add
        ``case_flip_rate``, the share of the case's annotated voxels its ``T`` expects to be mislabelled.
    """
    if posterior is None:
        posterior = case_posterior(logits, annotations, model, case_prior_strength=case_prior_strength, seed=seed)
    probabilities, case_flip_rate = posterior
    if probabilities.shape != np.shape(logits):
        raise ValueError(f"posterior {probabilities.shape} does not match logits {np.shape(logits)}")
    if apply:
        refined = refine_labels(probabilities, annotations, thresholds=thresholds, ignore_label=ignore_label,
                                allow_changes=allow_changes)
        if second_opinion is not None and allow_changes:
            second, _ = case_posterior(second_opinion, annotations, model, case_prior_strength=case_prior_strength,
                                       seed=seed)
            refined = agree_on_changes(refined, annotations, second, thresholds=thresholds,
                                       ignore_label=ignore_label)
    else:
        refined = np.asarray(annotations).copy()
    prediction = np.asarray(logits).argmax(axis=0)
    scores = score_case(annotations, refined, probabilities, prediction, previous=previous,
                        ignore_label=ignore_label)
    if case_flip_rate is not None:
        scores["case_flip_rate"] = case_flip_rate
    return refined, scores


def _expected_flip_rate(logits, annotations, weights, model: NoiseModel, bands=None) -> float:
    """Weighted share of sampled voxels whose posterior puts the true class elsewhere than the annotation."""
    joint = softmax(logits, model.temperature) * _transition_columns(model, annotations, bands)
    q_of_annotation = np.take_along_axis(joint, annotations[None], axis=0)[0] / np.maximum(joint.sum(axis=0), _TINY)
    return float(np.dot(weights, 1.0 - q_of_annotation) / max(weights.sum(), _TINY))


def summarize_round(scores_by_case: dict[str, dict]) -> dict:
    """Totals over cases: voxel counts and the fractions the convergence test and the logs use."""
    totals = {key: int(sum(scores[key] for scores in scores_by_case.values()))
              for key in ("voxels_annotated", "voxels_changed", "voxels_ignored", "voxels_changed_since_previous",
                          "components_added", "components_removed")}
    annotated = max(totals["voxels_annotated"], 1)
    return {
        "cases": len(scores_by_case),
        **totals,
        "fraction_changed": totals["voxels_changed"] / annotated,
        "fraction_ignored": totals["voxels_ignored"] / annotated,
        "fraction_changed_since_previous": totals["voxels_changed_since_previous"] / annotated,
        "mean_review_score": float(np.mean([s["review_score"] for s in scores_by_case.values()]))
        if scores_by_case else 0.0,
    }


@dataclass(frozen=True)
class PrecisionEstimate:
    """How many of the E-step's changes on unchecked cases are likely right, judged from checked (verified) cases."""

    precision: float  # estimated share of right changes among the changes on unverified cases (NaN: no changes)
    lower_bound: float  # one-sided bootstrap lower bound over verified cases (false changes come in clumps)
    false_change_rate: float  # changes per annotated voxel on verified cases: every one of them is false
    verified_cases: int
    changes: int  # changes on unverified cases

    def to_dict(self) -> dict:
        return {key: (float(v) if isinstance(v, float) else v) for key, v in self.__dict__.items()}


def change_precision(verified, unverified, *, level: float = 0.95, samples: int = 2000,
                     seed: int = 0) -> PrecisionEstimate:
    """Estimated precision of the changes an E-step makes, from cases whose labels were checked.

    A verified case's annotation is right, so every change the E-step makes there is false; the rate of such
    changes per annotated voxel, applied to the unverified cases' annotated voxels, estimates how many of their
    changes are false: ``precision = 1 - rate · annotated_unverified / changes_unverified`` (clipped to [0, 1]).
    The lower bound resamples the verified cases (a case-level bootstrap), since false changes come in clumps.
    It assumes the verified cases are like the others for the network (checked at random, not chosen as easy).

    Args:
        verified: ``(V, 2)``: ``(changed voxels, annotated voxels)`` per verified case, ``V >= 1``.
        unverified: ``(U, 2)``: the same per unverified case.
    """
    verified = np.asarray(verified, dtype=np.float64).reshape(-1, 2)
    unverified = np.asarray(unverified, dtype=np.float64).reshape(-1, 2)
    if verified.shape[0] == 0 or verified[:, 1].sum() <= 0:
        raise ValueError("need at least one verified case with annotated voxels")
    changes, annotated = unverified[:, 0].sum(), unverified[:, 1].sum()

    def precision_at(rate):
        return float(np.clip(1.0 - rate * annotated / changes, 0.0, 1.0)) if changes > 0 else float("nan")

    rate = verified[:, 0].sum() / verified[:, 1].sum()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, verified.shape[0], (samples, verified.shape[0]))
    rates = verified[picks, 0].sum(axis=1) / np.maximum(verified[picks, 1].sum(axis=1), _TINY)
    lower = float(np.percentile([precision_at(r) for r in rates], (1 - level) * 100)) if changes > 0 else float("nan")
    return PrecisionEstimate(precision_at(rate), lower, float(rate), int(verified.shape[0]), int(changes))


def false_changes(annotations, refined, truth, *, ignore_label: int) -> int:
    """Voxels an E-step changed to a class other than the true one.

    Args:
        annotations, refined, truth: ``(*spatial)``; a change is an annotated voxel (``0 <= a != ignore_label``)
            whose refined label is neither its annotation nor ``ignore_label``, as ``score_case`` counts them.
    """
    annotations, refined, truth = np.asarray(annotations), np.asarray(refined), np.asarray(truth)
    if not annotations.shape == refined.shape == truth.shape:
        raise ValueError(f"shapes differ: annotations {annotations.shape}, refined {refined.shape}, "
                         f"truth {truth.shape}")
    annotated = (annotations >= 0) & (annotations != ignore_label)
    changed = annotated & (refined != annotations) & (refined != ignore_label)
    return int(np.count_nonzero(changed & (refined != truth)))


def precision_gate(counts: dict[str, tuple[int, int]], verified, *, min_precision: float,
                   seed: int = 0) -> tuple[bool, PrecisionEstimate]:
    """Whether to apply a round's refinements: the lower bound of their estimated precision (``change_precision``)
    reaches ``min_precision``. ``counts``: ``{case: (changed voxels, annotated voxels)}`` of the refinement with the
    gate open; ``verified``: the checked cases among them (at least one)."""
    verified = [case for case in verified if case in counts]
    estimate = change_precision([counts[c] for c in verified], [n for c, n in counts.items() if c not in verified],
                                seed=seed)
    return bool(estimate.lower_bound >= min_precision), estimate  # NaN (nothing to change): closed


# ------------------------------------------------------------------------------------- one E-step over many cases
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


def pseudo_label(logits, model: NoiseModel, *, thresholds: RefinementThresholds, ignore_label: int,
                 outside=None) -> np.ndarray:
    """Labels for an unannotated case: the calibrated argmax where it is confident, the ignore label elsewhere.

    Args:
        logits: ``(C, *spatial)``. outside: optional ``(*spatial)`` bool mask of voxels outside the image
            (kept as ``-1``, like nnU-Net's preprocessed segmentations).

    Returns:
        ``(*spatial)`` int16.
    """
    probabilities = softmax(logits, model.temperature)
    labels = np.where(probabilities.max(axis=0) >= thresholds.change_threshold, probabilities.argmax(axis=0),
                      ignore_label).astype(np.int16)
    if outside is not None:
        labels[outside] = -1
    return labels


def score_pseudo_label(logits, labels, model: NoiseModel, *, ignore_label: int) -> dict:
    """Scores of a pseudo-labelled case, in the same units as ``score_case`` where they exist."""
    probabilities = softmax(logits, model.temperature)
    inside = labels != -1
    q = probabilities[:, inside]
    entropy = -np.sum(q * np.log(np.maximum(q, _TINY)), axis=0)
    labelled = inside & (labels != ignore_label)
    foreground_extent = int(np.count_nonzero(inside & (probabilities.argmax(axis=0) > 0)))
    expected_errors = float(np.sum(1.0 - q.max(axis=0)))
    return {
        "voxels_annotated": 0,
        "voxels_pseudo_labelled": int(labelled.sum()),
        "voxels_ignored": int(np.count_nonzero(inside & (labels == ignore_label))),
        "mean_entropy": float(entropy.mean()) if entropy.size else 0.0,
        "expected_errors": expected_errors,
        "review_score": expected_errors / max(foreground_extent, 1),
    }


def gate_round(fit: RoundFit, cases, verified, case_arrays, *, thresholds: RefinementThresholds, ignore_label: int,
               case_prior_strength: float | None, min_change_precision: float, min_model_dice: float, seed: int,
               round_index: int, changes_without_verified_cases: bool = False,
               truth_of: Callable[[str], np.ndarray | None] | None = None) -> tuple[bool, dict]:
    """Whether the round refines at all, and whether it may change classes. The one gate every driver calls.

    The round refines when the fit is usable: the network's Dice with the annotation reaches ``min_model_dice`` (a
    floor against an untrained network, not evidence that changes are right) and the fit is not degenerate. It
    may **change** annotated classes only when their precision is established: with verified cases among
    ``cases``, every case is refined with the gate open (as ``refine_case`` would, same seeds) and
    ``precision_gate`` decides from the verified cases' changes, all of which are false. Without verified cases
    nothing can establish it: changes become the ignore label (``allow_changes=False``), so clean labels are never
    overwritten, unless ``changes_without_verified_cases`` restores the model-Dice gate for changes.
    ``case_arrays(case)`` returns that case's ``(logits (C, *spatial), original annotation (*spatial))``, and
    optionally a third element, the second opinion's logits (``refine_case``), which the counts then respect.
    ``truth_of(case)``: a verified case's true labels ``(*spatial)`` when they differ from its annotation (a
    reviewed case), else None; a change there is false only where it disagrees with them.

    Returns:
        ``(refine, gate)``: ``gate["kind"]`` is ``"model_dice"`` or ``"precision"`` (the estimate's fields), and
        ``gate["changes_allowed"]`` what drivers pass to ``refine_case(allow_changes=...)``.
    """
    verified = [case for case in verified if case in cases]
    if not verified:
        return fit.refine, {"kind": "model_dice", "model_dice": fit.model_dice, "min_model_dice": min_model_dice,
                            "changes_allowed": bool(changes_without_verified_cases)}
    counts = {}
    for case in cases:
        logits, annotations, *second = case_arrays(case)
        refined, scores = refine_case(logits, annotations, fit.model, thresholds=thresholds,
                                      ignore_label=ignore_label, case_prior_strength=case_prior_strength,
                                      seed=case_seed(seed, round_index, case),
                                      second_opinion=second[0] if second else None)
        truth = truth_of(case) if truth_of is not None and case in verified else None
        changed = scores["voxels_changed"]
        if truth is not None:  # only the changes that disagree with the reviewed labels are false
            changed = false_changes(annotations, refined, truth, ignore_label=ignore_label)
        counts[case] = (changed, scores["voxels_annotated"])
    opened, estimate = precision_gate(counts, verified, min_precision=min_change_precision, seed=seed)
    return fit.refine, {"kind": "precision", **estimate.to_dict(), "min_change_precision": min_change_precision,
                        "model_dice": fit.model_dice, "min_model_dice": min_model_dice,
                        "changes_allowed": bool(opened)}
