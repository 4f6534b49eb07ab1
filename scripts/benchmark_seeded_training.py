"""What a seeded (repeatable) training costs, and whether it repeats, with the CPU budget on real data.

    python scripts/benchmark_seeded_training.py --data ../shared/data/Dataset004_Hippocampus --out bench_out/seeded

Trains fold 0 of the 200 real Hippocampus cases (2d, VanillaTrainer_cpu, ``--epochs`` of its 40-iteration epochs)
three times: unseeded with nnU-Net's multi-process augmentation (nnUNet_n_proc_DA=2, the usual setting here), and
twice with ``--seed 0`` (augmentation in the training process). Reports nnU-Net's logged epoch times (the first
epoch, which includes start-up, left out) and whether the two seeded trainings gave bit-identical weights. Writes
results.json and results.md to --out. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

DATASET_ID = 943
DATASET = "Dataset943_HippoSeed"
TRAINER = "VanillaTrainer_cpu"


def _env(root: str, results: str) -> dict:
    return {**os.environ, "nnUNet_raw": os.path.join(root, "raw"),
            "nnUNet_preprocessed": os.path.join(root, "preprocessed"), "nnUNet_results": results,
            "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "nnUNet_compile": "f"}


def train(root: str, name: str, epochs: int, seed: int | None) -> dict:
    import torch

    results = os.path.join(root, name)
    fold = os.path.join(results, DATASET, f"{TRAINER}__nnUNetPlans__2d", "fold_0")
    if not os.path.isfile(os.path.join(fold, "checkpoint_final.pth")):
        shutil.rmtree(results, ignore_errors=True)
        command = [sys.executable, "-m", "nnunetv2_em.mstep", DATASET, "2d", "0", "--trainer", TRAINER, "--device",
                   "cpu", "--no-validation", "--epoch-fraction", str(epochs / 20)]
        if seed is not None:
            command += ["--seed", str(seed)]
        subprocess.run(command, env=_env(root, results), check=True, capture_output=True)
    log = "".join(open(os.path.join(fold, f)).read() for f in sorted(os.listdir(fold)) if f.startswith("training_log"))
    epoch_seconds = [float(value) for value in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    weights = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu",
                         weights_only=False)["network_weights"]
    return {"epoch_seconds": epoch_seconds, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    import numpy as np
    import torch

    root = os.path.abspath(os.path.join(args.out, "nnunet"))
    raw = os.path.join(root, "raw", DATASET)
    if not os.path.isdir(raw):
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        shutil.copytree(os.path.abspath(args.data), raw, ignore=shutil.ignore_patterns("imagesTs", "em_labels"))
    if not os.path.isdir(os.path.join(root, "preprocessed", DATASET, "nnUNetPlans_2d")):
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnunetv2_em"), "plan", "-d", str(DATASET_ID),
                        "-c", "2d", "-np", "2"], env=_env(root, os.path.join(root, "results")), check=True)
    arms = {"unseeded, 2 augmentation workers": train(root, "results_unseeded", args.epochs, None),
            "seed 0 (augmentation in process)": train(root, "results_seed0_a", args.epochs, 0),
            "seed 0 again": train(root, "results_seed0_b", args.epochs, 0)}
    first, again = arms["seed 0 (augmentation in process)"]["weights"], arms["seed 0 again"]["weights"]
    identical = all(torch.equal(first[key], again[key]) for key in first)
    unseeded = arms["unseeded, 2 augmentation workers"]["weights"]
    summary = {
        "command": f"python scripts/benchmark_seeded_training.py --data {args.data} --out {args.out} "
                   f"--epochs {args.epochs}",
        "trainer": TRAINER, "cases": "200 (fold 0: 160 train / 40 val)", "epochs": args.epochs,
        "mean_epoch_seconds_after_the_first": {name: round(float(np.mean(arm["epoch_seconds"][1:])), 2)
                                               for name, arm in arms.items()},
        "seeded_trainings_bit_identical": identical,
        "unseeded_differs_from_seeded": any(not torch.equal(first[key], unseeded[key]) for key in first),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    lines = [f"`{summary['command']}`", "", "| training | mean epoch time (s), epochs 2+ |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary["mean_epoch_seconds_after_the_first"].items()]
    lines += ["", f"Two seeded trainings bit-identical: {identical}. Unseeded differs from seeded: "
                  f"{summary['unseeded_differs_from_seeded']}."]
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
