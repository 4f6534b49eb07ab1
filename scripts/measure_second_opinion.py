"""A second opinion before a change, measured on real data: the same out-of-fold network on the mirrored image.

For every replicate of a ``nnunetv2_em benchmark`` suite, each training case is predicted again by the round-1
network that held it out, on the image mirrored along its last axis (logits mirrored back). The E-step then runs
with the default per-case noise model, once alone and once with ``second_opinion`` (a change the mirrored
prediction does not confirm becomes ignore, ``estep.agree_on_changes``), gate open and with the precision gate
from 4 verified cases, scored against the clean labels as the benchmark scores them.

    python scripts/measure_second_opinion.py --suite bench_out/suite_lq \\
        --dataset ../shared/data/Dataset004_Hippocampus --out scripts/results/second_opinion.md
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_noise_models import _f, evaluate, held_out_by, replicates, round_one_logits, suite_parser  # noqa: E402

STRENGTH = 100.0  # the default per-case model


def main():
    args = suite_parser(__doc__.split("\n\n")[0]).parse_args()
    rows = []
    for setting, seed, results, folder, benchmark in replicates(args):
        # each training case, again by the round-1 network that held it out, on the image mirrored along its last axis
        cache = round_one_logits(benchmark, os.path.join(folder, "mirrored_logits"), held_out_by(benchmark),
                                 flip_axis=2)
        rows.append({"setting": setting, "seed": seed, "labels": "noisy input",
                     **results["label_quality"]["versions"]["noisy"]})
        for second in (False, True):
            for gate in ("open", "precision"):
                second_of = (lambda case, c=cache: np.load(os.path.join(c, f"{case}.npy")).astype(np.float32)) \
                    if second else None
                result = evaluate(benchmark, strength=STRENGTH, gate=gate, second_of=second_of)
                label = f"per-case T{' + mirrored second opinion' if second else ''}, gate {gate}"
                if gate == "precision":
                    label += f" ({'opened' if result['precision_gate']['opened'] else 'closed'})"
                rows.append({"setting": setting, "seed": seed, "labels": label, **result})
                print(f"{setting} seed {seed} {label}: Dice kept {result['all']['dice_kept']:.4f}, F1 "
                      f"{result['voxels']['f1']:.3f}", flush=True)
    lines = ["# A mirrored second opinion before a change (per-case noise model)", "",
             f"`python scripts/measure_second_opinion.py --suite {args.suite} --dataset {args.dataset} --out "
             f"{args.out}`", "",
             "Training labels against the clean ones (mean over training cases); Dice kept: ignored voxels scored as "
             "the annotation; wrong: share of voxels that differ from the clean labels (ignored ones as annotated); "
             "voxel precision/F1: changed-or-ignored voxels against the wrong ones.", "",
             "| setting | seed | labels | Dice kept | ignored | wrong | corrupted: kept | untouched: kept | "
             "voxel precision | voxel F1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        voxels = row.get("voxels", {})
        wrong = row["all"].get("fraction_wrong")
        lines.append(f"| {row['setting']} | {row['seed']} | {row['labels']} | {_f(row['all']['dice_kept'])} | "
                     f"{row['all']['fraction_ignored']:.2%} | {_f(None if wrong is None else 100 * wrong, 3)} % | "
                     f"{_f(row['corrupted'].get('dice_kept'))} | {_f(row['untouched'].get('dice_kept'))} | "
                     f"{_f(voxels.get('precision'), 3)} | {_f(voxels.get('f1'), 3)} |")
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
