"""E-step noise models side by side on the same out-of-fold probabilities: no training, minutes per replicate.

Every replicate of a ``nnunetv2_em benchmark`` suite keeps its EM run's round-1 out-of-fold logits. This script
re-runs the one per-case E-step (``estep.refine_case``) on them with each noise model (the dataset-wide ``T``, what
the run did; per-case ``T`` shrunk toward it at several prior strengths; one ``T`` per boundary band, refitted as a
run with ``noise_model: boundary`` would fit it, alone and per case) and each gate (the run's: model Dice
against the annotation; forced open; a precision gate estimated from 4 verified cases with
``estep.change_precision``, untouched cases standing in for reviewed ones), and scores the labels exactly as the
benchmark does (raw geometry, Dice with ignored voxels kept at the annotation and left out, HD95, surface Dice,
corrupted and untouched cases apart, voxel detection F1, case ranking). cleanlab's row is the benchmark's peer on
the same probabilities.

    python scripts/benchmark_noise_models.py --suite bench_out/suite_lq \\
        --dataset ../shared/data/Dataset004_Hippocampus --profile cpu-long --out scripts/results/noise_models.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_em import estep, nnunet_data
from nnunetv2_em.benchmark import metrics, suite
from nnunetv2_em.benchmark.harness import Benchmark
from nnunetv2_em.benchmark.label_files import read_label
from nnunetv2_em.estep.pipeline import ArrayCaseInputs, EStep, EStepOptions
from nnunetv2_em.settings import EMSettings

# name: (per-case prior strength or None, boundary band width or None)
MODELS = {"global": (None, None), "per_case 100": (100.0, None), "per_case 1000": (1000.0, None),
          "boundary": (None, 2.0), "boundary_per_case 100": (100.0, 2.0)}


def fit_like_a_run(benchmark: Benchmark, cases: list[str], logits_of, *, band_width: float | None = None) -> dict:
    """The run's round fit (the E-step's front door with the plans' settings, as a run fits) on
    ``logits_of(case)``, optionally boundary-aware, as ``fit.json`` holds it."""
    plans = PlansManager(os.path.join(benchmark.workspace.preprocessed("em"), "nnUNetPlans.json"))
    settings = EMSettings.resolve(plans.plans.get("em"), source="plans")
    versions = benchmark.workspace.em_versions(benchmark.profile, benchmark.ending)
    options = dataclasses.replace(EStepOptions.from_settings(settings), band_width=band_width)
    step = EStep(options, ArrayCaseInputs(logits_of, lambda case: versions.read_segmentation(0, case)[0]),
                 num_classes=len(benchmark.classes) + 1, ignore_label=benchmark.ignore_label, round_index=1)
    fit = step.fit(cases)
    return {"noise_model": fit.model.to_dict(), "refine": bool(fit.refine), "model_dice": fit.model_dice}


VERIFIED_CASES = 4  # untouched training cases treated as checked by a reviewer (for the precision gate)
MIN_CHANGE_PRECISION = 0.8


def suite_parser(description: str) -> argparse.ArgumentParser:
    """The options every script on a suite's replicates takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--suite", required=True, help="output folder of a benchmark suite")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--corruption-seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="markdown summary to write (a JSON beside it)")
    return parser


def replicates(args, settings=None):
    """``(setting, seed, results, folder, benchmark)`` for every finished replicate of ``args.suite`` (only
    ``settings`` when given)."""
    for (setting, seed), results in sorted(suite.load_replicates(args.suite).items()):
        if settings and setting not in settings:
            continue
        folder = suite.replicate_folder(args.suite, setting, seed)
        yield setting, seed, results, folder, Benchmark(args.dataset, setting, seed=args.corruption_seed,
                                                        profile=args.profile, out=folder, training_seed=seed,
                                                        label_quality_only=True)


def round_one_logits(benchmark: Benchmark, cache: str, network_of: dict[str, int], *,
                     flip_axis: int | None = None) -> str:
    """Logits of every case in ``network_of`` ({case: fold}) from that fold's round-1 network of the replicate's EM
    run, into ``cache`` (``oof.predict_cases``; ``flip_axis``: of the mirrored image)."""
    from nnunetv2_em import oof

    layout = benchmark.workspace.em_run(benchmark.profile)
    images = os.path.join(benchmark.workspace.preprocessed("em"), f"nnUNetPlans_{benchmark.profile.configuration}")
    for fold in sorted(set(network_of.values())):
        oof.predict_cases(layout.model_folder(1), [fold], {c: images for c, f in network_of.items() if f == fold},
                          cache, mirroring=False, device="cpu", flip_axis=flip_axis)
    return cache


def held_out_by(benchmark: Benchmark) -> dict[str, int]:
    """{case: the fold whose round-1 network held it out} of the replicate's EM run."""
    with open(benchmark.workspace.em_run(benchmark.profile).round_file(1, "out_of_fold.json")) as handle:
        return json.load(handle)


def verified_cases(split: dict, corrupted: set[str], *, seed: int) -> list[str]:
    """``VERIFIED_CASES`` training cases the noise left untouched, drawn reproducibly: what a reviewer checked."""
    untouched = sorted(c for c in split["train"] if c not in corrupted)
    return sorted(np.random.default_rng(seed).choice(untouched, size=VERIFIED_CASES, replace=False).tolist())


def evaluate(benchmark: Benchmark, *, strength, gate: str, logits_of=None, fit: dict | None = None,
             second_of=None) -> dict:
    """Label quality after the E-step with one noise model and one gate: ``as run`` (the run's Dice gate, changes
    allowed), ``open``, ``ignore only`` (no verified cases, the default since: every change becomes the ignore
    label), or ``precision`` (verified cases kept as they are; the rest changed only if the estimated precision's
    lower bound reaches ``MIN_CHANGE_PRECISION``, else their changes become ignore, as ``estep.gate_round`` decides).
    ``logits_of(case)`` and ``fit`` (``fit.json``'s content) default to the run's round-1 out-of-fold logits and
    fit. ``second_of(case)``: logits of a second opinion (``estep.agree_on_changes``), or None."""
    with open(os.path.join(benchmark.workspace.out, "split.json")) as handle:
        split = json.load(handle)
    with open(os.path.join(benchmark.workspace.out, "corruption", "records.json")) as handle:
        corrupted = set(json.load(handle)["corrupted_cases"])
    layout = benchmark.workspace.em_run(benchmark.profile)
    versions = benchmark.workspace.em_versions(benchmark.profile, benchmark.ending)
    plans = PlansManager(os.path.join(benchmark.workspace.preprocessed("em"), "nnUNetPlans.json"))
    configuration = plans.get_configuration(benchmark.profile.configuration)
    settings = EMSettings.resolve(plans.plans.get("em"), source="plans")
    if fit is None:
        with open(layout.round_file(1, "fit.json")) as handle:
            fit = json.load(handle)
    if logits_of is None:
        def logits_of(case):
            return np.load(layout.logits_file(1, case)).astype(np.float32)
    model = estep.NoiseModel.from_dict(fit["noise_model"])
    verified = verified_cases(split, corrupted, seed=benchmark.seed) if gate == "precision" else []
    refined, scores, noisy = {}, {}, {}
    for case in split["train"]:
        noisy[case] = versions.read_segmentation(0, case)[0]
        refined[case], scores[case] = estep.refine_case(
            logits_of(case), noisy[case], model,
            thresholds=settings.thresholds, ignore_label=benchmark.ignore_label,
            apply=gate != "as run" or fit["refine"], case_prior_strength=strength,
            seed=estep.case_seed(settings.seed, 1, case),
            second_opinion=None if second_of is None else second_of(case))
    result = {"gate_as_run": bool(fit["refine"])}
    if gate == "precision":
        counts = {c: (scores[c]["voxels_changed"], scores[c]["voxels_annotated"]) for c in split["train"]}
        opened, estimate = estep.precision_gate(counts, verified, min_precision=MIN_CHANGE_PRECISION)
        result["precision_gate"] = {**estimate.to_dict(), "opened": opened, "verified": verified}
        for case in split["train"]:
            if case in verified:
                refined[case] = noisy[case]
            elif not opened:  # changes become ignore
                refined[case] = np.where(refined[case] != noisy[case], benchmark.ignore_label, noisy[case])
    if gate == "ignore only":
        for case in split["train"]:
            refined[case] = np.where(refined[case] != noisy[case], benchmark.ignore_label, noisy[case])
    per_case, truths, flags = {}, [], []
    for case in split["train"]:
        noisy_raw = read_label(versions.label_path(0, case))
        refined_raw = nnunet_data.refined_raw_label(noisy_raw, noisy[case], refined[case],
                                                    load_pickle(versions.original_properties_path(case)), plans,
                                                    configuration)
        clean = read_label(benchmark.cases[case]["label"])
        per_case[case] = metrics.label_scores(clean, refined_raw, classes=benchmark.classes,
                                              ignore_label=benchmark.ignore_label, annotation=noisy_raw,
                                              surfaces=True)
        truths.append((clean != noisy_raw).ravel())
        flags.append((refined_raw != noisy_raw).ravel())
    result.update(metrics.summarize_groups(per_case, corrupted, classes=benchmark.classes))
    result["voxels"] = metrics.detection_scores(np.concatenate(truths), np.concatenate(flags))
    result["ranking"] = metrics.ranking_scores(estep.rank_cases(scores), corrupted)
    if strength is not None:
        by_flip = [{"case": c, "review_score": s["case_flip_rate"]} for c, s in
                   sorted(scores.items(), key=lambda item: -item[1].get("case_flip_rate", 0.0))]
        result["ranking_by_case_flip_rate"] = metrics.ranking_scores(by_flip, corrupted)
    return result


def main():
    parser = suite_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=None, help="noise settings to include (default: all)")
    args = parser.parse_args()
    rows = []
    for setting, seed, results, folder, benchmark in replicates(args, args.settings):
        peer = results["label_quality"]["versions"]["cleanlab"]
        rows.append({"setting": setting, "seed": seed, "model": "noisy input",
                     **results["label_quality"]["versions"]["noisy"]})
        rows.append({"setting": setting, "seed": seed, "model": "cleanlab (peer)", **peer,
                     "voxels": results["detection"]["voxels"]["cleanlab"]})
        with open(os.path.join(folder, "split.json")) as handle:
            cases = json.load(handle)["train"]
        layout = benchmark.workspace.em_run(benchmark.profile)
        for name in args.models:
            strength, band_width = MODELS[name]
            fit = None
            if band_width is not None:
                fit = fit_like_a_run(benchmark, cases, lambda case, lay=layout: np.load(
                    lay.logits_file(1, case)).astype(np.float32), band_width=band_width)
            for gate in ("as run", "open", "ignore only", "precision"):
                result = evaluate(benchmark, strength=strength, gate=gate, fit=fit)
                label = f"{name}, gate {gate}"
                if gate == "precision":
                    label += f" ({'opened' if result['precision_gate']['opened'] else 'closed'}, lower bound " \
                             f"{result['precision_gate']['lower_bound']:.2f})"
                rows.append({"setting": setting, "seed": seed, "model": label, **result})
                print(f"{setting} seed {seed} {label}: Dice kept {result['all']['dice_kept']:.4f}", flush=True)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as handle:
        json.dump(rows, handle, indent=1)
    with open(args.out, "w") as handle:
        handle.write(markdown(rows, args))


def _f(value, digits=4):
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def markdown(rows, args) -> str:
    lines = ["# E-step noise models on the same out-of-fold probabilities", "",
             f"`python scripts/benchmark_noise_models.py --suite {args.suite} --dataset {args.dataset} --profile "
             f"{args.profile} --out {args.out}`", "",
             "Training labels against the clean ones (mean over training cases). Dice kept: ignored voxels scored as "
             "the annotation (honest); left out: ignored voxels dropped (flattering). HD95 in voxels.", "",
             "| setting | seed | labels | Dice kept | left out | ignored | wrong | HD95 | surface Dice | "
             "corrupted: kept | untouched: kept | voxel F1 | AP (review score) | AP (case flip rate) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        voxels = row.get("voxels", {})
        lines.append(
            f"| {row['setting']} | {row['seed']} | {row['model']} | {_f(row['all']['dice_kept'])} | "
            f"{_f(row['all']['dice'])} | {row['all']['fraction_ignored']:.2%} | "
            f"{_f(row['all'].get('fraction_wrong', float('nan')) * 100, 3)} % | {_f(row['all']['hd95'], 2)} | "
            f"{_f(row['all']['surface_dice'], 3)} | {_f(row['corrupted'].get('dice_kept'))} | "
            f"{_f(row['untouched'].get('dice_kept'))} | {_f(voxels.get('f1'), 3)} | "
            f"{_f(row.get('ranking', {}).get('average_precision'), 2)} | "
            f"{_f(row.get('ranking_by_case_flip_rate', {}).get('average_precision'), 2)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
