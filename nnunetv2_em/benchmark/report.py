"""The benchmark's report: results.json, report.md and PNG plots in the output folder."""

from __future__ import annotations

import json
import os

import numpy as np

from nnunetv2_em import label_store

ARMS = ("noisy", "em", "clean")
TITLES = {"noisy": "(a) vanilla, noisy labels", "em": "(b) EM, noisy labels", "clean": "(c) vanilla, clean labels"}


def _ci(triple) -> str:
    mean, low, high = triple
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown(results: dict) -> str:
    test = results["test_dice"]
    classes = list(test["noisy"]["per_class"])
    lines = [f"# EM vs vanilla nnU-Net: noise `{results['noise']['name']}` ({results['noise']['description']})", "",
             f"Profile `{results['profile']}`, seed {results['seed']}, training seed "
             f"{results.get('training_seed')}, {results['train_cases']} training / "
             f"{results['test_cases']} test cases." + (f" Command: `{results['command']}`" if results.get("command")
                                                         else ""), "",
             "## Test Dice (mean over test cases, 95 % bootstrap interval)", "",
             "| arm | " + " | ".join(f"class {c}" for c in classes) +
             " | foreground mean | wall (min) | peak RSS (MiB) |",
             "|---|" + "---|" * (len(classes) + 3)]
    for arm in ARMS:
        row = test[arm]
        timing = results["arms"].get(arm, {})
        lines.append(f"| {TITLES[arm]} | " + " | ".join(_ci(row["per_class"][c]) for c in classes) +
                     f" | {_ci(row['foreground'])} | {timing.get('wall_minutes', float('nan')):.1f} | "
                     f"{timing.get('peak_rss_mib', float('nan')):.0f} |")
    share = results["recovery_share"]
    noisy, em, clean = (test[arm]["foreground"][0] for arm in ARMS)
    lines += ["", f"Share of the noise-induced drop that EM recovers, ((b) − (a)) / ((c) − (a)): **{share:.2f}**"
              if not np.isnan(share) else "Recovery share undefined: no noise-induced drop.", ""]
    if clean <= noisy:
        lines += ["The clean labels did not beat the noisy ones here ((c) ≤ (a)), so this setting shows no "
                  "noise-induced drop to recover.", ""]
    if em <= noisy:
        lines += ["EM did **not** beat vanilla nnU-Net on this setting.", ""]
    rounds = results.get("em_rounds", [])
    if rounds:
        lines += ["## What the E-step did", "",
                  "| round | out-of-fold model Dice | gate (`min_model_dice`) | labels refined | changed voxels | "
                  "ignored voxels |", "|---|---|---|---|---|---|"]
        for row in rounds:
            lines.append(f"| {row['round']} | {row['model_dice']:.3f} | {row['min_model_dice']:.2f} | "
                         f"{'yes' if row['refinement_applied'] else 'no'} | {row['fraction_changed']:.3%} | "
                         f"{row['fraction_ignored']:.3%} |")
        lines.append("")
        if not any(row["refinement_applied"] for row in rounds):
            lines += ["The E-step's quality gate stayed closed in every round: the out-of-fold models' Dice with the "
                      "annotations stayed below `min_model_dice`, so EM changed no label. Arm (b)'s final training "
                      "therefore used the same labels as arm (a) (with nnU-Net's ignore-label patch sampling), and "
                      "the difference between (a) and (b) is the run-to-run spread of this training budget, not an "
                      "effect of EM.", ""]
    lines += ["## Training labels vs the clean labels", "",
              "Dice with ignored voxels scored as the annotation they replaced (the honest figure), next to Dice "
              "with ignored voxels left out (flattering: an ignored voxel cannot be wrong).", "",
              "| round | mean foreground Dice, ignored kept at annotation | ignored left out | ignored voxels |",
              "|---|---|---|---|"]
    for row in results["label_quality"]:
        name = "0 (noisy input)" if row["round"] == 0 else str(row["round"])
        kept = row.get("mean_foreground_dice_ignored_kept", float("nan"))
        lines.append(f"| {name} | {kept:.4f} | {row['mean_foreground_dice']:.4f} | "
                     f"{row['mean_fraction_ignored']:.3%} |")
    cases = results["detection"]["cases"]
    lines += ["", "## Finding the corruption", "",
              f"Case list ({cases['corrupted']} corrupted cases): flagged (review score > 2 × median) "
              f"{cases['flagged']}, precision {cases['precision']:.2f}, recall {cases['recall']:.2f}; "
              f"precision at k={cases['k']} {cases['precision_at_k']:.2f}; average precision "
              f"{cases['average_precision']:.2f}.", "",
              "| voxel-level issue detection | precision | recall | F1 | flagged voxels |", "|---|---|---|---|---|"]
    for method, title in (("em", "EM (changed or ignored)"), ("cleanlab", "cleanlab find_label_issues (2D slices)")):
        row = results["detection"]["voxels"][method]
        lines.append(f"| {title} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | "
                     f"{row['flagged']} |")
    lines += ["", f"Corrupted voxels: {results['detection']['voxels']['em']['true']}. Both methods see the same "
                  f"out-of-fold probabilities of the last EM round.", ""]
    return "\n".join(lines)


def _save(figure, path):
    import matplotlib.pyplot as plt

    label_store.atomic_write(path, lambda temp: figure.savefig(temp, dpi=100), suffix=".png")
    plt.close(figure)


def plots(out: str, results: dict, benchmark) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(out, "plots")
    os.makedirs(folder, exist_ok=True)
    written = []

    figure, axis = plt.subplots(figsize=(5, 3.2))
    rounds = [row["round"] for row in results["label_quality"]]
    axis.plot(rounds, [row.get("mean_foreground_dice_ignored_kept", np.nan) for row in results["label_quality"]],
              marker="o", label="ignored kept at annotation")
    axis.plot(rounds, [row["mean_foreground_dice"] for row in results["label_quality"]], marker="x",
              linestyle="--", label="ignored left out")
    axis.legend(fontsize=7)
    axis.set_xticks(rounds)
    axis.set_xlabel("EM round (0 = noisy input)")
    axis.set_ylabel("training-label Dice vs clean")
    figure.tight_layout()
    written.append(os.path.join(folder, "label_dice_per_round.png"))
    _save(figure, written[-1])

    figure, axis = plt.subplots(figsize=(5, 3.2))
    means = [results["test_dice"][arm]["foreground"] for arm in ARMS]
    axis.bar(range(3), [m[0] for m in means], yerr=[[m[0] - m[1] for m in means], [m[2] - m[0] for m in means]],
             capsize=4, color=["tab:red", "tab:green", "tab:blue"])
    axis.set_xticks(range(3), [TITLES[arm].split(",")[0] + "\n" + TITLES[arm].split(", ")[1] for arm in ARMS],
                    fontsize=8)
    axis.set_ylabel("test Dice (foreground mean)")
    figure.tight_layout()
    written.append(os.path.join(folder, "test_dice_per_arm.png"))
    _save(figure, written[-1])

    written.append(os.path.join(folder, "overlays.png"))
    _overlays(written[-1], benchmark, results)
    return written


def _overlays(path: str, benchmark, results: dict, count: int = 3) -> None:
    """Middle foreground slice of a few corrupted cases: clean / noisy / refined labels over the image."""
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    with open(os.path.join(benchmark.workspace.out, "corruption", "records.json")) as handle:
        corrupted = json.load(handle)["corrupted_cases"][:count]
    last = max(row["round"] for row in results["label_quality"])
    versions = benchmark.workspace.em_versions(benchmark.profile, benchmark.ending)
    figure, axes = plt.subplots(max(len(corrupted), 1), 3, figsize=(7.5, 2.6 * max(len(corrupted), 1)),
                                squeeze=False)
    for row, case in enumerate(corrupted):
        image = sitk.GetArrayFromImage(sitk.ReadImage(benchmark.cases[case]["images"][0]))
        labels = {"clean": sitk.GetArrayFromImage(sitk.ReadImage(benchmark.cases[case]["label"])),
                  "noisy": sitk.GetArrayFromImage(sitk.ReadImage(versions.label_path(0, case))),
                  f"refined (round {last})": sitk.GetArrayFromImage(sitk.ReadImage(versions.label_path(last, case)))}
        z = int(np.argmax((labels["clean"] > 0).sum(axis=(1, 2)) + (labels["noisy"] > 0).sum(axis=(1, 2))))
        for column, (title, label) in enumerate(labels.items()):
            axis = axes[row, column]
            axis.imshow(image[z], cmap="gray")
            axis.imshow(np.ma.masked_equal(label[z].astype(float), 0), cmap="jet", alpha=0.45, vmin=0, vmax=3)
            axis.set_title(f"{case}: {title}", fontsize=7)
            axis.axis("off")
    figure.tight_layout()
    _save(figure, path)


def write(out: str, results: dict, benchmark) -> None:
    label_store.write_json(os.path.join(out, "results.json"), results)
    label_store.write_text(os.path.join(out, "report.md"), markdown(results))
    plots(out, results, benchmark)
