"""Fitting the noise model: the closed-form transition update, the temperature search, the pooled fit, and the
per-case and per-band models shrunk toward it (each step never lowers the likelihood).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize

from nnunetv2_em.estep.model import (
    _TINY,
    NUM_BANDS,
    TEMPERATURE_BOUNDS,
    NoiseModel,
    _annotation_likelihoods,
    _check_bands,
    _check_samples,
    _check_truths,
    _mean_log_likelihood,
    _model_mean_log_likelihood,
    _transition_columns,
    default_transition,
    softmax,
)


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


def _expected_flip_rate(logits, annotations, weights, model: NoiseModel, bands=None) -> float:
    """Weighted share of sampled voxels whose posterior puts the true class elsewhere than the annotation."""
    joint = softmax(logits, model.temperature) * _transition_columns(model, annotations, bands)
    q_of_annotation = np.take_along_axis(joint, annotations[None], axis=0)[0] / np.maximum(joint.sum(axis=0), _TINY)
    return float(np.dot(weights, 1.0 - q_of_annotation) / max(weights.sum(), _TINY))
