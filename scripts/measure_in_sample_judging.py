"""Why ``EMTrainer`` never judges a case with the network that trained on it, measured on real data.

Each replicate of a ``nnunetv2_em benchmark`` suite ran a 2-fold ``nnunetv2_em run``: fold g's network trained on
the other fold's cases. For every training case this script has two sets of logits from round 1: **out-of-fold**
(the network that held the case out, kept by the run) and **in-sample** (the other fold's network, which trained on
the case's noisy label: what a single training's E-step sees). Each set goes through the same E-step as a run (the
same sampling, fit and refinement functions and settings), gate as the run would decide it and forced open, and
is scored against the clean labels as the benchmark scores labels.

    python scripts/measure_in_sample_judging.py --suite bench_out/suite_lq \\
        --dataset ../shared/data/Dataset004_Hippocampus --out scripts/results/in_sample_judging.md
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_noise_models import (  # noqa: E402
    _f,
    evaluate,
    fit_like_a_run,
    held_out_by,
    replicates,
    round_one_logits,
    suite_parser,
)


def trained_on_by(benchmark) -> dict[str, int]:
    """{case: a fold whose round-1 network trained on it} (with 2 folds: the other fold)."""
    held_out = held_out_by(benchmark)
    folds = sorted(set(held_out.values()))
    return {case: next(f for f in folds if f != fold) for case, fold in held_out.items()}


def main():
    args = suite_parser(__doc__.split("\n\n")[0]).parse_args()
    rows = []
    for setting, seed, results, folder, benchmark in replicates(args):
        with open(os.path.join(folder, "split.json")) as handle:
            cases = json.load(handle)["train"]
        layout = benchmark.workspace.em_run(benchmark.profile)
        cache = round_one_logits(benchmark, os.path.join(folder, "in_sample_logits"), trained_on_by(benchmark))
        sources = {"out-of-fold": lambda case, lay=layout: np.load(lay.logits_file(1, case)).astype(np.float32),
                   "in-sample": lambda case, c=cache: np.load(os.path.join(c, f"{case}.npy")).astype(np.float32)}
        rows.append({"setting": setting, "seed": seed, "labels": "noisy input",
                     **results["label_quality"]["versions"]["noisy"]})
        for source, logits_of in sources.items():
            fit = fit_like_a_run(benchmark, cases, logits_of)
            for gate in ("as run", "open"):
                result = evaluate(benchmark, strength=None, gate=gate, logits_of=logits_of, fit=fit)
                rows.append({"setting": setting, "seed": seed, "labels": f"{source}, gate {gate}",
                             "model_dice": fit["model_dice"], "temperature": fit["noise_model"]["temperature"],
                             "gate_open": fit["refine"], **result})
                print(f"{setting} seed {seed} {source} gate {gate}: Dice kept {result['all']['dice_kept']:.4f}, "
                      f"F1 {result['voxels']['f1']:.3f}", flush=True)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as handle:
        json.dump(rows, handle, indent=1)
    lines = ["# Judging cases in-sample vs out-of-fold (same networks, same E-step)", "",
             f"`python scripts/measure_in_sample_judging.py --suite {args.suite} --dataset {args.dataset} "
             f"--out {args.out}`", "",
             "Training labels against the clean ones (mean over training cases). Dice kept: ignored voxels scored as "
             "the annotation. Network Dice: with the noisy annotation (what the Dice gate reads). Voxel F1/precision: "
             "changed-or-ignored voxels against the wrong voxels.", "",
             "| setting | seed | labels | network Dice | temperature | Dice kept | ignored | corrupted: kept | "
             "untouched: kept | voxel precision | voxel recall | voxel F1 | AP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        voxels = row.get("voxels", {})
        lines.append(f"| {row['setting']} | {row['seed']} | {row['labels']} | {_f(row.get('model_dice'), 3)} | "
                     f"{_f(row.get('temperature'), 2)} | {_f(row['all']['dice_kept'])} | "
                     f"{row['all']['fraction_ignored']:.2%} | {_f(row['corrupted'].get('dice_kept'))} | "
                     f"{_f(row['untouched'].get('dice_kept'))} | {_f(voxels.get('precision'), 3)} | "
                     f"{_f(voxels.get('recall'), 3)} | {_f(voxels.get('f1'), 3)} | "
                     f"{_f(row.get('ranking', {}).get('average_precision'), 2)} |")
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
