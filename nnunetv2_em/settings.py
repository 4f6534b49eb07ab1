"""Settings of the EM loop: defaults, the plans' ``em`` block, trainer-variant overrides, and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.estep import MAX_IGNORED_SHARE, RefinementThresholds

PLANS_KEY = "em"
NOISE_MODELS = ("global", "per_case", "boundary", "boundary_per_case")
SETTINGS_VERSION = 1


@dataclass(frozen=True)
class EMSettings:
    """Everything the EM loop needs to know. Stored in the plans as ``plans["em"]``.

    The default budget (5 rounds x 200 epochs) equals vanilla nnU-Net's 1000 epochs.
    """

    rounds: int = 5
    epochs_per_round: int = 200
    change_threshold: float = 0.9  # posterior needed to overwrite an annotation
    keep_threshold: float = 0.5  # posterior of the annotation below which (and no change) a voxel is ignored
    tolerance: float = 0.001  # stop when less than this fraction of annotated voxels changed since last round
    min_model_dice: float = 0.5  # without verified cases: refine once the network agrees this well with the annotation
    min_change_precision: float = 0.8  # with verified cases: refine once the changes' precision bound reaches this
    # without verified cases nothing establishes that changes are right: they become ignore unless this is true
    changes_without_verified_cases: bool = False
    max_ignored_share: float = MAX_IGNORED_SHARE  # a fit that would ignore more annotated voxels is not applied
    calibrate_temperature: bool = True
    fit_iterations: int = 30  # max (temperature, transition) update pairs per E-step
    fit_sample_voxels: int = 100_000  # voxels sampled over all cases to fit the noise model: bounds memory
    mirroring: bool = True  # test-time mirroring in the E-step's sliding-window prediction
    seed: int = 0
    # "global": one T for the dataset; "per_case": each case's T shrunk toward it; "boundary": one T per band of
    # distance to the annotated boundary; "boundary_per_case": each case's band Ts shrunk toward the dataset's
    noise_model: str = "per_case"  # won the real-data table (scripts/results/noise_models.md)
    case_prior_strength: float = 100.0  # Dirichlet prior strength (voxels) toward the dataset's T (and band Ts)
    boundary_band_width: float = 2.0  # boundary models: voxels from the annotated boundary that count as "near"
    # several raters per case (em_raters.json): "boundary" (each rater one T per band of distance to their own
    # boundary, shrunk toward their global T by case_prior_strength) or "global" (one T per rater)
    rater_noise_model: str = "boundary"
    # weak and partial labels (em_weak_labels.json): "map" (constrained argmax) or "sample" (agreement of samples)
    weak_mode: str = "map"
    weak_samples: int = 16  # sample mode: label maps drawn per case
    weak_agreement: float = 0.8  # sample mode: share of the maps that must agree, else ignore
    # `nnunetv2_em run`: also stage this many label maps sampled from the posterior per case (soft_targets/), the
    # targets of -tr SoftTargetTrainer; 0: none
    soft_targets: int = 0
    # `nnunetv2_em run`: "mirror" keeps a change only where the same out-of-fold network, on the mirrored image,
    # confirms it (estep.agree_on_changes; measured in scripts/results/second_opinion.md); "none": no second opinion
    second_opinion: str = "none"
    # where the trainings centre patches not forced to hold foreground (nnunetv2_em.sampling): "nnunet" (on annotated
    # voxels once the dataset declares an ignore label, as nnU-Net does) or "uniform" (as vanilla nnU-Net on the
    # dataset without EM's ignore label)
    patch_sampling: str = "nnunet"

    @property
    def thresholds(self) -> RefinementThresholds:
        return RefinementThresholds(self.change_threshold, self.keep_threshold)

    @property
    def per_case_prior_strength(self) -> float | None:
        """``case_prior_strength`` where the noise model is per case (``EStepOptions.per_case_prior_strength``),
        None for the dataset-wide model."""
        return self.case_prior_strength if self.noise_model in ("per_case", "boundary_per_case") else None

    @property
    def band_width(self) -> float | None:
        """The E-step's boundary band width (``EStepOptions.band_width``): None without boundary bands."""
        return self.boundary_band_width if self.noise_model.startswith("boundary") else None

    @property
    def rater_band_width(self) -> float | None:
        """The raters' boundary band width (``EStepOptions.rater_band_width``): None for one global T per rater."""
        return self.boundary_band_width if self.rater_noise_model == "boundary" else None

    @property
    def total_epochs(self) -> int:
        return self.rounds * self.epochs_per_round

    def to_plans_block(self) -> dict:
        return {"version": SETTINGS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def resolve(cls, plans_block: dict | None, overrides: dict | None = None, *, source: str) -> EMSettings:
        """Defaults, then the plans' ``em`` block, then trainer-variant ``overrides``; validated.

        Raises:
            EMInputError: unknown key, wrong type or impossible value, naming ``source`` (the plans file) and key.
        """
        values = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for origin, block in ((source, plans_block or {}), ("trainer overrides", overrides or {})):
            if not isinstance(block, dict):
                raise EMInputError(f"{origin}: the '{PLANS_KEY}' block must be a JSON object, got "
                                   f"{type(block).__name__}. Fix: replace it by an object such as "
                                   f"{cls().to_plans_block()} or delete it.")
            for key, value in block.items():
                if key == "version":
                    continue
                if key not in known:
                    raise EMInputError(f"{origin}: unknown setting '{PLANS_KEY}.{key}'. Fix: remove it; known "
                                       f"settings are {sorted(known)}.")
                # every block is checked, also where a later one (a trainer variant) overrides the key
                values[key] = (_checked_type(key, value, type(getattr(cls(), key)), origin), origin)
        settings = cls(**{key: value for key, (value, _) in values.items()})
        settings._check_ranges({key: origin for key, (_, origin) in values.items()}, source)
        return settings

    def _check_ranges(self, origins: dict, default_origin: str) -> None:
        problems = []
        if self.rounds < 1:
            problems.append(("rounds", "must be at least 1"))
        if self.epochs_per_round < 1:
            problems.append(("epochs_per_round", "must be at least 1"))
        if not 0.5 < self.change_threshold <= 1.0:
            problems.append(("change_threshold", "must be in (0.5, 1]: a change needs a majority posterior"))
        if not 0.0 <= self.keep_threshold <= 1.0:
            problems.append(("keep_threshold", "must be in [0, 1]"))
        if not 0.0 <= self.min_model_dice <= 1.0:
            problems.append(("min_model_dice", "must be in [0, 1]"))
        if not 0.0 <= self.min_change_precision <= 1.0:
            problems.append(("min_change_precision", "must be in [0, 1]"))
        if not 0.0 < self.max_ignored_share <= 1.0:
            problems.append(("max_ignored_share", "must be in (0, 1]"))
        if not 0.0 <= self.tolerance < 1.0:
            problems.append(("tolerance", "must be in [0, 1)"))
        if self.fit_iterations < 1:
            problems.append(("fit_iterations", "must be at least 1"))
        if self.fit_sample_voxels < 100:
            problems.append(("fit_sample_voxels", "must be at least 100"))
        if self.noise_model not in NOISE_MODELS:
            problems.append(("noise_model", f"must be one of {', '.join(NOISE_MODELS)}"))
        if not self.case_prior_strength >= 0:
            problems.append(("case_prior_strength", "must be >= 0"))
        if not self.boundary_band_width > 0:
            problems.append(("boundary_band_width", "must be > 0"))
        if self.rater_noise_model not in ("boundary", "global"):
            problems.append(("rater_noise_model", "must be boundary or global"))
        if self.weak_mode not in ("map", "sample"):
            problems.append(("weak_mode", "must be map or sample"))
        if self.second_opinion not in ("none", "mirror"):
            problems.append(("second_opinion", "must be none or mirror"))
        if self.patch_sampling not in ("nnunet", "uniform"):
            problems.append(("patch_sampling", "must be nnunet or uniform"))
        if self.soft_targets < 0:
            problems.append(("soft_targets", "must be >= 0"))
        if self.weak_samples < 1:
            problems.append(("weak_samples", "must be at least 1"))
        if not 0.5 < self.weak_agreement <= 1.0:
            problems.append(("weak_agreement", "must be in (0.5, 1]"))
        if problems:
            key, reason = problems[0]
            origin = origins.get(key, default_origin)
            raise EMInputError(f"{origin}: '{PLANS_KEY}.{key}' = {getattr(self, key)!r} {reason}. Fix: set a valid "
                               f"value (default {getattr(EMSettings(), key)!r}) or delete the key to use the default.")


def _checked_type(key, value, expected, origin):
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is str:
        ok = isinstance(value, str)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # float: accept ints too
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise EMInputError(f"{origin}: '{PLANS_KEY}.{key}' = {value!r} must be of type {expected.__name__}. "
                           f"Fix: set a {expected.__name__} (default {getattr(EMSettings(), key)!r}).")
    return expected(value)
