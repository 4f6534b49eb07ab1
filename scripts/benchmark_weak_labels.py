"""Partial and weak labels on real data (issue 12): regimes x training seeds, resumable, one report.

    python scripts/benchmark_weak_labels.py --dataset ../shared/data/Dataset004_Hippocampus \\
        --regimes full partial weak --seeds 0 1 2 --profile cpu --out bench_out/weak \\
        --report scripts/results/weak_labels.md

Each replicate is skipped step by step once done (rerun the same command after an interruption). The report is
written from the replicates that are complete, so it can be regenerated at any time with ``--report-only``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from nnunetv2_em import checks, storage
from nnunetv2_em.benchmark import weak_regimes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--regimes", nargs="+", default=list(weak_regimes.REGIMES), choices=weak_regimes.REGIMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0, help="split and regime assignment (fixed)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", help="markdown report (a .json with the summary beside it)")
    parser.add_argument("--report-only", action="store_true", help="summarize the complete replicates only")
    args = parser.parse_args()
    if args.report_only:
        summary = weak_regimes.summarize(weak_regimes.load_replicates(args.out))
    else:
        summary = weak_regimes.run_suite(args.dataset, regimes=args.regimes, seeds=args.seeds, profile=args.profile,
                                         out=args.out, data_seed=args.data_seed)
    if args.report:
        dataset_json = checks.load_dataset_json(os.path.join(args.dataset, "dataset.json"))
        classes = {str(v): name for name, v in dataset_json["labels"].items()
                   if name not in ("background", "ignore") and int(v) > 0}
        command = "python scripts/benchmark_weak_labels.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:] if a != "--report-only")
        text = weak_regimes.markdown(summary, command=command, classes=classes)

        def write(temp: str) -> None:
            with open(temp, "w") as handle:
                handle.write(text)

        storage.atomic_write(args.report, write, suffix=".md")
        storage.write_json(os.path.splitext(args.report)[0] + ".json", summary)
    print(json.dumps({regime: {arm: row["foreground"] for arm, row in entry["test"].items()}
                      for regime, entry in summary["regimes"].items()}, indent=1))


if __name__ == "__main__":
    main()
