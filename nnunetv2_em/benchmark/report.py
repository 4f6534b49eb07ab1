"""The suite's report: ``suite.json``, ``report.md`` and PNG plots in the output folder."""

from __future__ import annotations

import math
import os

import numpy as np

from nnunetv2_em import storage
from nnunetv2_em.benchmark import metrics

VERSION_TITLES = {"noisy": "noisy input", "em": "EM (last round)", "cleanlab": "cleanlab filter"}
PAIRS = ("em - noisy", "cleanlab - noisy", "clean - noisy")


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval(row: dict) -> str:
    return f"{row['mean']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = [f"# nnunetv2_em benchmark: {len(summary['settings'])} noise setting(s) x {len(seeds)} training seed(s)",
             "", f"Profile `{summary['profile']}`, split and corruption seed {summary['corruption_seed']}, training "
                 f"seeds {', '.join(map(str, seeds))}" + (", label quality only (no final trainings)"
                                                          if summary["label_quality_only"] else "") + ".",
             *([f"Command: `{summary['command']}`"] if summary.get("command") else []), "",
             "## Training labels against the clean labels", "",
             "Mean over training cases and seeds. **Dice (kept)** scores a voxel set to ignore as the annotation it "
             "replaced, so ignoring gains nothing (the honest figure); **Dice (left out)** drops ignored voxels "
             "(flattering: an ignored voxel cannot be wrong). HD95 (voxels, lower is better) and surface Dice at 1 "
             "voxel are computed on the kept variant. cleanlab only ignores, so its kept Dice equals the input's.", "",
             "| setting | labels | Dice (kept) | Dice (left out) | ignored | HD95 | surface Dice | corrupted: Dice "
             "(kept) | untouched: Dice (kept) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["settings"].items():
        for version in ("noisy", "em", "cleanlab"):
            rows = entry["labels"][version]
            every, bad, good = rows["all"], rows["corrupted"], rows["untouched"]
            lines.append(f"| {name} | {VERSION_TITLES[version]} | {_f(every['dice_kept'], 4)} | "
                         f"{_f(every['dice'], 4)} | {every['fraction_ignored']:.2%} | {_f(every['hd95'], 2)} | "
                         f"{_f(every['surface_dice'])} | {_f(bad.get('dice_kept'), 4)} | "
                         f"{_f(good.get('dice_kept'), 4)} |")
    lines += ["", "Per seed, EM's change of the label Dice (kept) over the noisy input, and what its gate did:", "",
              "| setting | seed | Dice (kept) change | corrupted | untouched | model Dice (gate) | refined | "
              "changed | ignored |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["settings"].items():
        for seed in seeds:
            labels = entry["labels_per_seed"][str(seed)]
            last = entry["em_rounds"][str(seed)][-1] if entry["em_rounds"][str(seed)] else None
            delta = {g: labels["em"][g].get("dice_kept", float("nan")) - labels["noisy"][g].get("dice_kept",
                                                                                                float("nan"))
                     for g in ("all", "corrupted", "untouched")}
            gate = (f"{last['model_dice']:.3f} ({last['min_model_dice']:.2f}) | "
                    f"{'yes' if last['refinement_applied'] else 'no'} | {last['fraction_changed']:.3%} | "
                    f"{last['fraction_ignored']:.3%}") if last else "n/a | n/a | n/a | n/a"
            lines.append(f"| {name} | {seed} | {delta['all']:+.4f} | {_f(delta['corrupted'], 4)} | "
                         f"{_f(delta['untouched'], 4)} | {gate} |")
    lines += ["", "## Finding the corrupted cases and voxels", "",
              "Mean over seeds. The review list is EM's ranked case list (last round); precision at 5 % / 10 % is "
              "the share of corrupted cases among the top 5 % / 10 % of the list. Voxel detection compares EM's "
              "changed or ignored voxels and cleanlab's flags with the corrupted voxels.", "",
              "| setting | corrupted cases | average precision | precision at 5 % | precision at 10 % | voxel F1: EM | "
              "voxel F1: cleanlab | voxel precision / recall: EM | cleanlab |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["settings"].items():
        ranking, em, peer = entry["ranking"], entry["voxels"]["em"], entry["voxels"]["cleanlab"]
        if not entry["corrupted_cases"]:
            lines.append(f"| {name} | 0 of {entry['train_cases']} | nothing to find: EM flagged "
                         f"{em['flagged']:.0f} voxels, cleanlab {peer['flagged']:.0f} (all false alarms) |||||||")
            continue
        lines.append(f"| {name} | {entry['corrupted_cases']} of {entry['train_cases']} | "
                     f"{_f(ranking.get('average_precision'), 2)} | {_f(ranking.get('precision_at_5pct'), 2)} | "
                     f"{_f(ranking.get('precision_at_10pct'), 2)} | {_f(em['f1'])} | {_f(peer['f1'])} | "
                     f"{_f(em['precision'], 2)} / {_f(em['recall'], 2)} | {_f(peer['precision'], 2)} / "
                     f"{_f(peer['recall'], 2)} |")
    tested = {name: entry for name, entry in summary["settings"].items() if "test" in entry}
    if tested:
        lines += ["", "## Test Dice (secondary figure)", "",
                  "Foreground-mean Dice on the held-out cases, mean per seed. Paired differences over seeds x test "
                  "cases with a 95 % bootstrap interval resampling both; a claim needs the interval to exclude 0.", "",
                  "| setting | vanilla (noisy) | EM | cleanlab | EM − vanilla | seeds EM won | cleanlab − vanilla | "
                  "clean − vanilla |", "|---|---|---|---|---|---|---|---|"]
        for name, entry in tested.items():
            paired = entry["paired"]
            lines.append(f"| {name} | {entry['test']['noisy']['mean']:.3f} | {entry['test']['em']['mean']:.3f} | "
                         f"{entry['test']['cleanlab']['mean']:.3f} | {_interval(paired['em - noisy'])} | "
                         f"{paired['em - noisy']['seeds_won']} of {paired['em - noisy']['seeds']} | "
                         f"{_interval(paired['cleanlab - noisy'])} | "
                         f"{_interval(paired['clean - noisy']) if 'clean - noisy' in paired else 'control'} |")
    lines += ["", "## Reading", "", *reading(summary), ""]
    return "\n".join(lines)


def reading(summary: dict) -> list[str]:
    """Plain statements the figures support, and what they do not establish."""
    out = []
    seeds = len(summary["seeds"])
    for name, entry in summary["settings"].items():
        per_seed = [entry["labels_per_seed"][s]["em"]["all"]["dice_kept"] -
                    entry["labels_per_seed"][s]["noisy"]["all"]["dice_kept"] for s in entry["labels_per_seed"]]
        gains = sum(d > 0 for d in per_seed)
        losses = sum(d < 0 for d in per_seed)
        if name == "clean":
            verdict = ("EM left the clean labels unchanged" if not any(per_seed) else
                       f"EM changed clean labels: Dice (kept) {np.mean(per_seed):+.4f} on average "
                       f"({losses} of {seeds} seeds lower) — the do-no-harm control "
                       f"{'failed' if losses else 'held'}")
        else:
            labels = entry["labels"]
            split = {group: labels["em"][group].get("dice_kept", float("nan")) -
                     labels["noisy"][group].get("dice_kept", float("nan")) for group in ("corrupted", "untouched")}
            verdict = (f"EM's label Dice (kept) change {np.mean(per_seed):+.4f} on average; higher in {gains}, "
                       f"lower in {losses} of {seeds} seeds; corrupted cases {split['corrupted']:+.4f}, untouched "
                       f"cases {split['untouched']:+.4f}"
                       f"{' (EM damaged good labels)' if split['untouched'] < 0 else ''}. With ignored voxels left "
                       f"out (the flattering figure): EM {labels['em']['all']['dice']:.4f}, cleanlab "
                       f"{labels['cleanlab']['all']['dice']:.4f}, input {labels['noisy']['all']['dice']:.4f}")
            if seeds < 3:
                verdict += "; fewer than 3 seeds: the spread between trainings is not measured"
        out.append(f"- `{name}`: {verdict}.")
        for pair, row in entry.get("paired", {}).items():
            if pair == "em - noisy":
                verdict = metrics.difference_verdict(row["per_seed"], (row["mean"], row["low"], row["high"]))
                if verdict == "established" and name == "clean" and row["mean"] < 0:
                    verdict += ": the do-no-harm control fails on test Dice (EM costs the training on clean labels)"
                out.append(f"  Test Dice, EM − vanilla {_interval(row)}: {verdict}.")
    return out


def _save(figure, path):
    import matplotlib.pyplot as plt

    storage.atomic_write(path, lambda temp: figure.savefig(temp, dpi=100), suffix=".png")
    plt.close(figure)


def plots(out: str, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(out, "plots")
    os.makedirs(folder, exist_ok=True)
    written = []
    names = list(summary["settings"])
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.4))
    width = 0.2
    for offset, (version, key, style) in enumerate((("noisy", "dice_kept", {}), ("em", "dice_kept", {}),
                                                    ("em", "dice", {"hatch": "//"}),
                                                    ("cleanlab", "dice", {"hatch": "//"}))):
        values = [summary["settings"][n]["labels"][version]["all"][key] for n in names]
        spread = [np.ptp([summary["settings"][n]["labels_per_seed"][s][version]["all"][key]
                          for s in summary["settings"][n]["labels_per_seed"]]) / 2 for n in names]
        label = f"{VERSION_TITLES[version]}, {'kept' if key == 'dice_kept' else 'left out'}"
        axis.bar(np.arange(len(names)) + (offset - 1.5) * width, values, width, yerr=spread, capsize=2, label=label,
                 **style)
    axis.set_xticks(range(len(names)), names, fontsize=8)
    axis.set_ylabel("training-label Dice vs clean")
    axis.set_ylim(max(0.0, min(axis.get_ylim()[1] - 0.4, 0.5)), 1.0)
    axis.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    written.append(os.path.join(folder, "label_dice.png"))
    _save(figure, written[-1])

    tested = [n for n in names if "paired" in summary["settings"][n]]
    if tested:
        figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(tested) + 2), 3.2))
        for offset, pair in enumerate(PAIRS):
            rows = [summary["settings"][n]["paired"].get(pair) for n in tested]
            x = np.arange(len(tested)) + (offset - 1) * 0.25
            for xi, row in zip(x, rows, strict=True):
                if row is not None:
                    axis.errorbar(xi, row["mean"], yerr=[[row["mean"] - row["low"]], [row["high"] - row["mean"]]],
                                  fmt="o", color=f"C{offset}", capsize=3)
            axis.plot([], [], "o", color=f"C{offset}", label=pair)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(tested)), tested, fontsize=8)
        axis.set_ylabel("paired test Dice difference")
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(os.path.join(folder, "paired_test_differences.png"))
        _save(figure, written[-1])
    return written


def write(out: str, summary: dict) -> None:
    storage.write_json(os.path.join(out, "suite.json"), summary)
    storage.write_text(os.path.join(out, "report.md"), markdown(summary))
    plots(out, summary)
