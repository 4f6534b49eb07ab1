"""From a fitted model to a case's labels: the posterior per case, the change/keep/ignore rule, the second
opinion, pseudo-labels, soft label maps and the uncertainty map.
"""

from __future__ import annotations

import numpy as np

from nnunetv2_em.estep.fit import _expected_flip_rate, _sample_indices, fit_band_transitions, fit_case_transition
from nnunetv2_em.estep.model import NoiseModel, RefinementThresholds, annotated_mask, boundary_bands, posterior, softmax
from nnunetv2_em.estep.scores import score_case


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
                second_opinion=None, known_posterior=None) -> tuple[np.ndarray, dict]:
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
        known_posterior: this case's ``case_posterior(logits, annotations, model, case_prior_strength=..., seed=...)``
            when the caller has it already (it keeps it for the uncertainty map and soft targets): not recomputed.

    Returns:
        ``(refined (*spatial) like annotations, scores dict of score_case)``; with a per-case model the scores add
        ``case_flip_rate``, the share of the case's annotated voxels its ``T`` expects to be mislabelled.
    """
    if known_posterior is None:
        known_posterior = case_posterior(logits, annotations, model, case_prior_strength=case_prior_strength,
                                         seed=seed)
    probabilities, case_flip_rate = known_posterior
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
