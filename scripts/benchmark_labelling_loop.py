"""Simulated labelling loop (issue 14): learning curves of test Dice per strategy, resumable, one report.

    python scripts/benchmark_labelling_loop.py --dataset ../shared/data/Dataset004_Hippocampus --out bench_out/loop \\
        --records scripts/results/labelling_loop --seeds 0 1 2 --profile cpu --report scripts/results/labelling_loop.md

Start with 10 random pool cases, add 5 per step for 4 steps; each step is one training of the profile's budget.
Rerun the same command after an interruption: finished steps are read back, not retrained. The step records
(``--records``, small JSON files) can be committed: a fresh checkout continues from them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import numpy as np

from nnunetv2_em import storage
from nnunetv2_em.benchmark import labelling_loop


def markdown(summary: dict, command: str) -> str:
    def interval(triple):
        return f"{triple[0]:.3f} [{triple[1]:.3f}, {triple[2]:.3f}]"

    sizes = sorted({int(n) for rows in summary["curves"].values() for n in rows})
    lines = [f"`{command}`", "", f"Pool {summary['pool']} cases, test {summary['test']}, {summary['initial']} labelled "
             f"at random, +{summary['add']} per step; profile {summary['profile']}.", "",
             "| strategy | " + " | ".join(f"{n} labelled" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for strategy, rows in sorted(summary["curves"].items()):
        cells = []
        for n in sizes:
            row = rows.get(n) or rows.get(str(n))
            if row is None:
                cells.append("-")
                continue
            versus = row.get("vs_fg-random")
            cells.append(interval(row["dice"]) + (f"; vs fg-random {versus['difference'][0]:+.3f} "
                                                  f"[{versus['difference'][1]:+.3f}, {versus['difference'][2]:+.3f}],"
                                                  f" won {versus['seeds_won']}/{len(versus['seeds'])}"
                                                  + (f", tied {versus['seeds_tied']}" if versus.get("seeds_tied")
                                                     else "")
                                                  if versus else "") + f" (seeds {len(row['seeds'])})")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "Over the whole curve: test Dice minus fg-random's, paired by seed and test case and averaged over "
              "the steps after the shared start (95 % bootstrap over seeds x test cases; established only with >= 3 "
              "seeds, an interval excluding 0 and every seed on the same side):", ""]
    for strategy, curve in sorted(summary.get("vs_fg-random", {}).items()):
        per_seed = ", ".join(f"{d:+.3f}" for d in curve["per_seed"])
        mean, low, high = curve["difference"]
        lines.append(f"- `{strategy}` - `fg-random`: {mean:+.3f} [{low:+.3f}, {high:+.3f}] over "
                     f"{len(curve['sizes'])} steps, seeds {curve['seeds']} ({per_seed}): {curve['verdict']}.")
    if not summary.get("vs_fg-random"):
        lines.append("- no strategy has finished a seed that fg-random has finished: nothing to compare yet.")
    if summary.get("unfinished"):
        lines += ["", "Left out, not finished yet (the same command continues them): " + "; ".join(
            f"`{strategy}` seed(s) {', '.join(map(str, seeds))}" for strategy, seeds in
            sorted(summary["unfinished"].items())) + "."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    strategies = sorted(summary["curves"])
    for index, strategy in enumerate(strategies):
        rows = summary["curves"][strategy]
        sizes = sorted(int(n) for n in rows)
        means = [rows.get(n, rows.get(str(n)))["dice"] for n in sizes]
        seeds = len(rows.get(sizes[0], rows.get(str(sizes[0])))["seeds"])
        dodge = 0.25 * (index - (len(strategies) - 1) / 2)  # side by side, so that equal curves stay visible
        axis.errorbar([n + dodge for n in sizes], [m[0] for m in means],
                      yerr=np.array([[m[0] - m[1] for m in means], [m[2] - m[0] for m in means]]),
                      label=f"{strategy} ({seeds} seed{'s' if seeds > 1 else ''})", capsize=3, marker="o")
    axis.set_xticks(sorted({int(n) for rows in summary["curves"].values() for n in rows}))
    axis.set_xlabel("labelled cases")
    axis.set_ylabel("test Dice (foreground mean, 95 % bootstrap)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    storage.atomic_write(path, lambda temp: figure.savefig(temp, dpi=120), suffix=".png")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--strategies", nargs="+", default=list(labelling_loop.STRATEGIES))
    parser.add_argument("--pool", type=int, default=100)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--initial", type=int, default=10)
    parser.add_argument("--add", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--records", help="folder of the step and pick records (default <out>/loop)")
    parser.add_argument("--report", help="markdown report (a .json and a .png beside it)")
    parser.add_argument("--report-only", action="store_true",
                        help="report the steps recorded so far; train nothing (a partial run says which seeds)")
    args = parser.parse_args()
    loop = labelling_loop.LabellingLoop(args.dataset, out=args.out, profile=args.profile, strategies=args.strategies,
                                        pool=args.pool, test=args.test, initial=args.initial, add=args.add,
                                        steps=args.steps, records=args.records)
    summary = loop.summary() if args.report_only else loop.run(args.seeds)
    if args.report:
        # the command that trains is the one to rerun; --report-only only reads its records
        command = "python scripts/benchmark_labelling_loop.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]
                                                                           if a != "--report-only")
        storage.write_text(args.report, markdown(summary, command))
        storage.write_json(os.path.splitext(args.report)[0] + ".json", summary)
        plot(summary, os.path.splitext(args.report)[0] + ".png")
    print(markdown(summary, "(this run)"))


if __name__ == "__main__":
    main()
