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

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_noise_models import _f, evaluate  # noqa: E402

from nnunetv2_em import oof  # noqa: E402
from nnunetv2_em.benchmark import suite  # noqa: E402
from nnunetv2_em.benchmark.harness import Benchmark  # noqa: E402

STRENGTH = 100.0  # the default per-case model


def mirrored_logits(benchmark: Benchmark, cache: str) -> str:
    """Each training case predicted by the round-1 network that held it out, on the mirrored image."""
    layout = benchmark.workspace.em_run(benchmark.profile)
    with open(layout.round_file(1, "out_of_fold.json")) as handle:
        held_out_by = json.load(handle)
    images = os.path.join(benchmark.workspace.preprocessed("em"), f"nnUNetPlans_{benchmark.profile.configuration}")
    for fold in sorted(set(held_out_by.values())):
        oof.predict_cases(layout.model_folder(1), [fold], {c: images for c, f in held_out_by.items() if f == fold},
                          cache, mirroring=False, device="cpu", flip_axis=2)
    return cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--corruption-seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for (setting, seed), results in sorted(suite.load_replicates(args.suite).items()):
        folder = suite.replicate_folder(args.suite, setting, seed)
        benchmark = Benchmark(args.dataset, setting, seed=args.corruption_seed, profile=args.profile, out=folder,
                              training_seed=seed, label_quality_only=True)
        cache = mirrored_logits(benchmark, os.path.join(folder, "mirrored_logits"))
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
