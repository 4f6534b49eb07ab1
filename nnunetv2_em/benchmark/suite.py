"""``nnunetv2_em benchmark``: noise settings x training seeds, each a resumable replicate, and one report over them.

Layout of ``--out``::

    <setting>/seed_<s>/        one replicate (harness.Benchmark): split, corruption, arms, results.json
    suite.json                 every replicate's figures, the paired differences and their intervals
    report.md, plots/          the report

Every replicate of a suite uses the same split and corruption (``--seed``) and varies only the training seed, so
replicates of one setting differ only by training noise and two arms of one replicate only by their labels. The
``clean`` setting is the do-no-harm control for the labels and, for test Dice, the clean reference arm (its vanilla
arm trains on the clean labels): a suite with final trainings always includes it.
"""

from __future__ import annotations

import os
import time

import numpy as np

from nnunetv2_em.benchmark import metrics, noise
from nnunetv2_em.benchmark.harness import PROFILES, Benchmark
from nnunetv2_em.errors import EMInputError

CONTROL = "clean"
LABEL_VERSIONS = ("noisy", "em", "cleanlab")  # em: the EM run's last round


def replicate_folder(out: str, setting: str, seed: int) -> str:
    return os.path.join(out, setting, f"seed_{seed}")


def check_suite(settings, seeds, profile: str) -> tuple[list[str], list[int]]:
    """Settings (duplicates dropped, order kept) and seeds, checked up front; one clear error otherwise."""
    unknown = [name for name in settings if name not in noise.SETTINGS]
    if unknown:
        raise EMInputError(f"--noise {' '.join(unknown)}: unknown. Fix: pick from {sorted(noise.SETTINGS)}.")
    if profile not in PROFILES:
        raise EMInputError(f"--profile {profile}: unknown. Fix: pick one of {sorted(PROFILES)}.")
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise EMInputError(f"--seeds {' '.join(map(str, seeds))}: give distinct integers >= 0, e.g. --seeds 0 1 2.")
    return list(dict.fromkeys(settings)), list(seeds)


def run_suite(dataset: str, settings, *, seeds, corruption_seed: int = 0, profile: str = "cpu", out: str,
              label_quality_only: bool = False, verified_cases: int = 0, command: str | None = None) -> dict:
    """Run (or continue) every replicate, seed by seed, then write the suite's figures and report."""
    settings, seeds = check_suite(settings, seeds, profile)
    if not label_quality_only and CONTROL not in settings:
        settings = [CONTROL, *settings]  # the clean reference arm of every test-Dice comparison
    replicates = {}
    for seed in seeds:  # seed-major: an interrupted suite has whole seeds, not whole settings
        for setting in settings:
            started = time.time()
            benchmark = Benchmark(dataset, setting, seed=corruption_seed, profile=profile,
                                  out=replicate_folder(out, setting, seed), training_seed=seed,
                                  label_quality_only=label_quality_only, verified_cases=verified_cases)
            replicates[(setting, seed)] = benchmark.run()
            print(f"{setting}, training seed {seed}: done ({(time.time() - started) / 60:.1f} min)", flush=True)
    summary = summarize(replicates, settings=settings, seeds=seeds)
    summary.update({"dataset": os.path.abspath(dataset), "profile": profile, "corruption_seed": corruption_seed,
                    "label_quality_only": label_quality_only, "verified_cases": verified_cases, "command": command})
    from nnunetv2_em.benchmark import report

    report.write(out, summary)
    return summary


def _last_em_version(label_quality: dict) -> str:
    rounds = [name for name in label_quality["versions"] if name.startswith("em_round_")]
    return max(rounds, key=lambda name: int(name.rsplit("_", 1)[1])) if rounds else "noisy"


def label_figures(results: dict) -> dict:
    """One replicate's label quality per version (noisy, em = last round, cleanlab) and group of cases."""
    quality = results["label_quality"]
    names = {"noisy": "noisy", "em": _last_em_version(quality), "cleanlab": "cleanlab"}
    return {version: quality["versions"][name] for version, name in names.items()}


def paired_test(replicates: dict, setting: str, seeds: list[int], arm: str, baseline: tuple[str, str]) -> dict:
    """Paired test-Dice difference ``arm`` minus ``baseline`` (a (setting, arm) pair) over seeds x test cases."""
    rows, per_seed = [], []
    for seed in seeds:
        ours = replicates[(setting, seed)]["test_dice"][arm]["per_case"]
        theirs = replicates[(baseline[0], seed)]["test_dice"][baseline[1]]["per_case"]
        cases = sorted(set(ours) & set(theirs))
        rows.append([ours[c] - theirs[c] for c in cases])
        per_seed.append(float(np.mean(rows[-1])))
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{setting}: the replicates scored different numbers of test cases")
    mean, low, high = metrics.paired_bootstrap(np.asarray(rows))
    return {"mean": mean, "low": low, "high": high, "per_seed": per_seed,
            "seeds_won": int(sum(d > 0 for d in per_seed)), "seeds": len(seeds),
            "excludes_zero": bool(low > 0 or high < 0)}


def summarize(replicates: dict, *, settings: list[str], seeds: list[int]) -> dict:
    """Per setting: label quality per seed and its mean, EM's rounds, ranking and detection, and (with final
    trainings) test Dice per arm and seed with the paired differences (EM - vanilla, cleanlab - vanilla, clean -
    vanilla) and their bootstrap intervals over seeds x test cases."""
    out = {"settings": {}, "seeds": seeds}
    for setting in settings:
        runs = {seed: replicates[(setting, seed)] for seed in seeds}
        first = runs[seeds[0]]
        labels = {seed: label_figures(run) for seed, run in runs.items()}
        mean_labels = {version: {group: _mean_dicts([labels[s][version][group] for s in seeds])
                                 for group in ("all", "corrupted", "untouched")}
                       for version in LABEL_VERSIONS}
        entry = {
            "description": first["noise"]["description"],
            "corrupted_cases": len(first["label_quality"]["corrupted_cases"]), "train_cases": first["train_cases"],
            "labels": mean_labels, "labels_per_seed": {str(s): labels[s] for s in seeds},
            "em_rounds": {str(s): runs[s]["em_rounds"] for s in seeds},
            "ranking": _mean_dicts([runs[s]["detection"]["cases"] for s in seeds]),
            "voxels": {method: _mean_dicts([runs[s]["detection"]["voxels"][method] for s in seeds])
                       for method in ("em", "cleanlab")},
            "minutes": {str(s): runs[s]["arms"] for s in seeds},
        }
        if "test_dice" in first:
            entry["test"] = {arm: {"per_seed": [runs[s]["test_dice"][arm]["foreground"][0] for s in seeds]}
                             for arm in ("noisy", "em", "cleanlab")}
            for arm in entry["test"]:
                entry["test"][arm]["mean"] = float(np.mean(entry["test"][arm]["per_seed"]))
            entry["paired"] = {"em - noisy": paired_test(replicates, setting, seeds, "em", (setting, "noisy")),
                               "cleanlab - noisy": paired_test(replicates, setting, seeds, "cleanlab",
                                                               (setting, "noisy"))}
            if (CONTROL, seeds[0]) in replicates and setting != CONTROL:
                entry["paired"]["clean - noisy"] = paired_test(replicates, CONTROL, seeds, "noisy",
                                                               (setting, "noisy"))
                entry["recovery_share"] = metrics.recovery_share(
                    entry["test"]["noisy"]["mean"], entry["test"]["em"]["mean"],
                    float(np.mean([runs_clean["test_dice"]["noisy"]["foreground"][0]
                                   for runs_clean in (replicates[(CONTROL, s)] for s in seeds)])))
        out["settings"][setting] = entry
    return out


def _mean_dicts(rows: list[dict]) -> dict:
    """Key-wise mean of numeric fields (NaN-aware); ``{}`` rows (an empty group) are skipped."""
    rows = [row for row in rows if row.get("cases", 1)]
    if not rows:
        return {"cases": 0}
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean = {}
    for key in keys:
        values = np.asarray([row[key] for row in rows], dtype=float)
        mean[key] = float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")
    return mean


def load_replicates(out: str, *, known=noise.SETTINGS) -> dict:
    """``{(setting, seed): results}`` of every finished replicate under ``out/<setting>/seed_<s>`` for the settings in
    ``known`` (for reports of partial suites)."""
    import json

    found = {}
    for setting in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        folder = os.path.join(out, setting)
        if setting not in known or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name, "results.json")
            if name.startswith("seed_") and os.path.isfile(path):
                with open(path) as handle:
                    found[(setting, int(name.removeprefix("seed_")))] = json.load(handle)
    return found



def report_finished(out: str, settings, *, seeds, profile: str, corruption_seed: int = 0,
                    label_quality_only: bool = False, command: str | None = None) -> dict:
    """The report over the seeds whose replicates are finished for every requested setting (nothing is trained)."""
    settings, seeds = check_suite(settings, seeds, profile)
    found = load_replicates(out)
    finished = [s for s in seeds if all((name, s) in found for name in settings)]
    if not finished:
        raise EMInputError(f"{out}: no seed has finished replicates for all of {', '.join(settings)}. Fix: run the "
                           f"command without --report-only first.")
    if not label_quality_only:
        label_quality_only = any("test_dice" not in found[(name, s)] for name in settings for s in finished)
    summary = summarize({key: found[key] for key in found if key[0] in settings and key[1] in finished},
                        settings=settings, seeds=finished)
    summary.update({"dataset": found[(settings[0], finished[0])]["dataset"], "profile": profile,
                    "corruption_seed": corruption_seed, "label_quality_only": label_quality_only,
                    "command": command})
    from nnunetv2_em.benchmark import report

    report.write(out, summary)
    return summary
