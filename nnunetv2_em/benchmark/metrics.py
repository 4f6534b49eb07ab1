"""The benchmark's numbers: label quality against the clean labels, detection, ranking, intervals. Pure array functions.

Surface metrics (95 % Hausdorff distance, surface Dice at a tolerance) are the product's ``nnunetv2_em.surface``
(MONAI's definitions, checked equal to MONAI in the tests), in voxel units (spacing 1): the benchmark compares label
maps on the same grid, and a tolerance of one voxel is what the issue tracker and the literature on boundary noise
ask for.
"""

from __future__ import annotations

import math

import numpy as np

from nnunetv2_em import estep
from nnunetv2_em.surface import surface_scores


def bootstrap_ci(values, *, seed: int = 0, samples: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Mean over cases and its percentile bootstrap interval (cases resampled with replacement); NaN dropped."""
    values = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (samples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_bootstrap(differences, *, seed: int = 0, samples: int = 4000,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference over seeds x cases and its bootstrap interval, seeds and cases resampled independently.

    Args:
        differences: ``(S, N)``: arm minus baseline for training seed ``s`` and test case ``n`` (the same cases for
            every seed). Resampling both axes lets the interval carry the spread between trainings as well as
            between cases; with one seed it is a bootstrap over cases only and says nothing about training noise.
    """
    differences = np.asarray(differences, dtype=float)
    if differences.ndim != 2 or 0 in differences.shape:
        raise ValueError(f"differences must be a non-empty (seeds, cases) array, got shape {differences.shape}")
    if np.isnan(differences).any():
        raise ValueError("differences contain NaN: pair only cases scored in both arms")
    rng = np.random.default_rng(seed)
    num_seeds, num_cases = differences.shape
    seeds = rng.integers(0, num_seeds, (samples, num_seeds))
    cases = rng.integers(0, num_cases, (samples, num_cases))
    means = np.array([differences[np.ix_(s, c)].mean() for s, c in zip(seeds, cases, strict=True)])
    tail = (1 - level) / 2 * 100
    return (float(differences.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def difference_verdict(per_seed, interval) -> str:
    """Whether a paired difference is established: ``"established"``, ``"no difference ..."`` (every seed's mean
    difference is exactly 0: the two arms made the same choices), or why not.

    Args:
        per_seed: ``(S,)`` mean difference of each training seed. interval: ``(mean, low, high)`` of
            ``paired_bootstrap`` over those seeds.
    """
    per_seed = [float(d) for d in per_seed]
    seeds = len(per_seed)
    if seeds and all(d == 0 for d in per_seed):
        return "no difference (zero on every seed)"
    if interval[1] <= 0 <= interval[2]:
        return "not established (the interval covers 0)"
    if seeds < 3:
        # the interval resamples the trainings run: fewer than 3 cannot hold the spread between trainings
        return (f"the interval excludes 0 over {seeds} seed(s), but fewer than 3 seeds do not measure the spread "
                f"between trainings: not established")
    # with 3 seeds the bootstrap's seed axis is coarse: every seed must also agree in sign
    if not (all(d > 0 for d in per_seed) or all(d < 0 for d in per_seed)):
        return (f"the interval excludes 0, but the seeds disagree in sign ({sum(d > 0 for d in per_seed)} of "
                f"{seeds} higher): not established")
    return "established"


def recovery_share(noisy: float, em: float, clean: float) -> float:
    """Share of the noise-induced drop that EM recovers: ((b) - (a)) / ((c) - (a)); NaN without a drop."""
    drop = clean - noisy
    return float((em - noisy) / drop) if abs(drop) > 1e-12 else float("nan")


def detection_scores(truth: np.ndarray, flagged: np.ndarray) -> dict:
    """Precision, recall and F1 of boolean ``flagged`` against boolean ``truth`` (same shape)."""
    true_positive = int(np.count_nonzero(truth & flagged))
    precision = true_positive / max(int(flagged.sum()), 1)
    recall = true_positive / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum()),
            "true": int(truth.sum())}


FLAG_FACTOR = 2.0  # a case is flagged for review when its review score is above FLAG_FACTOR x the median
REVIEW_BUDGETS = (0.05, 0.10)  # shares of the cases a reviewer looks at, top of the list first


def ranking_scores(ranked: list[dict], corrupted: set[str]) -> dict:
    """Quality of the ranked case list (rows with ``case`` and ``review_score``, best first) against the truly
    corrupted cases: precision / recall of the flagged cases (review score > ``FLAG_FACTOR`` x median), precision
    at k = number of corrupted cases and at each review budget (``ceil(share x cases)`` reviewed), and the average
    precision of the whole ranking (NaN without corrupted cases)."""
    cases = [row["case"] for row in ranked]
    scores = np.array([row["review_score"] for row in ranked], dtype=float)
    flagged = {case for case, score in zip(cases, scores, strict=True) if score > FLAG_FACTOR * np.median(scores)}
    k = len(corrupted)
    hits = [case in corrupted for case in cases]
    precisions = [sum(hits[:i + 1]) / (i + 1) for i, hit in enumerate(hits) if hit]
    result = {"flagged": len(flagged), "precision": len(flagged & corrupted) / max(len(flagged), 1),
              "recall": len(flagged & corrupted) / max(k, 1), "k": k, "precision_at_k": sum(hits[:k]) / max(k, 1),
              "average_precision": float(np.mean(precisions)) if precisions else 0.0}
    for share in REVIEW_BUDGETS:
        reviewed = max(1, math.ceil(share * len(cases)))
        result[f"precision_at_{round(share * 100)}pct"] = sum(hits[:reviewed]) / reviewed
    if not corrupted:  # nothing to find: a ranking cannot be scored
        result.update({key: float("nan") for key in result if key.startswith(("precision_at", "average_precision"))})
    return result


def label_scores(reference: np.ndarray, labels: np.ndarray, *, classes, ignore_label: int | None,
                 annotation: np.ndarray | None = None, surfaces: bool = False) -> dict:
    """Quality of training labels against the clean ones, per class, and the ignored and wrong shares.

    ``dice_<c>`` leaves ignored voxels out (it rewards ignoring: a voxel set to ignore can no longer be wrong);
    ``dice_kept_<c>`` (with ``annotation``, the labels EM started from) scores an ignored voxel as the annotation
    it replaced, so ignoring gains nothing over keeping. With ``surfaces``, ``hd95_<c>`` and ``surface_dice_<c>``
    of the same kept variant (``surface_scores``). All arrays ``(*spatial)``, the same shape.
    """
    keep = np.ones(reference.shape, bool) if ignore_label is None else labels != ignore_label
    result = {f"dice_{c}": estep.dice((reference == c) & keep, (labels == c) & keep) for c in classes}
    if annotation is not None:
        filled = np.where(keep, labels, annotation)
        result.update({f"dice_kept_{c}": estep.dice(reference == c, filled == c) for c in classes})
        if surfaces:
            result.update(surface_scores(reference, filled, classes=classes))
    elif surfaces:
        raise ValueError("surface scores need the annotation (they score the labels with ignored voxels kept)")
    result["fraction_ignored"] = float(1 - keep.mean())
    # wrong voxels: with the annotation, ignored voxels count as the annotation they replaced (honest); without it,
    # only labelled voxels can be wrong
    wrong = (filled != reference) if annotation is not None else keep & (labels != reference)
    result["fraction_wrong"] = float(wrong.mean())
    return result


def summarize_cases(rows: list[dict], *, classes) -> dict:
    """Rows of ``label_scores`` (one per case) -> the number of cases and, for each score the rows hold (``dice``,
    ``dice_kept``, ``hd95``, ``surface_dice``), the mean over cases of its foreground-class mean (NaN classes
    skipped); the count of undefined HD95 values, the mean ignored share and, where scored, the wrong share."""
    if not rows:
        return {"cases": 0}
    summary = {"cases": len(rows)}
    for key in (k for k in ("dice", "dice_kept", "hd95", "surface_dice") if f"{k}_{classes[0]}" in rows[0]):
        values = [float(np.nanmean([row[f"{key}_{c}"] for c in classes])) for row in rows]
        summary[key] = float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")
    if "hd95" in summary:
        summary["hd95_undefined"] = int(sum(np.isnan(row[f"hd95_{c}"]) for row in rows for c in classes))
    summary["fraction_ignored"] = float(np.mean([row["fraction_ignored"] for row in rows]))
    if all("fraction_wrong" in row for row in rows):
        summary["fraction_wrong"] = float(np.mean([row["fraction_wrong"] for row in rows]))
    return summary


def summarize_groups(per_case: dict[str, dict], corrupted: set[str], *, classes) -> dict:
    """``summarize_cases`` over all cases of ``per_case`` (``{case: label_scores row}``), the corrupted ones and the
    untouched ones."""
    groups = {"all": list(per_case), "corrupted": [c for c in per_case if c in corrupted],
              "untouched": [c for c in per_case if c not in corrupted]}
    return {group: summarize_cases([per_case[c] for c in members], classes=classes)
            for group, members in groups.items()}
