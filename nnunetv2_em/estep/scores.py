"""What a refinement did to a case, in numbers: Dice, changes, entropy, the review score, the round's summary.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunetv2_em.estep.model import _TINY, NoiseModel, annotated_mask, softmax


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
