"""Whether the round may change classes: the changes' precision estimated from verified cases, and the gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nnunetv2_em.estep.model import _TINY, RefinementThresholds
from nnunetv2_em.estep.refine import refine_case
from nnunetv2_em.estep.round_fit import RoundFit, case_seed


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
