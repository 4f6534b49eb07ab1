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

The network's prior also gets a fitted per-class bias ``beta``, ``p = softmax(z / tau + beta)``: Dawid-Skene's
class marginal. Without it an uninformative network (early rounds, a small budget) is a flat prior that calls
every class equally likely, and the fit explains the raters' disagreement with whichever rater claims most
structure: on real Hippocampus labels with a good, a dilating and an eroding rater and a flat prior, the posterior
followed the dilating rater (Dice 0.81 against the truth); with ``beta`` it recovers the truth (1.00).
``beta`` maximises the marginal likelihood by L-BFGS (its gradient is ``Σ_v w_v (q_v - p_v)``), kept only when
it gains.

One ``T_r`` for all of a rater's voxels turns a systematic boundary error into strong evidence: a rater who draws
one voxel too wide is wrong on a thin ring, so their global ``T_r[background, structure]`` is tiny and every
"structure" of theirs looks near-certain, the ring included. The boundary-aware model (``fit_rater_bands``) gives
each rater one ``T_r`` per band of distance to *that rater's* boundary (``model.boundary_bands``), shrunk toward
the rater's global ``T_r`` by a Dirichlet prior: the ring then has its own, much less trusting matrix.

Conventions (as in ``model``): ``logits`` ``(C, *spatial)`` or ``(C, N)``; ``ratings`` ``(R, *spatial)`` or
``(R, N)``, one map per rater, values ``0..C-1`` annotated, anything else (the ignore label, ``-1``) "this rater
did not annotate this voxel" (partial coverage: a rater who did not annotate a case has it all missing);
``transitions`` ``(R, C, C)``; ``bands`` ``(R, *spatial)`` or ``(R, N)``, each rater's band per voxel (-1 where not
rated), ``band_transitions`` ``(R, NUM_BANDS, C, C)``. Pure numpy / scipy: no torch, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from nnunetv2_em.estep.model import _TINY, NUM_BANDS, TEMPERATURE_BOUNDS, boundary_bands, default_transition

_LOG_TINY = np.log(_TINY)
BIAS_BOUND = 20.0  # |beta| per class: a prior odds of e^40 is far past anything the ratings could overturn


@dataclass(frozen=True)
class RaterModel:
    """One ``T_r[true, annotated]`` per rater, ``transitions`` ``(R, C, C)``, and the network's temperature; a
    boundary-aware model also has ``band_transitions`` ``(R, NUM_BANDS, C, C)`` (one ``T_r`` per band of distance to
    the rater's own boundary, ``band_width`` its edge), which then replace ``transitions`` in the posterior."""

    transitions: np.ndarray
    temperature: float = 1.0
    log_likelihood: float = float("nan")  # mean per voxel rated by anyone, at these parameters
    trace: tuple[float, ...] = field(default_factory=tuple)  # the fit's objective after each step
    band_transitions: np.ndarray | None = None
    band_width: float | None = None
    class_bias: np.ndarray | None = None  # (C,) beta added to z / tau; None: zeros

    def tables(self) -> np.ndarray:
        """``(R, B, C, C)``: the band matrices, or the global ones as a single band (``B = 1``)."""
        if self.band_transitions is not None:
            return np.asarray(self.band_transitions, dtype=np.float64)
        return np.asarray(self.transitions, dtype=np.float64)[:, None]

    def to_dict(self) -> dict:
        record = {"transitions": np.asarray(self.transitions, dtype=np.float64).tolist(),
                  "temperature": float(self.temperature), "log_likelihood": float(self.log_likelihood),
                  "trace": [float(v) for v in self.trace]}
        if self.band_transitions is not None:
            record["band_transitions"] = np.asarray(self.band_transitions, dtype=np.float64).tolist()
            record["band_width"] = float(self.band_width)
        if self.class_bias is not None:
            record["class_bias"] = np.asarray(self.class_bias, dtype=np.float64).tolist()
        return record

    @classmethod
    def from_dict(cls, data: dict) -> RaterModel:
        bands, bias = data.get("band_transitions"), data.get("class_bias")
        return cls(np.asarray(data["transitions"], dtype=np.float64), float(data["temperature"]),
                   float(data.get("log_likelihood", float("nan"))), tuple(data.get("trace", ())),
                   None if bands is None else np.asarray(bands, dtype=np.float64), data.get("band_width"),
                   None if bias is None else np.asarray(bias, dtype=np.float64))


def rater_bands(ratings, *, num_classes: int, width: float, spacing=None) -> np.ndarray:
    """Every rater's boundary band per voxel (``model.boundary_bands`` of that rater's own map).

    Args:
        ratings: ``(R, *spatial)``, ``0..C-1`` rated, anything else not rated. width, spacing: as
            ``boundary_bands``.
    Returns:
        ``(R, *spatial)`` int8 in ``0..NUM_BANDS-1``, -1 where the rater did not rate.
    """
    ratings = np.asarray(ratings)
    if ratings.ndim < 2:
        raise ValueError(f"expected ratings (R, *spatial), got {ratings.shape}")
    return np.stack([boundary_bands(rating, num_classes=num_classes, width=width, spacing=spacing)
                     for rating in ratings])


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


def _check_rater_bands(bands, ratings: np.ndarray, num_bands: int) -> np.ndarray:
    """``(R, N)`` int64 band indices (0 where not rated); all zeros for a model without bands (``num_bands`` 1)."""
    if num_bands == 1:
        return np.zeros(ratings.shape, np.int64)
    if bands is None:
        raise ValueError("a boundary-aware rater model needs every rater's bands (rater_bands)")
    bands = np.asarray(bands).reshape(ratings.shape[0], -1) if np.size(bands) == ratings.size else np.asarray(bands)
    if bands.shape != ratings.shape:
        raise ValueError(f"bands must have the ratings' shape {ratings.shape}, got {np.shape(bands)}")
    rated = ratings >= 0
    if np.any(rated & ((bands < 0) | (bands >= num_bands))):
        raise ValueError(f"every rated voxel needs a band in 0..{num_bands - 1}")
    return np.where(rated, bands, 0).astype(np.int64)


def _log_prior(logits: np.ndarray, temperature: float, bias=None) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    if bias is not None:
        scaled = scaled + np.asarray(bias, dtype=np.float64).reshape(-1, 1)
    scaled -= scaled.max(axis=0, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=0, keepdims=True))


class _Observed:
    """Flat, checked inputs prepared once per fit: per rater the voxels they rated and, for each, the column
    ``band · C + rating`` of that rater's band table flattened to ``(C, B·C)``; with ``only_rated`` the voxels nobody
    rated are dropped (they add nothing to the likelihood)."""

    def __init__(self, logits, ratings, bands, weights, truths, num_bands: int, *, only_rated: bool = True):
        keep = _rated(ratings) if only_rated else np.ones(ratings.shape[1], bool)
        self.logits, self.weights = logits[:, keep], weights[keep]
        self.truths = None if truths is None else truths[keep]
        self.num_classes, self.num_bands = logits.shape[0], num_bands
        ratings, bands = ratings[:, keep], bands[:, keep]
        self.voxels = [np.flatnonzero(rating >= 0) for rating in ratings]
        self.columns = [band[voxels] * self.num_classes + rating[voxels]
                        for rating, band, voxels in zip(ratings, bands, self.voxels, strict=True)]
        self.total = max(float(self.weights.sum()), _TINY)

    def evidence(self, tables: np.ndarray) -> np.ndarray:
        """``Σ_r log T_r[b_rn][k, a_rn]`` over the raters who rated voxel n, ``(C, N)``; ``tables`` ``(R, B, C, C)``."""
        num_classes = self.num_classes
        with np.errstate(divide="ignore"):
            log_tables = np.log(np.asarray(tables, dtype=np.float64))
        evidence = np.zeros((num_classes, self.logits.shape[1]))
        for log_table, voxels, columns in zip(log_tables, self.voxels, self.columns, strict=True):
            evidence[:, voxels] += log_table.transpose(1, 0, 2).reshape(num_classes, -1)[:, columns]
        return evidence

    def joint(self, evidence, temperature: float, bias) -> np.ndarray:
        """``log p_k + evidence`` ``(C, N)``; a voxel with a known true class keeps only that class."""
        joint = _log_prior(self.logits, temperature, bias) + evidence
        if self.truths is not None:
            known = np.flatnonzero(self.truths >= 0)
            keep = joint[self.truths[known], known]
            joint[:, known] = -np.inf
            joint[self.truths[known], known] = keep
        return joint

    def mean_log_likelihood(self, evidence, temperature: float, bias) -> float:
        if self.logits.shape[1] == 0:
            return 0.0
        per_voxel = np.maximum(_logsumexp(self.joint(evidence, temperature, bias)), _LOG_TINY)
        return float(np.dot(self.weights, per_voxel) / self.total)

    def posterior(self, evidence, temperature: float, bias) -> np.ndarray:
        joint = self.joint(evidence, temperature, bias)
        joint -= joint.max(axis=0, keepdims=True)
        posterior = np.exp(joint)
        return posterior / np.maximum(posterior.sum(axis=0, keepdims=True), _TINY)

    def counts(self, posterior: np.ndarray) -> np.ndarray:
        """``counts[r, b, k, j] = Σ_{n: a_rn = j, b_rn = b} w_n q_n(k)``, ``(R, B, C, C)``: the expected
        complete-data counts every closed-form update divides."""
        num_classes, num_bands = self.num_classes, self.num_bands
        weighted = posterior * self.weights[None]
        counts = np.zeros((len(self.voxels), num_bands, num_classes, num_classes))
        for rater, (voxels, columns) in enumerate(zip(self.voxels, self.columns, strict=True)):
            for true_class in range(num_classes):
                per_column = np.bincount(columns, weights=weighted[true_class, voxels],
                                         minlength=num_bands * num_classes)
                counts[rater, :, true_class, :] = per_column.reshape(num_bands, num_classes)
        return counts


def _logsumexp(values: np.ndarray) -> np.ndarray:
    highest = values.max(axis=0)
    finite = np.isfinite(highest)
    safe = np.where(finite, highest, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.exp(values - safe[None]).sum(axis=0)) + safe
    return np.where(finite, total, _LOG_TINY)


def _rated(ratings: np.ndarray) -> np.ndarray:
    return np.any(ratings >= 0, axis=0)


def _model_inputs(logits, ratings, model: RaterModel, bands, weights=None, truths=None, *, only_rated=True):
    """The model's ``(R, B, C, C)`` tables and the checked inputs as ``_Observed``; a boundary-aware model computes
    the bands from spatial ratings when ``bands`` is None."""
    if model.band_transitions is not None and bands is None:
        if np.ndim(ratings) < 3:
            raise ValueError("a boundary-aware rater model needs spatial ratings (R, *spatial) or their bands")
        bands = rater_bands(ratings, num_classes=np.shape(logits)[0], width=model.band_width)
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    tables = model.tables()
    if tables.shape[0] != ratings.shape[0] or tables.shape[2:] != (logits.shape[0],) * 2:
        raise ValueError(f"the model has {tables.shape[0]} raters x {tables.shape[2]} classes, the inputs "
                         f"{ratings.shape[0]} x {logits.shape[0]}")
    bands = _check_rater_bands(bands, ratings, tables.shape[1])
    return tables, _Observed(logits, ratings, bands, weights, truths, tables.shape[1], only_rated=only_rated)


def rater_log_likelihood(logits, ratings, model: RaterModel, *, weights=None, truths=None, bands=None) -> float:
    """Weighted mean over voxels rated by anyone of ``log Σ_k p_k Π_r T_r[k, a_r]`` (complete-data where
    ``truths`` knows the class; ``T_r`` of the voxel's band in a boundary-aware model).

    Args:
        logits: ``(C, N)`` or ``(C, *spatial)``. ratings: ``(R, ...)`` over the same voxels. weights, truths:
        ``(N,)`` or None. bands: ``(R, ...)`` (``rater_bands``) or None.
    """
    tables, observed = _model_inputs(logits, ratings, model, bands, weights, truths)
    return observed.mean_log_likelihood(observed.evidence(tables), model.temperature, model.class_bias)


def rater_posterior(logits, ratings, model: RaterModel, *, truths=None, bands=None) -> np.ndarray:
    """Posterior of the true class given the network and every rating, ``(C, *spatial)`` float32 (in log space: a
    product over many raters underflows). Voxels nobody rated get the calibrated prior; voxels whose true class
    ``truths`` knows are one-hot. A boundary-aware model reads each rating through the ``T_r`` of its band
    (``bands`` ``(R, *spatial)``, computed from ``ratings`` when None)."""
    shape = np.shape(logits)
    tables, observed = _model_inputs(logits, ratings, model, bands, None, truths, only_rated=False)
    joint = observed.joint(observed.evidence(tables), model.temperature, model.class_bias)
    impossible = ~np.isfinite(joint.max(axis=0))  # ratings no true class produces: nothing to learn from them
    if impossible.any():
        joint[:, impossible] = _log_prior(observed.logits[:, impossible], model.temperature, model.class_bias)
    joint -= joint.max(axis=0, keepdims=True)
    probs = np.exp(joint)
    probs /= probs.sum(axis=0, keepdims=True)
    return probs.astype(np.float32).reshape(shape)


def update_rater_transitions(logits, ratings, transitions, temperature: float, *, weights=None, truths=None,
                             bias=None) -> np.ndarray:
    """One closed-form EM update of every ``T_r`` given the network's prior at ``temperature``:
    ``T_r[k, j] = Σ_{n: a_rn = j} w_n q_n(k) / Σ_{n rated by r} w_n q_n(k)``, ``q`` the posterior under the current
    ``transitions`` (one-hot where ``truths`` knows the class). Rows that receive no mass (a class a rater never
    met) keep their old values.

    Args:
        logits: ``(C, N)``. ratings: ``(R, N)``. transitions: ``(R, C, C)``. weights, truths: ``(N,)`` or None.
        bias: ``(C,)`` the prior's class bias or None.
    Returns:
        ``(R, C, C)``.
    """
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    transitions = _check_transitions(transitions, ratings.shape[0], logits.shape[0])
    observed = _Observed(logits, ratings, np.zeros(ratings.shape, np.int64), weights, truths, 1)
    return _updated_tables(observed, transitions[:, None], temperature, bias)[:, 0]


def _updated_tables(observed: _Observed, tables, temperature, bias, prior_weight=0.0) -> np.ndarray:
    """The closed-form (MAP-)EM update of ``(R, B, C, C)`` tables: expected counts plus the Dirichlet prior's
    pseudo-counts, rows normalised; a row with no mass keeps its values."""
    posterior = observed.posterior(observed.evidence(tables), temperature, bias)
    counts = observed.counts(posterior) + prior_weight
    row_mass = counts.sum(axis=-1, keepdims=True)
    return np.where(row_mass > 0, counts / np.maximum(row_mass, _TINY), tables)


def _check_transitions(transitions, num_raters: int, num_classes: int) -> np.ndarray:
    transitions = np.asarray(transitions, dtype=np.float64)
    if transitions.shape != (num_raters, num_classes, num_classes):
        raise ValueError(f"transitions must be (R, C, C) = {(num_raters, num_classes, num_classes)}, got "
                         f"{transitions.shape}")
    if np.any(transitions < 0) or not np.allclose(transitions.sum(axis=2), 1.0, atol=1e-6):
        raise ValueError("every row of every rater's transition must be a probability distribution")
    return transitions


def fit_rater_model(logits, ratings, *, weights=None, truths=None, initial: RaterModel | None = None,
                    calibrate_temperature: bool = True, fit_class_bias: bool = True, max_iterations: int = 200,
                    tolerance: float = 1e-8) -> RaterModel:
    """Every rater's ``T_r``, the network's temperature and its class bias by EM, from ``initial`` (default: each
    ``T_r`` the ``default_transition``, temperature 1, no bias); stops when an iteration gains less than
    ``tolerance`` per voxel.

    Args:
        logits: ``(C, N)`` (a sample of voxels, or ``(C, *spatial)``). ratings: ``(R, ...)`` over the same voxels.
        weights: ``(N,)`` or None. truths: ``(N,)`` true class where known (reviewed voxels), ``-1`` elsewhere.
        fit_class_bias: fit ``beta`` (Dawid-Skene's class marginal); off: the network's prior as it is.
    Returns:
        the fitted ``RaterModel`` (global matrices); its ``trace`` never decreases.
    """
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    num_raters, num_classes = ratings.shape[0], logits.shape[0]
    if initial is None:
        initial = RaterModel(np.stack([default_transition(num_classes)] * num_raters))
    transitions = _check_transitions(initial.transitions, num_raters, num_classes)
    temperature = float(initial.temperature)
    bias = np.zeros(num_classes) if initial.class_bias is None else np.asarray(initial.class_bias, dtype=np.float64)
    observed = _Observed(logits, ratings, np.zeros(ratings.shape, np.int64), weights, truths, 1)
    evidence = observed.evidence(transitions[:, None])
    current = observed.mean_log_likelihood(evidence, temperature, bias)
    trace = [current]
    for _ in range(max_iterations):
        previous = current
        candidate = _updated_tables(observed, transitions[:, None], temperature, bias)[:, 0]
        candidate_evidence = observed.evidence(candidate[:, None])
        gained = observed.mean_log_likelihood(candidate_evidence, temperature, bias)
        if gained >= current:  # EM never loses likelihood; a rounding-level loss keeps the old matrices
            transitions, evidence, current = candidate, candidate_evidence, gained
        trace.append(current)
        if calibrate_temperature:
            temperature, current = _fit_temperature(
                lambda tau, fixed=evidence, at_bias=bias: observed.mean_log_likelihood(fixed, tau, at_bias),
                temperature, current)
            trace.append(current)
        if fit_class_bias:
            bias, current = _fit_class_bias(observed, evidence, temperature, bias, current)
            trace.append(current)
        if current - previous < tolerance:
            break
    return RaterModel(transitions, temperature, current, tuple(trace),
                      class_bias=bias if fit_class_bias or initial.class_bias is not None else None)


def _fit_class_bias(observed: _Observed, evidence, temperature: float, bias, current: float):
    """The class bias maximising the mean marginal log-likelihood for fixed matrices and temperature (L-BFGS; the
    gradient is the weighted mean of ``q - p`` over rated voxels, Fisher's identity), centred to sum 0 (only
    differences matter); the current one unless the search finds a strictly better value."""
    if observed.logits.shape[1] == 0:
        return bias, current

    def negative(candidate):
        joint = observed.joint(evidence, temperature, candidate)
        value = np.dot(observed.weights, np.maximum(_logsumexp(joint), _LOG_TINY)) / observed.total
        joint -= joint.max(axis=0, keepdims=True)
        posterior = np.exp(joint)
        posterior /= np.maximum(posterior.sum(axis=0, keepdims=True), _TINY)
        prior = np.exp(_log_prior(observed.logits, temperature, candidate))
        return -value, -((posterior - prior) @ observed.weights) / observed.total

    result = optimize.minimize(negative, bias, jac=True, method="L-BFGS-B",
                               bounds=[(-BIAS_BOUND, BIAS_BOUND)] * bias.size)
    candidate = result.x - result.x.mean()
    value = observed.mean_log_likelihood(evidence, temperature, candidate)
    if value > current:
        return candidate, value
    return bias, current


def _fit_temperature(likelihood, temperature: float, current: float) -> tuple[float, float]:
    """The temperature maximising ``likelihood(tau)`` (bounded search on log tau); the current one unless the search
    finds a strictly better value."""
    result = optimize.minimize_scalar(lambda log_tau: -likelihood(np.exp(log_tau)), bounds=np.log(TEMPERATURE_BOUNDS),
                                      method="bounded", options={"xatol": 1e-4})
    if -result.fun > current:
        return float(np.exp(result.x)), float(-result.fun)
    return temperature, current


def fit_rater_bands(logits, ratings, bands, model: RaterModel, *, strength: float, width: float, weights=None,
                    truths=None, max_iterations: int = 50, tolerance: float = 1e-7) -> RaterModel:
    """Every rater's ``T_r`` per boundary band, MAP-estimated jointly under Dirichlet priors centred on the rater's
    global ``T_r`` (``model.transitions``), at ``model``'s temperature and class bias.

    Row ``k`` of band ``b`` of rater ``r`` has the prior ``Dirichlet(strength · T_r[k] + 1)``, so the EM update is

        T_rb[k, j] = (Σ_{n: a_rn = j, b_rn = b} w_n q_n(k) + strength · T_r[k, j]) / (Σ_{n: b_rn = b} w_n q_n(k)
                     + strength)

    with ``q_n`` the posterior under the current band matrices of every rater (the raters are coupled through it, so
    the bands are fitted together, not one by one). Starting at the prior's mode, each update never lowers the
    log-likelihood plus log-prior (``trace``, per unit weight). ``strength`` is in voxels: a band row with much more
    posterior mass follows its own voxels, a rare one stays near the rater's global row.

    Args:
        logits: ``(C, N)``. ratings: ``(R, N)``. bands: ``(R, N)`` each rater's band (``rater_bands``, -1 where not
            rated). weights, truths: ``(N,)`` or None. width: the bands' edge (recorded).
    Returns:
        ``model`` with ``band_transitions`` ``(R, NUM_BANDS, C, C)`` and ``band_width``; ``log_likelihood`` is the
        mean log-likelihood without the prior.
    """
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    logits, ratings, weights, truths = _check_ratings(logits, ratings, weights, truths)
    prior = _check_transitions(model.transitions, ratings.shape[0], logits.shape[0])
    observed = _Observed(logits, ratings, _check_rater_bands(bands, ratings, NUM_BANDS), weights, truths, NUM_BANDS)
    temperature, bias = float(model.temperature), model.class_bias
    prior_weight = (strength * prior)[:, None]

    def objective(tables):
        log_prior = float(np.sum(prior_weight * np.log(np.maximum(tables, _TINY))))
        return observed.mean_log_likelihood(observed.evidence(tables), temperature, bias) + log_prior / observed.total

    tables = np.repeat(prior[:, None], NUM_BANDS, axis=1)
    trace = [objective(tables)]
    for _ in range(max_iterations):
        candidate = _updated_tables(observed, tables, temperature, bias, prior_weight)
        value = objective(candidate)
        if value < trace[-1]:  # MAP-EM never loses; a rounding-level loss keeps the current matrices
            break
        tables = candidate
        trace.append(value)
        if trace[-1] - trace[-2] < tolerance:
            break
    likelihood = observed.mean_log_likelihood(observed.evidence(tables), temperature, bias)
    return RaterModel(prior, temperature, likelihood, tuple(trace), tables, float(width), model.class_bias)


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


def disagreement_map(ratings, *, num_classes: int) -> np.ndarray:
    """Where the raters disagree: ``(*spatial)`` bool, True on voxels that two or more raters annotated and not all
    with the same class.

    Args:
        ratings: ``(R, *spatial)``, ``0..C-1`` rated, anything else not rated.
    """
    ratings = np.asarray(ratings)
    rated = (ratings >= 0) & (ratings < num_classes)
    several = rated.sum(axis=0) >= 2
    highest = np.where(rated, ratings, -1).max(axis=0)
    lowest = np.where(rated, ratings, num_classes).min(axis=0)
    return several & (highest != lowest)


def rater_disagreement(ratings, *, num_classes: int) -> float:
    """Share of the voxels rated by at least two raters on which they do not all agree (0 when no voxel has two
    ratings): a case's rank for review in a multi-rater dataset.

    Args:
        ratings: ``(R, *spatial)``, ``0..C-1`` rated, anything else not rated.
    """
    ratings = np.asarray(ratings)
    rated = (ratings >= 0) & (ratings < num_classes)
    several = rated.sum(axis=0) >= 2
    if not several.any():
        return 0.0
    return float(disagreement_map(ratings, num_classes=num_classes)[several].mean())
