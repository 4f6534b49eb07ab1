"""Partial and weak labels as E-step constraints (the DeepEM idea), as pure array functions (numpy and scipy only).

An annotation is an observation of the hidden true label; a partial or weak annotation is a set-valued or
constraint observation:

* **set-valued voxels**: in a case that annotates only some classes (``annotated_classes``), a voxel left as
  background means "background or one of the classes this case does not annotate". Its likelihood sums the noise
  model over that set ``S`` and its posterior is restricted to ``S``: it never moves to a class outside ``S``;
* **case-level constraints** project the case's posterior: ``absent`` classes are removed and the rest renormalised;
  ``region`` (bounding box, slice range or side) removes a class outside it; ``present`` keeps at least one
  component of the class (its most probable region); ``count`` keeps the N most probable components; ``volume``
  moves the class's threshold until its volume is inside the range;
* voxels the constraints leave uncertain get the ignore label.

Two modes, as DeepEM compares: ``map`` (the constrained argmax) and ``sample`` (K label maps drawn from the
posterior, each projected onto the constraints; their agreement decides between the label and ignore).

Shapes: ``logits``/``posterior`` ``(C, *spatial)``, ``annotations``/labels ``(*spatial)``; class 0 is background.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from nnunetv2_em.estep.model import NoiseModel, RefinementThresholds, annotated_mask, posterior, softmax
from nnunetv2_em.estep.refine import case_posterior, refine_case, refine_labels
from nnunetv2_em.estep.round_fit import CaseSample, sample_case
from nnunetv2_em.estep.scores import score_case

MODES = ("map", "sample")


@dataclass(frozen=True)
class CaseConstraints:
    """What is known about one case besides (or instead of) its mask. Volumes in voxels, regions in voxel indices
    of the array the E-step sees; ``nnunetv2_em.weak_labels`` converts the file's units.

    ``annotated_classes``: the foreground classes the mask covers (None: all). ``weak_only``: the case has no mask.
    ``region[c]``: per axis ``(start, stop)`` (stop exclusive) where class ``c`` may be.
    """

    annotated_classes: frozenset[int] | None = None
    present: frozenset[int] = frozenset()
    absent: frozenset[int] = frozenset()
    count: dict[int, int] = field(default_factory=dict)
    volume: dict[int, tuple[float, float]] = field(default_factory=dict)
    region: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    weak_only: bool = False

    def unannotated_classes(self, num_classes: int) -> frozenset[int]:
        """Foreground classes the mask does not cover (all of them for a weak-only case)."""
        if self.weak_only:
            return frozenset(range(1, num_classes))
        if self.annotated_classes is None:
            return frozenset()
        return frozenset(range(1, num_classes)) - self.annotated_classes

    def check(self, num_classes: int, shape: tuple[int, ...]) -> None:
        """Raise ValueError on a class outside ``1..num_classes-1``, contradictions, empty ranges or regions."""
        classes = set(range(1, num_classes))
        named = {"present": set(self.present), "absent": set(self.absent), "count": set(self.count),
                 "volume": set(self.volume), "region": set(self.region),
                 "annotated_classes": set(self.annotated_classes or ())}
        for key, values in named.items():
            if values - classes:
                raise ValueError(f"{key}: class {sorted(values - classes)[0]} is not a foreground class "
                                 f"(1..{num_classes - 1})")
        if self.present & self.absent:
            raise ValueError(f"class {sorted(self.present & self.absent)[0]} is both present and absent")
        for c, n in self.count.items():
            if not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"count of class {c} must be an integer >= 0, got {n!r}")
            if (n == 0 and c in self.present) or (n > 0 and c in self.absent):
                raise ValueError(f"count {n} of class {c} contradicts present/absent")
        for c, (low, high) in self.volume.items():
            if not 0 <= low <= high:
                raise ValueError(f"volume of class {c}: empty range [{low}, {high}]")
            if c in self.absent and low > 0:
                raise ValueError(f"volume of class {c} contradicts absent")
        for c, box in self.region.items():
            if len(box) != len(shape):
                raise ValueError(f"region of class {c} has {len(box)} axes, the image {len(shape)}")
            for (start, stop), size in zip(box, shape, strict=True):
                if not 0 <= start < stop <= size:
                    raise ValueError(f"region of class {c}: [{start}, {stop}) is empty or outside the image "
                                     f"(size {size})")


def observation_posterior(logits, annotations, model: NoiseModel, constraints: CaseConstraints) -> np.ndarray:
    """Posterior over the true class per voxel under the annotation *and* the case's hard constraints.

    Singleton observations (a voxel annotated with a class the case annotates): the noise-model posterior
    (``posterior``). Set-valued observations (a voxel left background in a case that does not annotate every
    class, or any voxel of a weak-only case): ``q(k) ∝ softmax(z/τ)_k · Σ_{a∈S} T[k, a]`` for ``k ∈ S``, 0 outside
    ``S``. Then ``absent`` and ``region`` remove classes where they cannot be, and each voxel is renormalised
    (a voxel where nothing is left becomes background).

    Args:
        logits: ``(C, *spatial)``. annotations: ``(*spatial)`` (values outside ``0..C-1``: not annotated; for a
            weak-only case every voxel, or pass background everywhere).

    Returns:
        ``(C, *spatial)`` float32.
    """
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    num_classes = logits.shape[0]
    constraints.check(num_classes, annotations.shape)
    unannotated = constraints.unannotated_classes(num_classes)
    q = posterior(logits, annotations, model)
    excluded = np.zeros(q.shape, bool)  # classes a voxel cannot be: outside its set, absent, outside a region
    if unannotated:
        allowed = np.zeros(num_classes, bool)
        allowed[[0, *sorted(unannotated)]] = True
        transition = np.asarray(model.transition, dtype=np.float64)
        set_likelihood = np.where(allowed, transition[:, allowed].sum(axis=1), 0.0)  # Σ_{a∈S} T[k, a], k ∈ S
        if constraints.weak_only:
            set_valued = np.ones(annotations.shape, bool)
        else:
            set_valued = annotations == 0
        for c in np.flatnonzero(~allowed):
            excluded[c][set_valued] = True
        with np.errstate(divide="ignore"):  # log 0 = -inf: the classes outside S
            log_set = np.log(set_likelihood).astype(np.float32)
        # in log space: where the network is sure of a class outside S, every class in S has a prior that
        # underflows float32, and the product would leave the voxel all-zero (then background by default)
        if np.isfinite(log_set).any():
            q[:, set_valued] = _normalised_exp(_log_softmax(logits[:, set_valued], model.temperature)
                                               + log_set[:, None])
        else:  # no class of S produces an observation in S (a degenerate T): left to the fallback below
            q[:, set_valued] = 0.0
    for c in constraints.absent:
        excluded[c] = True
    for c, box in constraints.region.items():
        outside = np.ones(annotations.shape, bool)
        outside[tuple(slice(start, stop) for start, stop in box)] = False
        excluded[c] |= outside
    q[excluded] = 0.0
    total = q.sum(axis=0)
    empty = total <= 0
    if empty.any():  # all its mass was on excluded classes: the network's prior over the classes left, if any
        log_prior = np.where(excluded[:, empty], -np.inf, _log_softmax(logits[:, empty], model.temperature))
        left = np.isfinite(log_prior).any(axis=0)
        refilled = np.zeros(log_prior.shape, np.float32)
        refilled[0] = 1.0  # nothing left: background
        refilled[:, left] = _normalised_exp(log_prior[:, left])
        q[:, empty] = refilled
        total[empty] = 1.0
    q /= total[None]
    return q


def _log_softmax(logits, temperature: float) -> np.ndarray:
    """``log softmax(logits / temperature)`` over axis 0, float32, without underflow."""
    scaled = np.array(logits, dtype=np.float32) * np.float32(1.0 / float(temperature))
    scaled -= scaled.max(axis=0, keepdims=True)
    scaled -= np.log(np.exp(scaled).sum(axis=0, keepdims=True))
    return scaled


def _normalised_exp(log_weights: np.ndarray) -> np.ndarray:
    """Columns of ``exp(log_weights)`` normalised to sum 1 (float32; the largest entry of each column is 1 before
    normalising, so a column with any finite entry never underflows to all-zero)."""
    shifted = log_weights - log_weights.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    return shifted / shifted.sum(axis=0, keepdims=True)


def _second_best(q: np.ndarray, c: int) -> np.ndarray:
    without = q.copy()
    without[c] = -1.0
    return without.argmax(axis=0)


def project_label_map(labels, q, constraints: CaseConstraints, *, connectivity: int = 1) -> tuple[np.ndarray, dict]:
    """Make a label map satisfy the case's present / count / volume constraints, using ``q`` to decide where.

    * ``count[c] = N``: the N components of ``c`` with the most posterior mass are kept, the others get each voxel's
      next most probable class; fewer than N components cannot be created and are reported as unmet.
    * ``present`` (or ``count >= 1``) with no voxel of ``c``: the most probable region of ``c`` (the component, in
      ``q[c] >= max q[c] / 2``, around the voxel where ``q[c]`` peaks) becomes ``c``.
    * ``volume[c] = (low, high)``: voxels are added in order of decreasing ``q[c]`` until ``low``, or the least
      probable removed until ``high`` (``q[c]``'s threshold moves until the volume is in range).

    Args:
        labels: ``(*spatial)`` int, may hold the ignore label or -1 (never changed, never counted).
        q: ``(C, *spatial)`` posterior the labels came from.

    Returns:
        ``(projected labels, report)``: the report names each constraint that changed the map, and ``unmet``.
    """
    labels = np.asarray(labels).copy()
    q = np.asarray(q)
    usable = labels >= 0  # inside the image: labelled or ignored voxels may take a class a constraint needs
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    report: dict = {"shaped_by": [], "unmet": []}
    wanted_present = set(constraints.present) | {c for c, n in constraints.count.items() if n >= 1}
    for c in sorted(wanted_present):
        if np.any(labels == c):
            continue
        weights = np.where(usable, q[c], 0.0)
        peak = float(weights.max())
        if peak <= 0:
            report["unmet"].append(f"present {c}: no voxel can be class {c}")
            continue
        components, _ = ndimage.label(weights >= peak / 2, structure=structure)
        region = components == components.flat[int(weights.argmax())]
        labels[region] = c
        report["shaped_by"].append(f"present {c}: {int(region.sum())} voxels added")
    for c, wanted in sorted(constraints.count.items()):
        components, found = ndimage.label(labels == c, structure=structure)
        if found > wanted:
            mass = ndimage.sum(q[c], components, index=np.arange(1, found + 1))
            dropped = np.isin(components, np.argsort(-mass, kind="stable")[wanted:] + 1)
            labels[dropped] = _second_best(q, c)[dropped]
            report["shaped_by"].append(f"count {c}: {found - wanted} of {found} components removed")
        elif found < wanted:
            report["unmet"].append(f"count {c}: {found} components, {wanted} expected")
    for c, (low, high) in sorted(constraints.volume.items()):
        volume = int(np.count_nonzero(labels == c))
        if volume < low:
            candidates = np.flatnonzero(usable & (labels != c))
            order = candidates[np.argsort(-q[c].reshape(-1)[candidates], kind="stable")]
            added = order[:int(np.ceil(low)) - volume]
            labels.reshape(-1)[added] = c
            report["shaped_by"].append(f"volume {c}: {volume} -> {volume + added.size} voxels")
        elif volume > high:
            members = np.flatnonzero(labels.reshape(-1) == c)
            order = members[np.argsort(q[c].reshape(-1)[members], kind="stable")]
            removed = order[:volume - int(np.floor(high))]
            labels.reshape(-1)[removed] = _second_best(q, c).reshape(-1)[removed]
            report["shaped_by"].append(f"volume {c}: {volume} -> {volume - removed.size} voxels")
    return labels, report


def singleton_observations(annotations, constraints: CaseConstraints, num_classes: int) -> np.ndarray:
    """``(*spatial)`` bool: voxels whose annotation names one class (what the noise model is fitted on); a partial
    case's background and every voxel of a weak-only case are set-valued or unobserved."""
    annotations = np.asarray(annotations)
    if constraints.weak_only:
        return np.zeros(annotations.shape, bool)
    mask = annotated_mask(annotations, num_classes)
    if constraints.unannotated_classes(num_classes):
        mask &= annotations != 0
    return mask


def constrained_labels(logits, annotations, model: NoiseModel, constraints: CaseConstraints, *,
                       thresholds: RefinementThresholds, ignore_label: int, mode: str = "map", samples: int = 16,
                       agreement: float = 0.8, allow_changes: bool = True, seed=0) -> tuple[np.ndarray, dict]:
    """The labels one partial or weak case trains on, and which constraints shaped them.

    ``map``: singleton observations are refined as a fully annotated case is (``refine_labels``: change, keep or
    ignore); set-valued and unannotated voxels take the class of highest posterior where it reaches
    ``thresholds.change_threshold`` and the ignore label elsewhere; then ``project_label_map`` (a constraint
    overrides the annotation where they disagree: the annotation is an observation, the constraint a fact).
    ``sample``: ``samples`` label maps drawn voxel-wise from the constrained posterior, each projected; a voxel
    takes the most frequent class where at least ``agreement`` of the maps agree, the ignore label elsewhere
    (singleton observations that would be kept keep their annotation).

    Args:
        logits: ``(C, *spatial)``. annotations: ``(*spatial)``; -1 (outside the image) stays -1.
        allow_changes: False turns changes of singleton observations into the ignore label (``estep.gate_round``:
            their precision is not established); set-valued voxels may still take any class of their set.

    Returns:
        ``(labels (*spatial) like annotations' dtype, report)`` with ``shaped_by``, ``unmet`` and ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.5 < agreement <= 1.0:
        raise ValueError(f"agreement must be in (0.5, 1], got {agreement}")
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    num_classes = logits.shape[0]
    q = observation_posterior(logits, annotations, model, constraints)
    outside = annotations == -1
    singleton = singleton_observations(annotations, constraints, num_classes)
    if mode == "map":
        labels = np.where(q.max(axis=0) >= thresholds.change_threshold, q.argmax(axis=0), ignore_label)
        refined = refine_labels(q, np.where(singleton, annotations, -1), thresholds=thresholds,
                                ignore_label=ignore_label, allow_changes=allow_changes)
        labels = np.where(singleton, refined, labels)
        labels[outside] = -1
        labels, report = project_label_map(labels, q, constraints)
    else:
        rng = np.random.default_rng(seed)
        cumulative = np.cumsum(q, axis=0)
        votes = np.zeros((num_classes, *annotations.shape), np.int32)
        report = {"shaped_by": [], "unmet": []}
        for _ in range(samples):
            draw = (rng.random(annotations.shape, dtype=np.float32)[None] > cumulative).sum(axis=0)
            draw = np.minimum(draw, num_classes - 1)
            draw[outside] = -1
            projected, sample_report = project_label_map(draw, q, constraints)
            for c in range(num_classes):
                votes[c] += projected == c
            report["unmet"] = sorted(set(report["unmet"]) | set(sample_report["unmet"]))
            report["shaped_by"] = sorted(set(report["shaped_by"]) | {s.split(":")[0] for s in
                                                                     sample_report["shaped_by"]})
        share = votes.max(axis=0) / samples
        labels = np.where(share >= agreement, votes.argmax(axis=0), ignore_label)
        kept = singleton & (np.take_along_axis(q, np.where(singleton, annotations, 0)[None], axis=0)[0]
                            >= thresholds.keep_threshold)
        labels = np.where(kept & (labels == ignore_label), annotations, labels)
        if not allow_changes:
            labels = np.where(singleton & (labels != annotations), ignore_label, labels)
        labels[outside] = -1
    report["mode"] = mode
    report["voxels_ignored"] = int(np.count_nonzero(labels == ignore_label))
    return labels.astype(annotations.dtype if annotations.dtype.kind in "iu" else np.int16), report


def weak_case_kind(constraints: CaseConstraints) -> str:
    return "weak_only" if constraints.weak_only else "partial" if constraints.annotated_classes is not None \
        else "tagged"


def fit_sample(logits, annotations, constraints: CaseConstraints | None, *, max_voxels_per_class: int, seed,
               band_width: float | None = None, truth=None) -> CaseSample:
    """The case's share of the round's noise-model fit (``sample_case``): with weak labels only its
    singleton observations (a partial case's background means "background or an unannotated class", not an
    annotation) and only the Dice of the classes it annotates; ``truth``: a reviewed case's labels ``(*spatial)``
    (complete data)."""
    logits = np.asarray(logits)
    annotations = np.asarray(annotations)
    if constraints is not None:
        annotations = np.where(singleton_observations(annotations, constraints, logits.shape[0]), annotations, -1)
    sample = sample_case(logits, annotations, max_voxels_per_class=max_voxels_per_class, seed=seed,
                         band_width=band_width, truth=truth)
    if constraints is None:
        return sample
    unannotated = constraints.unannotated_classes(logits.shape[0])
    return dataclasses.replace(sample, dice=tuple(float("nan") if c + 1 in unannotated else d
                                                  for c, d in enumerate(sample.dice)))


def refine_labelled_case(logits, annotations, model: NoiseModel, constraints: CaseConstraints | None, *,
                         thresholds: RefinementThresholds, ignore_label: int, previous=None, apply: bool = True,
                         allow_changes: bool = True, case_prior_strength: float | None = None, mode: str = "map",
                         samples: int = 16, agreement: float = 0.8, seed=0,
                         second_opinion=None, known_posterior=None) -> tuple[np.ndarray, dict]:
    """The one per-case E-step of a labelled case, with or without weak labels (what every driver calls).
    ``second_opinion``: logits that must confirm each change (``agree_on_changes``; cases without weak
    labels only). ``known_posterior``: the case's ``proposal_posterior`` when the caller has it already (not
    recomputed).

    Without ``constraints``: ``refine_case``. With them (in the array's voxels): ``constrained_labels``
    (set-valued voxels and constraints; singleton changes only where ``apply and allow_changes``), scored like
    ``refine_case`` with ``scores["weak_labels"]`` naming the kind and what shaped the labels. Constrained cases
    use the dataset's ``model`` (``case_prior_strength`` is not applied to them: a per-case ``T`` fitted on
    set-valued observations is not defined here yet).
    """
    if constraints is None:
        return refine_case(logits, annotations, model, thresholds=thresholds, ignore_label=ignore_label,
                           previous=previous, apply=apply, allow_changes=allow_changes,
                           case_prior_strength=case_prior_strength, seed=seed, second_opinion=second_opinion,
                           known_posterior=known_posterior)
    refined, report = constrained_labels(logits, annotations, model, constraints, thresholds=thresholds,
                                         ignore_label=ignore_label, mode=mode, samples=samples, agreement=agreement,
                                         allow_changes=allow_changes and apply, seed=seed)
    q = observation_posterior(logits, annotations, model, constraints) if known_posterior is None \
        else known_posterior[0]
    scores = score_case(annotations, refined, q, np.asarray(logits).argmax(axis=0), previous=previous,
                        ignore_label=ignore_label)
    return refined, {**scores, "weak_labels": {"kind": weak_case_kind(constraints), **report}}


def proposal_posterior(logits, annotations, model: NoiseModel, constraints: CaseConstraints | None, *, pseudo: bool,
                       case_prior_strength: float | None, seed) -> tuple[np.ndarray, float | None]:
    """The posterior ``(C, *spatial)`` a case's proposal is read from, computed once per case for the E-step
    (``refine_labelled_case(known_posterior=)``), its uncertainty map and its soft targets: the calibrated network alone
    for a pseudo-labelled case, under its constraints for a constrained one, the (per-case) noise model otherwise
    (``case_posterior``). Returns ``(posterior, case flip rate or None)`` as ``case_posterior`` does."""
    if constraints is not None:
        return observation_posterior(logits, annotations, model, constraints), None
    if pseudo:
        return softmax(logits, model.temperature, dtype=np.float32), None
    return case_posterior(logits, annotations, model, case_prior_strength=case_prior_strength, seed=seed)
