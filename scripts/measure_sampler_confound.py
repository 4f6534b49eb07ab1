"""Does declaring nnU-Net's ignore label change training, with no voxel ignored? (issue 26, item 1)

    python scripts/measure_sampler_confound.py --dataset ../shared/data/Dataset004_Hippocampus \
        --out bench_out/sampler --records scripts/results/sampler_confound --seeds 0 1 2 \
        --report scripts/results/sampler_confound.md

When ``dataset.json`` declares an ignore label, nnU-Net's data loader centres every patch that is not forced to hold
foreground on a random annotated voxel instead of drawing a uniform box (``data_loader.py``, ``get_bbox``, the
``has_ignore`` branch). The benchmark's vanilla arm trains without an ignore label, its EM and cleanlab arms with
one, so the `clean` control's EM - vanilla (-0.008 test Dice, 3 of 3 seeds) may come from the sampler rather than
from the 0.27 % of voxels EM ignores. Here both arms train on the same clean labels of the benchmark's split (the
``clean`` setting, ``--split-seed``), with the same trainer, budget and training seed; the only difference is
``"ignore": 3`` in the second arm's ``dataset.json`` (no voxel carries it). Each seed's per-test-case Dice goes to a
small JSON record in ``--records`` (committed), so ``--report-only`` recomputes the report from them; the bulk
output (datasets, models, predictions) stays in ``--out``. Every step is skipped once done: the same command
continues an interrupted measurement. About 15 minutes per seed on 2 cores with ``cpu-long``.

The verdict uses the noise suite's rule (``metrics.difference_verdict``: >= 3 seeds, a paired bootstrap interval
over seeds x test cases that excludes 0, every seed on the same side), plus a two-sided sign test over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ARM_IDS = {"vanilla": 961, "ignore_declared": 966}


def _binomial_two_sided(wins: int, n: int) -> float:
    """Two-sided sign-test p-value for ``wins`` of ``n`` seeds on one side (ties dropped beforehand)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(wins, n - wins) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def measure_seed(dataset: str, out: str, *, split_seed: int, training_seed: int, profile: str) -> dict:
    from nnunetv2_em import label_conventions, storage
    from nnunetv2_em.benchmark import harness

    benchmark = harness.Benchmark(dataset, "clean", seed=split_seed, profile=profile,
                                  out=os.path.join(out, f"seed_{training_seed}"), training_seed=training_seed)
    benchmark.workspace.ids.update(ARM_IDS)
    benchmark.workspace.ids["noisy"] = ARM_IDS["vanilla"]
    split = benchmark.prepare()  # the clean setting: the "noisy" dataset holds the clean training labels
    ignore_raw = benchmark.workspace.raw("ignore_declared")
    if not os.path.isfile(os.path.join(ignore_raw, "dataset.json")):
        source = benchmark.workspace.raw("noisy")
        benchmark._write_dataset("ignore_declared", split["train"], label_files={
            case: os.path.join(source, "labelsTr", case + benchmark.ending) for case in split["train"]})
        path = os.path.join(ignore_raw, "dataset.json")
        with open(path) as handle:
            dataset_json = json.load(handle)
        storage.write_json(path, label_conventions.with_ignore_label(dataset_json))
    scores = {}
    for arm, dataset_arm in (("vanilla", "noisy"), ("ignore_declared", "ignore_declared")):
        benchmark._plan(dataset_arm)  # nnU-Net's own planner for both
        harness.train_final(benchmark.workspace, dataset_arm, benchmark.profile, log_name=arm,
                            seed_arguments=["--seed", str(training_seed)])
        harness.predict_test(benchmark.workspace, dataset_arm, benchmark.profile, classes=benchmark.classes,
                             ending=benchmark.ending, name=arm)
        scores[arm] = harness.test_dice(benchmark.workspace, arm, classes=benchmark.classes,
                                        ending=benchmark.ending, seed=split_seed)["per_case"]
    return {"split_seed": split_seed, "training_seed": training_seed, "profile": profile,
            "trainer": benchmark.profile.trainer, "configuration": benchmark.profile.configuration,
            "test_cases": split["test"], "test_dice": scores}


def report(records: list[dict]) -> tuple[str, dict]:
    import numpy as np

    from nnunetv2_em.benchmark import metrics

    records = sorted(records, key=lambda r: r["training_seed"])
    cases = records[0]["test_cases"]
    differences = np.array([[r["test_dice"]["ignore_declared"][c] - r["test_dice"]["vanilla"][c] for c in cases]
                            for r in records])
    per_seed = differences.mean(axis=1)
    interval = metrics.paired_bootstrap(differences, seed=0)
    verdict = metrics.difference_verdict(per_seed, interval)
    higher, lower = int((per_seed > 0).sum()), int((per_seed < 0).sum())
    sign_p = _binomial_two_sided(higher, higher + lower)
    summary = {"seeds": [r["training_seed"] for r in records], "split_seed": records[0]["split_seed"],
               "profile": records[0]["profile"], "per_seed_difference": per_seed.tolist(),
               "difference": interval, "verdict": verdict, "sign_test_p": sign_p,
               "vanilla": float(np.mean([np.mean(list(r["test_dice"]["vanilla"].values())) for r in records])),
               "ignore_declared": float(np.mean([np.mean(list(r["test_dice"]["ignore_declared"].values()))
                                                 for r in records]))}
    lines = [
        "# Sampler confound: vanilla nnU-Net with and without a declared (unused) ignore label",
        "",
        f"Clean labels of split seed {summary['split_seed']}, profile `{summary['profile']}` "
        f"({records[0]['trainer']}, {records[0]['configuration']}), {len(cases)} test cases, training seeds "
        f"{summary['seeds']}. Arms differ only by `\"ignore\": 3` in `dataset.json` (no voxel carries it), which "
        f"switches nnU-Net's patch sampler from uniform boxes to patches centred on annotated voxels.",
        "",
        "| training seed | vanilla | ignore declared | difference |",
        "|---|---|---|---|",
    ]
    for record, difference in zip(records, per_seed, strict=True):
        lines.append(f"| {record['training_seed']} | {np.mean(list(record['test_dice']['vanilla'].values())):.4f} | "
                     f"{np.mean(list(record['test_dice']['ignore_declared'].values())):.4f} | {difference:+.4f} |")
    lines += [
        f"| mean | {summary['vanilla']:.4f} | {summary['ignore_declared']:.4f} | "
        f"{interval[0]:+.4f} [{interval[1]:+.4f}, {interval[2]:+.4f}] |",
        "",
        f"Paired difference (ignore declared - vanilla) over seeds x test cases, 95 % bootstrap resampling both: "
        f"**{interval[0]:+.4f} [{interval[1]:+.4f}, {interval[2]:+.4f}]**; verdict (the suite's rule): **{verdict}**; "
        f"sign test over seeds: {higher} higher, {lower} lower, two-sided p = {sign_p:.3f}.",
        "",
        "For comparison, the noise suite's `clean` control (docs/benchmark.md): EM - vanilla = -0.008 "
        "[-0.015, -0.002], every seed lower, with 0.27 % of voxels ignored.",
    ]
    return "\n".join(lines) + "\n", summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True, help="bulk output (datasets, models, predictions)")
    parser.add_argument("--records", required=True, help="folder of per-seed records (small JSON, committed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--report", help="write the report (markdown) here, and its summary beside it (.json)")
    parser.add_argument("--report-only", action="store_true", help="report the records; train nothing")
    args = parser.parse_args(argv)

    from nnunetv2_em import storage
    from nnunetv2_em.benchmark.records import seed_records

    records = seed_records(
        args.records, [] if args.report_only else args.seeds,
        lambda seed: measure_seed(args.dataset, os.path.abspath(args.out), split_seed=args.split_seed,
                                 training_seed=seed, profile=args.profile),
        belongs=lambda record: (record["split_seed"], record["profile"]) == (args.split_seed, args.profile))
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
