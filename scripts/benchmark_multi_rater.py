"""Several annotators per case on real images: EM with per-rater noise models vs first rater, majority vote and
STAPLE, each trained by vanilla nnU-Net with the same seeds (issue 30, items 3 and 4).

    python scripts/benchmark_multi_rater.py --dataset ../shared/data/Dataset004_Hippocampus \
        --out bench_out/multi_rater --records scripts/results/multi_rater --seeds 0 1 2 \
        --report scripts/results/multi_rater.md

The noise suite's split (``--split-seed``, profile ``cpu-long``: 40 training and 20 test cases). Three simulated
annotators after Zhang et al. (NeurIPS 2020) delineate the training cases from the clean labels, each of their
type on one structure drawn per case (``noise.annotator``, one voxel of dilation or erosion): ``r1_over``,
``r2_under``, ``r3_wrong`` (dilated and cut by three planes). A quarter of the cases (drawn once) carry the first
rater only. The raters are drawn once (``--rater-seed``); training seeds vary. Arms, all trained the same way
(profile trainer, ``fold all``, the training seed) on datasets that all declare the ignore label, so nnU-Net's patch
sampler is the same in every arm (see ``measure_sampler_confound.py``); they differ only by their training labels:

- ``first``: the first rater's labels; ``majority`` and ``staple``: ``fusion.fuse_dataset`` (SimpleITK's
  multi-label STAPLE), i.e. ``nnunetv2_em fuse``;
- ``em``: ``nnunetv2_em run`` (the profile's folds and rounds, ``--rounds`` to change) on the multi-rater dataset
  whose ``labelsTr`` starts as the STAPLE labels, then the same final training on its last round's labels;
- ``clean``: the clean labels (the ceiling).

Per seed a small record goes to ``--records/seed_<s>.json`` (test Dice per case and arm, label Dice per case and
arm against the clean labels, the raters' planted and fitted matrices), committed, so ``--report-only`` recomputes
the report; bulk output stays in ``--out``; every step is skipped once done, so the same command continues. Figure
of merit (Zhang et al.): the share of the STAPLE-to-clean test-Dice gap that EM recovers. About 75 minutes a seed on
2 cores with ``cpu-long``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import numpy as np

RATERS = {"r1_over": "over", "r2_under": "under", "r3_wrong": "wrong"}  # name: Zhang et al.'s annotator type
SINGLE_RATER_SHARE = 0.25  # cases only the first rater annotated
ARM_IDS = {"noisy": 975, "em": 974, "rated": 970, "first": 971, "majority": 972, "staple": 973}
ARMS = ("first", "majority", "staple", "em", "clean")  # "clean" is the harness's "noisy" dataset (clean labels)
FUSED = ("first", "majority", "staple")


def _dataset_arm(arm: str) -> str:
    return "noisy" if arm == "clean" else arm


def simulate_raters(clean: dict, *, seed: int) -> tuple[dict, dict]:
    """``{rater: {case: label (z, y, x)}}`` of the simulated annotators and ``{rater: {case: record}}``."""
    from nnunetv2_em.benchmark import noise

    cases = sorted(clean)
    rng = np.random.default_rng(seed)
    single = set(rng.choice(cases, size=int(round(SINGLE_RATER_SHARE * len(cases))), replace=False).tolist())
    labels, records = {}, {}
    for index, (rater, kind) in enumerate(RATERS.items()):
        labels[rater], records[rater] = {}, {}
        for case in cases:
            if index > 0 and case in single:
                continue
            case_rng = np.random.default_rng([seed, index, cases.index(case)])
            labels[rater][case], records[rater][case] = noise.annotator(clean[case], rng=case_rng, kind=kind, k=1)
    return labels, records


def planted_matrices(clean: dict, rated: dict, *, num_classes: int) -> np.ndarray:
    """``(R, C, C)`` each rater's empirical ``T[true, annotated]`` over every voxel they annotated."""
    matrices = np.zeros((len(rated), num_classes, num_classes))
    for r, labels in enumerate(rated.values()):
        for case, label in labels.items():
            np.add.at(matrices[r], (clean[case].ravel(), label.ravel()), 1)
    return matrices / np.maximum(matrices.sum(axis=2, keepdims=True), 1)


def prepare(benchmark, split: dict, *, rater_seed: int) -> dict:
    """The multi-rater dataset, the fused baselines and the EM arm's dataset (once); the planted raters' records."""
    from nnunetv2_em import fusion, label_conventions, multi_rater, storage
    from nnunetv2_em.benchmark.label_files import read_label, write_label_like

    workspace = benchmark.workspace
    marker = os.path.join(workspace.out, "raters.json")
    if os.path.isfile(marker):
        with open(marker) as handle:
            return json.load(handle)
    os.environ.update({k: v for k, v in workspace.env().items() if k.startswith("nnUNet")})
    clean = {case: read_label(benchmark.cases[case]["label"]) for case in split["train"]}
    labels, records = simulate_raters(clean, seed=rater_seed)
    first = next(iter(RATERS))
    benchmark._write_dataset("rated", split["train"], labels[first])
    rated_raw = workspace.raw("rated")
    for rater, cases in labels.items():
        for case, label in cases.items():
            write_label_like(label, benchmark.cases[case]["label"],
                             multi_rater.rater_label_path(rated_raw, rater, case, benchmark.ending))
    storage.write_json(multi_rater.raters_path(rated_raw),
                       {"version": 1, "raters": {rater: sorted(cases) for rater, cases in labels.items()}})
    for method in FUSED:
        shutil.rmtree(workspace.raw(method), ignore_errors=True)
        fusion.fuse_dataset(workspace.dataset("rated"), workspace.dataset(method), method=method)
    # the EM arm: the raters, with labelsTr starting from the STAPLE labels
    benchmark._write_dataset("em", split["train"], label_files={
        case: os.path.join(workspace.raw("staple"), "labelsTr", case + benchmark.ending) for case in split["train"]})
    shutil.copytree(os.path.join(rated_raw, "em_raters"), os.path.join(workspace.raw("em"), "em_raters"))
    shutil.copy(multi_rater.raters_path(rated_raw), multi_rater.raters_path(workspace.raw("em")))
    for arm in ("em", "noisy"):  # every arm declares the ignore label (the fused ones already do)
        path = os.path.join(workspace.raw(arm), "dataset.json")
        with open(path) as handle:
            storage.write_json(path, label_conventions.with_ignore_label(json.load(handle)))
    planted = planted_matrices(clean, labels, num_classes=len(benchmark.classes) + 1)
    result = {"rater_seed": rater_seed, "raters": RATERS, "records": records,
              "single_rater_cases": sorted(set(split["train"]) - set(labels[list(RATERS)[1]])),
              "planted_transitions": planted.tolist()}
    storage.write_json(marker, result)  # last: marks the preparation complete
    return result


def label_dice(benchmark, split: dict) -> dict:
    """Per arm and training case: foreground-mean label Dice against the clean label, ignored voxels kept at the
    label the arm started from (``kept``, honest) and left out (``flattering``), and the ignored share."""
    from nnunetv2_em.benchmark import metrics
    from nnunetv2_em.benchmark.label_files import read_label

    workspace = benchmark.workspace
    staple = {case: read_label(os.path.join(workspace.raw("staple"), "labelsTr", case + benchmark.ending))
              for case in split["train"]}
    result = {}
    for arm in ("first", "majority", "staple", "em"):
        result[arm] = {}
        for case in split["train"]:
            clean = read_label(benchmark.cases[case]["label"])
            labels = read_label(os.path.join(workspace.raw(arm), "labelsTr", case + benchmark.ending))
            scores = metrics.label_scores(clean, labels, classes=benchmark.classes,
                                          ignore_label=benchmark.ignore_label,
                                          annotation=staple[case] if arm == "em" else labels)
            result[arm][case] = {
                "kept": float(np.mean([scores[f"dice_kept_{c}"] for c in benchmark.classes])),
                "flattering": float(np.mean([scores[f"dice_{c}"] for c in benchmark.classes])),
                "ignored": scores["fraction_ignored"]}
    return result


def fitted_matrices(benchmark) -> list | None:
    """The last round's fitted global ``T_r`` of the EM run, ``(R, C, C)`` as lists (None before the run)."""
    layout = benchmark.workspace.em_run(benchmark.profile)
    last = None
    for round_index in range(1, benchmark.profile.rounds + 1):
        path = layout.round_file(round_index, "fit.json")
        if os.path.isfile(path):
            last = path
    if last is None:
        return None
    with open(last) as handle:
        raters = json.load(handle).get("raters")
    return None if raters is None else raters["transitions"]


def measure_seed(dataset: str, out: str, *, split_seed: int, training_seed: int, profile: str,
                 rounds: int | None, rater_seed: int) -> dict:
    from nnunetv2_em.benchmark import harness

    benchmark = harness.Benchmark(dataset, "clean", seed=split_seed, profile=profile,
                                  out=os.path.join(out, f"seed_{training_seed}"), training_seed=training_seed)
    if rounds is not None:
        benchmark.profile = dataclasses.replace(benchmark.profile, rounds=rounds)
    benchmark.workspace.ids.update(ARM_IDS)
    split = benchmark.prepare()  # the split, the test folder and the clean training labels ("noisy")
    raters = prepare(benchmark, split, rater_seed=rater_seed)
    scores = {}
    for arm in ARMS:
        dataset_arm = _dataset_arm(arm)
        benchmark._plan(dataset_arm)  # nnU-Net's own planner; the EM arm: nnunetv2_em plan + the profile's settings
        if arm == "em":
            benchmark._run_em()
        harness.train_final(benchmark.workspace, dataset_arm, benchmark.profile, log_name=arm,
                            seed_arguments=["--seed", str(training_seed)])
        harness.predict_test(benchmark.workspace, dataset_arm, benchmark.profile, classes=benchmark.classes,
                             ending=benchmark.ending, name=arm)
        scores[arm] = harness.test_dice(benchmark.workspace, arm, classes=benchmark.classes,
                                        ending=benchmark.ending, seed=split_seed)["per_case"]
    return {"split_seed": split_seed, "training_seed": training_seed, "rater_seed": rater_seed, "profile": profile,
            "rounds": benchmark.profile.rounds, "folds": benchmark.profile.folds, "trainer": benchmark.profile.trainer,
            "configuration": benchmark.profile.configuration, "test_cases": split["test"], "test_dice": scores,
            "label_dice": label_dice(benchmark, split), "single_rater_cases": raters["single_rater_cases"],
            "planted_transitions": raters["planted_transitions"], "fitted_transitions": fitted_matrices(benchmark)}


def report(records: list[dict]) -> tuple[str, dict]:
    from nnunetv2_em.benchmark import metrics

    records = sorted(records, key=lambda r: r["training_seed"])
    cases = records[0]["test_cases"]

    def mean_test(arm):
        return float(np.mean([np.mean([r["test_dice"][arm][c] for c in cases]) for r in records]))

    def mean_label(arm, variant):
        return float(np.mean([np.mean([v[variant] for v in r["label_dice"][arm].values()]) for r in records]))

    summary = {"seeds": [r["training_seed"] for r in records], "arms": {}, "differences": {}}
    lines = ["# Several annotators per case: EM with per-rater noise models vs first rater, majority vote, STAPLE", "",
             f"Split seed {records[0]['split_seed']}, profile `{records[0]['profile']}` ({records[0]['trainer']}, "
             f"{records[0]['configuration']}), EM {records[0]['folds']} folds x {records[0]['rounds']} round(s) "
             f"from the STAPLE labels, {len(cases)} test cases, training seeds {summary['seeds']}; raters "
             f"{', '.join(f'`{n}` ({k})' for n, k in RATERS.items())}, {len(records[0]['single_rater_cases'])} "
             f"training cases with the first rater only (rater seed {records[0]['rater_seed']}). Every arm declares "
             "the ignore label (same patch sampler).", "",
             "| arm | test Dice (mean over seeds) | training-label Dice vs clean, ignored kept / left out | ignored |",
             "|---|---|---|---|"]
    for arm in ARMS:
        entry = {"test_dice": mean_test(arm)}
        if arm != "clean":
            entry.update({"label_dice_kept": mean_label(arm, "kept"),
                          "label_dice_flattering": mean_label(arm, "flattering"),
                          "ignored": mean_label(arm, "ignored")})
            lines.append(f"| {arm} | {entry['test_dice']:.4f} | {entry['label_dice_kept']:.4f} / "
                         f"{entry['label_dice_flattering']:.4f} | {100 * entry['ignored']:.2f} % |")
        else:
            lines.append(f"| clean | {entry['test_dice']:.4f} | 1 | 0 |")
        summary["arms"][arm] = entry
    lines += ["", "| paired difference (test Dice, seeds x test cases) | mean [95 % interval] | per seed | verdict |",
              "|---|---|---|---|"]
    for arm, baseline in (("em", "staple"), ("em", "majority"), ("em", "first"), ("staple", "majority"),
                          ("clean", "staple")):
        differences = np.array([[r["test_dice"][arm][c] - r["test_dice"][baseline][c] for c in cases]
                                for r in records])
        per_seed = differences.mean(axis=1)
        interval = metrics.paired_bootstrap(differences, seed=0)
        verdict = metrics.difference_verdict(per_seed, interval)
        summary["differences"][f"{arm}-{baseline}"] = {"interval": interval, "per_seed": per_seed.tolist(),
                                                       "verdict": verdict}
        lines.append(f"| {arm} - {baseline} | {interval[0]:+.4f} [{interval[1]:+.4f}, {interval[2]:+.4f}] | "
                     f"{', '.join(f'{d:+.4f}' for d in per_seed)} | {verdict} |")
    share = metrics.recovery_share(summary["arms"]["staple"]["test_dice"], summary["arms"]["em"]["test_dice"],
                                   summary["arms"]["clean"]["test_dice"])
    summary["staple_to_clean_gap_recovered"] = share
    lines += ["", f"Share of the STAPLE-to-clean test-Dice gap EM recovers (Zhang et al.'s figure of merit): "
              f"**{share:.0%}** (mean over seeds; not established unless the em - staple row says so)."]
    fitted = [r for r in records if r["fitted_transitions"] is not None]
    if fitted:
        planted = np.asarray(fitted[0]["planted_transitions"])
        errors = [float(np.abs(np.asarray(r["fitted_transitions"]) - planted).max()) for r in fitted]
        summary["rater_matrix_max_error"] = errors
        lines += ["", "Raters' global matrices fitted by the last EM round vs the planted ones (empirical over the "
                  "voxels each rater annotated): largest entry error per seed "
                  f"{', '.join(f'{e:.3f}' for e in errors)}."]
    return "\n".join(lines) + "\n", summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True, help="bulk output (datasets, models, predictions)")
    parser.add_argument("--records", required=True, help="folder of per-seed records (small JSON, committed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--rater-seed", type=int, default=0)
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--rounds", type=int, help="EM rounds (default: the profile's)")
    parser.add_argument("--report", help="write the report (markdown) here, and its summary beside it (.json)")
    parser.add_argument("--report-only", action="store_true", help="report the records; train nothing")
    args = parser.parse_args(argv)

    from nnunetv2_em import storage
    from nnunetv2_em.benchmark.records import seed_records

    records = seed_records(
        args.records, [] if args.report_only else args.seeds,
        lambda seed: measure_seed(args.dataset, os.path.abspath(args.out), split_seed=args.split_seed,
                                 training_seed=seed, profile=args.profile, rounds=args.rounds,
                                 rater_seed=args.rater_seed),
        belongs=lambda record: (record["split_seed"], record["profile"], record["rater_seed"]) == (
            args.split_seed, args.profile, args.rater_seed))
    if not records:
        print("no records yet", file=sys.stderr)
        return 1
    text, summary = report(records)
    print(text)
    if args.report:
        storage.write_text(args.report, text)
        storage.write_json(os.path.splitext(args.report)[0] + ".json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
