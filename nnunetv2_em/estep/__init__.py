"""The E-step: pure array code (numpy and scipy only: no torch, no file I/O, no nnU-Net).

Stages, each a module: ``model`` (the noise model and the posterior it gives), ``fit`` (fitting it), ``round_fit``
(one round's pooled fit over many cases), ``refine`` (a case's labels from a fitted model), ``scores`` (what a
refinement did), ``gate`` (whether changes are allowed), ``constraints`` (partial and weak labels). Every driver
(``EMTrainer``, ``nnunetv2_em run``, the benchmark, ``scripts/``) goes through the front door, ``pipeline.EStep``,
which runs the stages in their one order; the stage functions are re-exported here for tests and analyses.
"""

from nnunetv2_em.estep.fit import (
    fit_band_transitions,
    fit_case_transition,
    fit_noise_model,
    fit_temperature,
    sample_voxels,
    update_transition,
)
from nnunetv2_em.estep.gate import PrecisionEstimate, change_precision, false_changes, gate_round, precision_gate
from nnunetv2_em.estep.model import (
    NUM_BANDS,
    TEMPERATURE_BOUNDS,
    NoiseModel,
    RefinementThresholds,
    annotated_mask,
    boundary_bands,
    default_transition,
    mean_log_likelihood,
    posterior,
    softmax,
)
from nnunetv2_em.estep.refine import (
    CASE_FIT_VOXELS_PER_CLASS,
    agree_on_changes,
    case_posterior,
    proposal_uncertainty,
    pseudo_label,
    refine_case,
    refine_labels,
    soft_label_maps,
)
from nnunetv2_em.estep.round_fit import (
    MAX_IGNORED_SHARE,
    CaseSample,
    RoundFit,
    case_seed,
    degenerate_fit,
    fit_round,
    sample_case,
    voxels_per_class,
)
from nnunetv2_em.estep.scores import (
    component_changes,
    dice,
    foreground_dice,
    rank_cases,
    score_case,
    score_pseudo_label,
    summarize_round,
)

__all__ = [
    "CASE_FIT_VOXELS_PER_CLASS", "MAX_IGNORED_SHARE", "NUM_BANDS", "TEMPERATURE_BOUNDS", "CaseSample", "NoiseModel",
    "PrecisionEstimate", "RefinementThresholds", "RoundFit", "agree_on_changes", "annotated_mask", "boundary_bands",
    "case_posterior", "case_seed", "change_precision", "component_changes", "default_transition", "degenerate_fit",
    "dice", "false_changes", "fit_band_transitions", "fit_case_transition", "fit_noise_model", "fit_round",
    "fit_temperature", "foreground_dice", "gate_round", "mean_log_likelihood", "posterior", "precision_gate",
    "proposal_uncertainty", "pseudo_label", "rank_cases", "refine_case", "refine_labels", "sample_case",
    "sample_voxels", "score_case", "score_pseudo_label", "soft_label_maps", "softmax", "summarize_round",
    "update_transition", "voxels_per_class",
]
