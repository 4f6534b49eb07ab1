"""EXAMINE scores at scale: the one-SVD path for 50,000 cases, and its agreement with exact leave-one-out.

    python scripts/benchmark_examine.py --out scripts/results/examine_timing.md

Embeddings are synthetic (a few dominant directions plus noise, the shape of pooled encoder features: 320 channels,
nnU-Net's widest stage); the timing does not depend on what the features mean.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from nnunetv2_em import selection, storage


def embeddings(n: int, d: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)) @ rng.normal(size=(8, d)) + 0.3 * rng.normal(size=(n, d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=320)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for n in (500, args.cases):
        z = embeddings(n, args.features, seed=n)
        started = time.perf_counter()
        fast = selection.examine_scores(z)
        fast_seconds = time.perf_counter() - started
        row = {"cases": n, "features": args.features, "fast_seconds": fast_seconds}
        if n <= 2000:
            started = time.perf_counter()
            exact = selection.examine_scores(z, exact=True)
            row["exact_seconds"] = time.perf_counter() - started
            row["max_relative_difference"] = float(np.max(np.abs(fast - exact) / exact))
        rows.append(row)
        print(row, flush=True)
    lines = ["# EXAMINE scores: one SVD for all cases", "",
             f"`python scripts/benchmark_examine.py --cases {args.cases} --features {args.features}` on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (numpy {np.__version__}).", "",
             "| cases x features | one-SVD path | exact leave-one-out | max relative difference |", "|---|---|---|---|"]
    for row in rows:
        exact = f"{row['exact_seconds']:.2f} s" if "exact_seconds" in row else "not run (one SVD per case)"
        difference = f"{row['max_relative_difference']:.1e}" if "max_relative_difference" in row else "-"
        lines.append(f"| {row['cases']:,} x {row['features']} | {row['fast_seconds']:.2f} s | {exact} | "
                     f"{difference} |")
    storage.write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
