"""Several annotators per case: one noise model per rater, fitted jointly with the network's prior (Dawid-Skene with
the network as the prior over the true class; Dawid & Skene 1979, with a network prior as in Zhang et al., NeurIPS
2020, "Disentangling human error from the ground truth in segmentation of medical images").

Rater ``r`` annotates with ``T_r[true, annotated]``. Given the network's prior ``p = softmax(z / tau)`` and the
ratings of every rater who annotated a voxel, the posterior of its true class is

    q(k) ∝ p_k · Π_{r rated it} T_r[k, a_r]

and the ratings' marginal log-likelihood is ``Σ_v log Σ_k p_k Π_r T_r[k, a_r]``. Each ``T_r`` has the closed-form
EM update ``T_r[k, j] ∝ Σ_{v: a_rv = j} q_v(k)`` (the single-rater update of ``fit.update_transition`` summed over
the voxels rater ``r`` annotated); ``tau`` is searched in 1-D and kept unless strictly better. Neither step lowers
the likelihood, so alternating them is EM (``RaterModel.trace`` records it; the tests check it never decreases).

Conventions (as in ``model``): ``logits`` ``(C, *spatial)`` or ``(C, N)``; ``ratings`` ``(R, *spatial)`` or
``(R, N)``, one map per rater, values ``0..C-1`` annotated, anything else (the ignore label, ``-1``) "this rater
did not annotate this voxel" (partial coverage: a rater who did not annotate a case has it all missing);
``transitions`` ``(R, C, C)``. Pure numpy / scipy: no torch, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from nnunetv2_em.estep.model import _TINY, TEMPERATURE_BOUNDS, default_transition

_LOG_TINY = np.log(_TINY)


@dataclass(frozen=True)
class RaterModel:
    """One ``T_r[true, annotated]`` per rater, ``transitions`` ``(R, C, C)``, and the network's temperature."""

    transitions: np.ndarray
    temperature: float = 1.0
    log_likelihood: float = float("nan")  # mean per voxel rated by anyone, at these parameters
    trace: tuple[float, ...] = field(default_factory=tuple)  # mean log-likelihood after each fitting step

    def to_dict(self) -> dict:
        return {"transitions": np.asarray(self.transitions, dtype=np.float64).tolist(),
                "temperature": float(self.temperature), "log_likelihood": float(self.log_likelihood),
                "trace": [float(v) for v in self.trace]}

    @classmethod
    def from_dict(cls, data: dict) -> RaterModel:
        return cls(np.asarray(data["transitions"], dtype=np.float64), float(data["temperature"]),
                   float(data.get("log_likelihood", float("nan"))), tuple(data.get("trace", ())))


def _check_ratings(logits, ratings, weights=None, truths=None):
    """``(C, N)`` logits, ``(R, N)`` int64 ratings with -1 where not rated, ``(N,)`` weights, ``(N,)`` truths or
    None; refuses mismatched shapes, fewer than 2 classes, negative weights."""
    logits = np.asarray(logits)
    ratings = np.asarray(ratings)
    if logits.ndim < 2 or ratings.ndim != logits.ndim or ratings.shape[1:] != logits.shape[1:]:
        raise ValueError(f"expected logits (C, *spatial) and ratings (R, *spatial) over the same voxels, got "
                         f"{logits.shape} and {ratings.shape}")
    num_classes = logits.shape[0]
    if num_classes < 2 or ratings.shape[0] < 1:
        raise ValueError(f"need at least 2 classes and 1 rater, got {num_classes} and {ratings.shape[0]}")
    logits = logits.reshape(num_classes, -1)
    ratings = ratings.reshape(ratings.shape[0], -1).astype(np.int64)
    ratings = np.where((ratings >= 0) & (ratings < num_classes), ratings, -1)
    if weights is None:
        weights = np.ones(logits.shape[1])
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != (logits.shape[1],) or np.any(weights < 0):
        raise ValueError("weights must be non-negative, one per voxel")
    if truths is not None:
        truths = np.asarray(truths).reshape(-1).astype(np.int64)
        if truths.shape != (logits.shape[1],):
            raise ValueError(f"truths must have one entry per voxel, got {np.shape(truths)}")
        truths = np.where((truths >= 0) & (truths < num_classes), truths, -1)
    return logits, ratings, weights, truths


def _log_prior(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled -= scaled.max(axis=0, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=0, keepdims=True))


def _log_evidence(ratings: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """``Σ_r log T_r[k, a_rn]`` over the raters who rated voxel n, ``(C, N)`` (0 where nobody did)."""
    num_raters, num_classes = transitions.shape[0], transitions.shape[1]
    with np.errstate(divide="ignore"):
        log_tables = np.log(np.asarray(transitions, dtype=np.float64))
    evidence = np.zeros((num_classes, ratings.shape[1]))
    for rater in range(num_raters):
        rated = ratings[rater] >= 0
        evidence[:, rated] += log_tables[rater][:, ratings[rater, rated]]
    return evidence


def _log_joint(logits, ratings, transitions, temperature, truths) -> np.ndarray:
    """``log p_k + Σ_r log T_r[k, a_r]`` ``(C, N)``; a voxel with a known true class keeps only that class."""
    joint = _log_prior(logits, temperature) + _log_evidence(ratings, transitions)
    if truths is not None:
        known = np.flatnonzero(truths >= 0)
        keep = joint[truths[known], known]
        joint[:, known] = -np.inf
        joint[truths[known], known] = keep
    return joint


def _logsumexp(values: np.ndarray) -> np.ndarray:
    highest = values.max(axis=0)
    finite = np.isfinite(highest)
    safe = np.where(finite, highest, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.exp(values - safe[None]).sum(axis=0)) + safe
    return np.where(finite, total, _LOG_TINY)


def _rated(ratings: np.ndarray) -> np.ndarray:
    return np.any(ratings >= 0, axis=0)


def _mean_log_likelihood(logits, ratings, transitions, temperature, weights, truths) -> float:
    rated = _rated(ratings)
    if not rated.any():
        return 0.0
    per_voxel = np.maximum(_logsumexp(_log_joint(logits, ratings, transitions, temperature, truths)), _LOG_TINY)
    return float(np.dot(weights[rated], per_voxel[rated]) / max(weights[rated].sum(), _TINY))


def rater_log_likelihood(logits, ratings, model: RaterModel, *, weights=None, truths=None) -> float:
    """Weighted mean over voxels rated by anyone of ``log Σ_k p_k Π_r T_r[k, a_r]`` (complete-data where
    ``truths`` knows the class).

    Args:
        logits: ``(C, N)`` or ``(C, *spatial)``. ratings: ``(R, ...)`` over the same voxels. weights, truths:
        ``(N,)`` or None.
    """
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    return _mean_log_likelihood(logits, ratings, np.asarray(model.transitions, dtype=np.float64),
                                model.temperature, weights, truths)


def rater_posterior(logits, ratings, model: RaterModel, *, truths=None) -> np.ndarray:
    """Posterior of the true class given the network and every rating, ``(C, *spatial)`` float32 (in log space: a
    product over many raters underflows). Voxels nobody rated get the calibrated prior; voxels whose true class
    ``truths`` knows are one-hot."""
    shape = np.shape(logits)
    flat_logits, flat_ratings, _, flat_truths = _check_ratings(logits, ratings, None, truths)
    joint = _log_joint(flat_logits, flat_ratings, np.asarray(model.transitions, dtype=np.float64),
                       model.temperature, flat_truths)
    impossible = ~np.isfinite(joint.max(axis=0))  # ratings no true class produces: nothing to learn from them
    if impossible.any():
        joint[:, impossible] = _log_prior(flat_logits[:, impossible], model.temperature)
    joint -= joint.max(axis=0, keepdims=True)
    probs = np.exp(joint)
    probs /= probs.sum(axis=0, keepdims=True)
    return probs.astype(np.float32).reshape(shape)


def update_rater_transitions(logits, ratings, transitions, temperature: float, *, weights=None,
                             truths=None) -> np.ndarray:
    """One closed-form EM update of every ``T_r`` given the network's prior at ``temperature``:
    ``T_r[k, j] = Σ_{n: a_rn = j} w_n q_n(k) / Σ_{n rated by r} w_n q_n(k)``, ``q`` the posterior under the current
    ``transitions`` (one-hot where ``truths`` knows the class). Rows that receive no mass (a class a rater never
    met) keep their old values.

    Args:
        logits: ``(C, N)``. ratings: ``(R, N)``. transitions: ``(R, C, C)``. weights, truths: ``(N,)`` or None.
    Returns:
        ``(R, C, C)``.
    """
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    transitions = _check_transitions(transitions, ratings.shape[0], logits.shape[0])
    joint = _log_joint(logits, ratings, transitions, temperature, truths)
    joint -= joint.max(axis=0, keepdims=True)
    posterior = np.exp(joint)
    posterior /= np.maximum(posterior.sum(axis=0, keepdims=True), _TINY)
    weighted = posterior * weights[None]
    updated = transitions.copy()
    num_classes = logits.shape[0]
    for rater in range(ratings.shape[0]):
        counts = np.zeros((num_classes, num_classes))
        for annotated_class in range(num_classes):
            counts[:, annotated_class] = weighted[:, ratings[rater] == annotated_class].sum(axis=1)
        row_mass = counts.sum(axis=1, keepdims=True)
        updated[rater] = np.where(row_mass > 0, counts / np.maximum(row_mass, _TINY), transitions[rater])
    return updated


def _check_transitions(transitions, num_raters: int, num_classes: int) -> np.ndarray:
    transitions = np.asarray(transitions, dtype=np.float64)
    if transitions.shape != (num_raters, num_classes, num_classes):
        raise ValueError(f"transitions must be (R, C, C) = {(num_raters, num_classes, num_classes)}, got "
                         f"{transitions.shape}")
    if np.any(transitions < 0) or not np.allclose(transitions.sum(axis=2), 1.0, atol=1e-6):
        raise ValueError("every row of every rater's transition must be a probability distribution")
    return transitions


def fit_rater_model(logits, ratings, *, weights=None, truths=None, initial: RaterModel | None = None,
                    calibrate_temperature: bool = True, max_iterations: int = 200,
                    tolerance: float = 1e-8) -> RaterModel:
    """Every rater's ``T_r`` and the network's temperature by EM, from ``initial`` (default: each ``T_r`` the
    ``default_transition``, temperature 1); stops when an iteration gains less than ``tolerance`` per voxel.

    Args:
        logits: ``(C, N)`` (a sample of voxels, or ``(C, *spatial)``). ratings: ``(R, ...)`` over the same voxels.
        weights: ``(N,)`` or None. truths: ``(N,)`` true class where known (reviewed voxels), ``-1`` elsewhere.
    Returns:
        the fitted ``RaterModel``; its ``trace`` never decreases.
    """
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    num_raters, num_classes = ratings.shape[0], logits.shape[0]
    if initial is None:
        initial = RaterModel(np.stack([default_transition(num_classes)] * num_raters))
    transitions = _check_transitions(initial.transitions, num_raters, num_classes)
    temperature = float(initial.temperature)
    current = _mean_log_likelihood(logits, ratings, transitions, temperature, weights, truths)
    trace = [current]
    for _ in range(max_iterations):
        previous = current
        candidate = update_rater_transitions(logits, ratings, transitions, temperature, weights=weights,
                                             truths=truths)
        gained = _mean_log_likelihood(logits, ratings, candidate, temperature, weights, truths)
        if gained >= current:  # EM never loses likelihood; a rounding-level loss keeps the old matrices
            transitions, current = candidate, gained
        trace.append(current)
        if calibrate_temperature:
            temperature, current = _fit_temperature(logits, ratings, transitions, temperature, current, weights,
                                                    truths)
            trace.append(current)
        if current - previous < tolerance:
            break
    return RaterModel(transitions, temperature, current, tuple(trace))


def _fit_temperature(logits, ratings, transitions, temperature, current, weights, truths) -> tuple[float, float]:
    """The temperature maximising the likelihood for fixed ``transitions`` (bounded search on log tau); the current
    one unless the search finds a strictly better value."""

    def negative(log_temperature):
        return -_mean_log_likelihood(logits, ratings, transitions, np.exp(log_temperature), weights, truths)

    result = optimize.minimize_scalar(negative, bounds=np.log(TEMPERATURE_BOUNDS), method="bounded",
                                      options={"xatol": 1e-4})
    if -result.fun > current:
        return float(np.exp(result.x)), float(-result.fun)
    return temperature, current


def rater_reliability(model: RaterModel, class_prior) -> dict[str, np.ndarray]:
    """Per rater and class: ``sensitivity`` ``T_r[c, c]`` (the share of class-c voxels the rater calls c) and
    ``specificity`` ``P(a ≠ c | true ≠ c)`` under ``class_prior`` ``(C,)`` (e.g. the mean posterior), each
    ``(R, C)``."""
    transitions = np.asarray(model.transitions, dtype=np.float64)
    prior = np.asarray(class_prior, dtype=np.float64)
    num_classes = transitions.shape[1]
    if prior.shape != (num_classes,) or np.any(prior < 0) or prior.sum() <= 0:
        raise ValueError(f"class_prior must be ({num_classes},) non-negative, not all zero")
    prior = prior / prior.sum()
    sensitivity = np.stack([np.diag(t) for t in transitions])
    specificity = np.empty_like(sensitivity)
    for c in range(num_classes):
        others = np.arange(num_classes) != c
        mass = prior[others].sum()
        called_c = (prior[others][None] * transitions[:, others, c]).sum(axis=1)
        specificity[:, c] = 1.0 - called_c / mass if mass > 0 else np.nan
    return {"sensitivity": sensitivity, "specificity": specificity}


def rater_disagreement(ratings, *, num_classes: int) -> float:
    """Share of the voxels rated by at least two raters on which they do not all agree (0 when no voxel has two
    ratings): a case's rank for review in a multi-rater dataset.

    Args:
        ratings: ``(R, *spatial)``, ``0..C-1`` rated, anything else not rated.
    """
    ratings = np.asarray(ratings).reshape(np.shape(ratings)[0], -1)
    rated = (ratings >= 0) & (ratings < num_classes)
    several = rated.sum(axis=0) >= 2
    if not several.any():
        return 0.0
    highest = np.where(rated, ratings, -1).max(axis=0)
    lowest = np.where(rated, ratings, num_classes).min(axis=0)
    return float(np.mean(highest[several] != lowest[several]))
