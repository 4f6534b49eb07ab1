"""The E-step's front door: one round's fit and one case's labels, in the one order every driver runs them.

A driver (``EMTrainer``, ``nnunetv2_em run``, the benchmark, ``scripts/``) implements ``CaseInputs`` over its own
files and calls::

    step = EStep(EStepOptions.from_settings(settings), inputs, num_classes=C, ignore_label=I, round_index=r)
    decision = step.fit(cases, verified=verified)   # the round's noise model and gate, a plain record
    result = step.case(case, decision)               # one case's labels, scores, uncertainty, soft label maps
    summary = step.summary({case: result.scores})    # the round's numbers

Arrays in, arrays and plain records out: no files, no torch, no nnU-Net. ``RoundDecision.to_dict`` /
``from_dict`` carry a round's decision between processes (``run`` fits once, then refines each case in a task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from nnunetv2_em.estep.constraints import (
    CaseConstraints,
    constrained_labels,
    fit_sample,
    proposal_posterior,
    refine_labelled_case,
    weak_case_kind,
)
from nnunetv2_em.estep.gate import gate_round
from nnunetv2_em.estep.model import NoiseModel, RefinementThresholds, annotated_mask, default_transition
from nnunetv2_em.estep.raters import (
    RaterModel,
    fit_rater_bands,
    fit_rater_model,
    rater_bands,
    rater_disagreement,
    rater_posterior,
)
from nnunetv2_em.estep.refine import proposal_uncertainty, pseudo_label, soft_label_maps
from nnunetv2_em.estep.round_fit import RoundFit, case_seed, fit_round, voxels_per_class
from nnunetv2_em.estep.scores import rank_cases, score_pseudo_label, summarize_round


@dataclass(frozen=True)
class EStepOptions:
    """Everything the E-step reads from the ``em`` settings; ``from_settings`` is the one place that maps them."""

    thresholds: RefinementThresholds
    calibrate_temperature: bool = True
    fit_iterations: int = 30
    fit_sample_voxels: int = 100_000
    min_model_dice: float = 0.5
    max_ignored_share: float = 0.25
    band_width: float | None = None  # boundary-aware models: the band width, else None
    band_prior_strength: float = 100.0
    rater_band_width: float | None = 2.0  # several raters: each rater's T per boundary band, else one T per rater
    per_case_prior_strength: float | None = None  # per-case models: prior strength toward the round's T, else None
    min_change_precision: float = 0.8
    changes_without_verified_cases: bool = False
    weak_mode: str = "map"
    weak_samples: int = 16
    weak_agreement: float = 0.8
    second_opinion: bool = False  # a change needs the mirrored image's logits to confirm it
    soft_targets: int = 0  # label maps sampled from the posterior per case (0: none)
    tolerance: float = 0.001
    seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> EStepOptions:
        """From ``nnunetv2_em.settings.EMSettings`` (validated there)."""
        return cls(thresholds=settings.thresholds, calibrate_temperature=settings.calibrate_temperature,
                   fit_iterations=settings.fit_iterations, fit_sample_voxels=settings.fit_sample_voxels,
                   min_model_dice=settings.min_model_dice, max_ignored_share=settings.max_ignored_share,
                   band_width=settings.band_width, band_prior_strength=settings.case_prior_strength,
                   rater_band_width=settings.rater_band_width,
                   per_case_prior_strength=settings.per_case_prior_strength,
                   min_change_precision=settings.min_change_precision,
                   changes_without_verified_cases=settings.changes_without_verified_cases,
                   weak_mode=settings.weak_mode, weak_samples=settings.weak_samples,
                   weak_agreement=settings.weak_agreement, second_opinion=settings.second_opinion == "mirror",
                   soft_targets=settings.soft_targets, tolerance=settings.tolerance, seed=settings.seed)


class CaseInputs(Protocol):
    """What the E-step reads per case; each driver implements it over its own files. Arrays are in the space the
    network predicts in (nnU-Net's preprocessed array), ``(*spatial)`` matching the logits' ``(C, *spatial)``."""

    def logits(self, case: str) -> np.ndarray:
        """``(C, *spatial)`` float32: the out-of-fold network's logits."""

    def annotation(self, case: str) -> np.ndarray:
        """``(*spatial)`` int: the original annotation (-1 outside the image; a pseudo-labelled case: 0 inside)."""

    def previous(self, case: str) -> np.ndarray | None:
        """``(*spatial)`` the case's labels of the previous round (None: its annotation)."""

    def constraints(self, case: str) -> CaseConstraints | None:
        """The case's weak labels in the array's voxels, or None."""

    def truth(self, case: str) -> np.ndarray | None:
        """``(*spatial)`` a reviewed case's labels (complete data for the fit, the truth for the gate), or None."""

    def second_opinion(self, case: str) -> np.ndarray | None:
        """``(C, *spatial)`` logits of the mirrored image, mirrored back (read only with ``second_opinion``)."""

    def ratings(self, case: str) -> np.ndarray | None:
        """``(R, *spatial)`` every rater's label of a multi-rater dataset (-1 where a rater did not annotate), or
        None (one annotation per case)."""


@dataclass(frozen=True)
class ArrayCaseInputs:
    """``CaseInputs`` from functions of the case name (scripts, benchmarks, tests); an omitted one gives None."""

    logits_of: Callable[[str], np.ndarray]
    annotation_of: Callable[[str], np.ndarray]
    previous_of: Callable[[str], np.ndarray | None] | None = None
    constraints_of: Callable[[str], CaseConstraints | None] | None = None
    truth_of: Callable[[str], np.ndarray | None] | None = None
    second_opinion_of: Callable[[str], np.ndarray | None] | None = None
    ratings_of: Callable[[str], np.ndarray | None] | None = None

    def logits(self, case: str) -> np.ndarray:
        return np.asarray(self.logits_of(case), dtype=np.float32)

    def annotation(self, case: str) -> np.ndarray:
        return np.asarray(self.annotation_of(case))

    def previous(self, case: str) -> np.ndarray | None:
        return None if self.previous_of is None else self.previous_of(case)

    def constraints(self, case: str) -> CaseConstraints | None:
        return None if self.constraints_of is None else self.constraints_of(case)

    def truth(self, case: str) -> np.ndarray | None:
        return None if self.truth_of is None else self.truth_of(case)

    def second_opinion(self, case: str) -> np.ndarray | None:
        return None if self.second_opinion_of is None else self.second_opinion_of(case)

    def ratings(self, case: str) -> np.ndarray | None:
        return None if self.ratings_of is None else self.ratings_of(case)


@dataclass(frozen=True)
class RoundDecision:
    """The round's fit and gate: what every case of the round is refined with."""

    model: NoiseModel
    model_dice: float
    refine: bool  # the fit is usable: refine the labels at all
    refused: str | None  # why a usable-looking fit was not applied (degenerate), else None
    gate: dict  # gate_round's record; gate["changes_allowed"]: may annotated classes change
    verified: tuple[str, ...]  # the round's verified cases: judged for the gate, never refined
    raters: RaterModel | None = None  # a multi-rater dataset: every rater's noise model; None: one annotation

    @property
    def changes_allowed(self) -> bool:
        return bool(self.gate.get("changes_allowed", True))

    def applies_to(self, case: str) -> bool:
        """Whether ``case``'s labels may move at all this round (verified cases keep theirs)."""
        return self.refine and case not in self.verified

    def to_dict(self) -> dict:
        record = {"noise_model": self.model.to_dict(), "model_dice": self.model_dice, "refine": self.refine,
                  "refused": self.refused, "gate": self.gate, "verified": list(self.verified)}
        if self.raters is not None:
            record["raters"] = self.raters.to_dict()
        return record

    @classmethod
    def from_dict(cls, record: dict) -> RoundDecision:
        raters = record.get("raters")
        return cls(NoiseModel.from_dict(record["noise_model"]), float(record["model_dice"]), bool(record["refine"]),
                   record.get("refused"), dict(record["gate"]), tuple(record.get("verified", ())),
                   None if raters is None else RaterModel.from_dict(raters))

    def notes(self) -> list[str]:
        """What a driver tells its user about the decision (one line each)."""
        notes = []
        if self.refused:
            notes.append(f"labels kept as they are: {self.refused}")
        if self.verified:
            notes.append(f"estimated precision of the changes {self.gate['precision']:.3f} (lower bound "
                         f"{self.gate['lower_bound']:.3f}, {len(self.verified)} verified cases)")
        if self.refine and not self.changes_allowed:
            why = "below em.min_change_precision" if self.verified else "no verified cases"
            notes.append(f"changes become the ignore label: their precision is not established ({why})")
        return notes


@dataclass(frozen=True)
class CaseResult:
    """One case's E-step: its labels ``(*spatial)`` (integers; the ignore label where in doubt, -1 outside the
    image), its scores (``score_case`` / ``score_pseudo_label``, with ``weak_labels`` for a constrained case), the
    uncertainty of its proposal ``(*spatial)``, and ``soft_targets`` label maps ``(K, *spatial)`` or None."""

    labels: np.ndarray
    scores: dict
    uncertainty: np.ndarray
    soft_maps: np.ndarray | None
    applied: bool  # the labels could move (the round refines and the case is not verified)


class EStep:
    """One round of the E-step over a driver's ``CaseInputs``."""

    def __init__(self, options: EStepOptions, inputs: CaseInputs, *, num_classes: int, ignore_label: int,
                 round_index: int):
        if num_classes < 2:
            raise ValueError(f"num_classes {num_classes}: need background and at least one class")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is one of the {num_classes} classes")
        self.options = options
        self.inputs = inputs
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.round_index = round_index

    def _seed(self, case: str) -> list[int]:
        return case_seed(self.options.seed, self.round_index, case)

    def _second_opinion(self, case: str) -> np.ndarray | None:
        return self.inputs.second_opinion(case) if self.options.second_opinion else None

    def fit(self, cases: list[str], *, verified=()) -> RoundDecision:
        """The round's noise model from the labelled ``cases`` (a stratified sample of each, at most
        ``fit_sample_voxels`` voxels in all), the refine/degenerate decision, and the gate (``gate_round``) from
        the ``verified`` cases among them."""
        if not cases:
            raise ValueError("no cases to fit the noise model on")
        options = self.options
        cap = voxels_per_class(options.fit_sample_voxels, num_cases=len(cases), num_classes=self.num_classes)
        samples = [fit_sample(self.inputs.logits(case), self.inputs.annotation(case), self.inputs.constraints(case),
                              max_voxels_per_class=cap, band_width=options.band_width, seed=self._seed(case),
                              truth=self.inputs.truth(case)) for case in cases]
        fit: RoundFit = fit_round(samples, calibrate_temperature=options.calibrate_temperature,
                                  max_iterations=options.fit_iterations, min_model_dice=options.min_model_dice,
                                  thresholds=options.thresholds, max_ignored_share=options.max_ignored_share,
                                  band_width=options.band_width, band_prior_strength=options.band_prior_strength)
        del samples
        verified = sorted({case for case in verified if case in cases})

        def case_arrays(case):
            second = self._second_opinion(case)
            arrays = (self.inputs.logits(case), self.inputs.annotation(case))
            return arrays if second is None else (*arrays, second)

        refine, gate = gate_round(
            fit, cases, verified, case_arrays, thresholds=options.thresholds, ignore_label=self.ignore_label,
            case_prior_strength=options.per_case_prior_strength, min_change_precision=options.min_change_precision,
            min_model_dice=options.min_model_dice, seed=options.seed, round_index=self.round_index,
            changes_without_verified_cases=options.changes_without_verified_cases, truth_of=self.inputs.truth)
        return RoundDecision(fit.model, fit.model_dice, refine, fit.refused, gate, tuple(verified),
                             self._fit_raters(cases, fit.model))

    def _fit_raters(self, cases: list[str], model: NoiseModel) -> RaterModel | None:
        """Every rater's ``T_r`` and the prior's class bias (``raters.fit_rater_model``), then per boundary band
        (``raters.fit_rater_bands``) unless ``rater_band_width`` is None, from the voxels anyone rated, at most
        ``fit_sample_voxels`` in all (an even share per rated case, drawn with the case's seed), starting from the
        round's temperature; None when no case has ratings."""
        rated = [(case, ratings) for case in cases if (ratings := self.inputs.ratings(case)) is not None]
        if not rated:
            return None
        if len({np.shape(ratings)[0] for _, ratings in rated}) != 1:
            raise ValueError("every case's ratings must have the same number of raters (-1 where one did not rate)")
        width = self.options.rater_band_width
        per_case = max(1, self.options.fit_sample_voxels // len(rated))
        logits, sampled, bands, truths = [], [], [], []
        for case, ratings in rated:
            case_logits = self.inputs.logits(case).reshape(self.num_classes, -1)
            case_bands = None if width is None else rater_bands(ratings, num_classes=self.num_classes, width=width)
            ratings = np.asarray(ratings).reshape(ratings.shape[0], -1)
            candidates = np.flatnonzero(np.any((ratings >= 0) & (ratings < self.num_classes), axis=0))
            if candidates.size > per_case:
                candidates = np.sort(np.random.default_rng(self._seed(case)).choice(candidates, per_case,
                                                                                  replace=False))
            truth = self.inputs.truth(case)
            logits.append(case_logits[:, candidates])
            sampled.append(ratings[:, candidates])
            if case_bands is not None:
                bands.append(case_bands.reshape(ratings.shape[0], -1)[:, candidates])
            truths.append(np.full(candidates.size, -1) if truth is None else np.asarray(truth).reshape(-1)[candidates])
        logits, sampled, truths = (np.concatenate(logits, axis=1), np.concatenate(sampled, axis=1),
                                   np.concatenate(truths))
        start = RaterModel(np.stack([default_transition(self.num_classes)] * sampled.shape[0]), model.temperature)
        fitted = fit_rater_model(logits, sampled, truths=truths, initial=start,
                                 calibrate_temperature=self.options.calibrate_temperature,
                                 max_iterations=self.options.fit_iterations)
        if width is None:
            return fitted
        return fit_rater_bands(logits, sampled, np.concatenate(bands, axis=1), fitted,
                               strength=self.options.band_prior_strength, width=width, truths=truths)

    def case(self, case: str, decision: RoundDecision, *, pseudo: bool = False) -> CaseResult:
        """One case's labels under ``decision``: a labelled case is refined (changes where allowed, the ignore
        label where in doubt, its annotation elsewhere), an unlabeled case (``pseudo``) pseudo-labelled."""
        options = self.options
        logits = self.inputs.logits(case)
        annotations = self.inputs.annotation(case)
        weak = self.inputs.constraints(case)
        seed = self._seed(case)
        ratings = None if pseudo or weak is not None or decision.raters is None else self.inputs.ratings(case)
        if ratings is not None:  # every rater's observation with their own noise model, the network as the prior
            proposal = (rater_posterior(logits, ratings, decision.raters, truths=self.inputs.truth(case)), None)
        else:
            proposal = proposal_posterior(logits, annotations, decision.model, weak, pseudo=pseudo,
                                          case_prior_strength=options.per_case_prior_strength, seed=seed)
        weak_report = None
        applied = not pseudo and decision.applies_to(case)
        if pseudo:
            if weak is None:
                labels = pseudo_label(logits, decision.model, thresholds=options.thresholds,
                                      ignore_label=self.ignore_label, outside=annotations < 0)
            else:  # a weak-only case: its tags constrain the pseudo-label
                labels, weak_report = constrained_labels(
                    logits, annotations, decision.model, weak, thresholds=options.thresholds,
                    ignore_label=self.ignore_label, mode=options.weak_mode, samples=options.weak_samples,
                    agreement=options.weak_agreement, seed=seed)
            scores = score_pseudo_label(logits, labels, decision.model, ignore_label=self.ignore_label)
            if weak_report is not None:
                scores = {**scores, "weak_labels": {"kind": weak_case_kind(weak), **weak_report}}
        else:
            labels, scores = refine_labelled_case(
                logits, annotations, decision.model, weak, thresholds=options.thresholds,
                ignore_label=self.ignore_label, previous=self.inputs.previous(case), apply=applied,
                allow_changes=decision.changes_allowed, case_prior_strength=options.per_case_prior_strength,
                mode=options.weak_mode, samples=options.weak_samples, agreement=options.weak_agreement, seed=seed,
                second_opinion=self._second_opinion(case), known_posterior=proposal)
            if ratings is not None:
                rated = (ratings >= 0) & (ratings < self.num_classes)
                scores = {**scores, "raters": int(np.sum(np.any(rated, axis=tuple(range(1, ratings.ndim))))),
                          "rater_disagreement": rater_disagreement(ratings, num_classes=self.num_classes)}
        soft_maps = None
        if options.soft_targets:
            soft_maps = self._soft_maps(proposal[0], annotations, labels, seed,
                                        sample_ignored=pseudo or weak is not None,
                                        changes_allowed=applied and decision.changes_allowed)
        return CaseResult(labels, scores, proposal_uncertainty(proposal[0], labels), soft_maps, applied)

    def _soft_maps(self, q, annotations, labels, seed, *, sample_ignored: bool, changes_allowed: bool):
        """Label maps sampled from the posterior ``q`` where the E-step was in doubt (the changed or ignored
        voxels of a labelled case, only where changes are allowed; the ignored voxels of a pseudo-labelled or
        constrained case), the hard labels elsewhere."""
        if sample_ignored:
            sample_where = (labels != -1) & (labels == self.ignore_label)
        else:
            sample_where = (labels != annotations) & annotated_mask(annotations, q.shape[0]) & changes_allowed
        return soft_label_maps(q, labels, sample_where=sample_where, samples=self.options.soft_targets,
                               seed=[*seed, 1])

    def summary(self, scores_by_case: dict[str, dict], *, refine: bool) -> dict:
        """The round's numbers over the refined cases' scores, and whether EM converged (the round refined and
        fewer than ``tolerance`` of the annotated voxels differ from the previous round)."""
        summary = summarize_round(scores_by_case)
        summary["converged"] = bool(refine and summary["fraction_changed_since_previous"] < self.options.tolerance)
        return summary

    @staticmethod
    def ranking(scores_by_case: dict[str, dict]) -> list[dict]:
        """The review list: cases by review score, most in need of a look first."""
        return rank_cases(scores_by_case)
