"""Round reports: the ranked case list (CSV + JSON) and the round summary (JSON)."""

from __future__ import annotations

import csv
import io
import os

from nnunetv2_em import storage

LEADING_COLUMNS = ("rank", "case", "review_score", "voxels_changed", "voxels_ignored", "fraction_changed",
                   "mean_entropy")


def ranked_cases_csv(ranked: list[dict]) -> str:
    """CSV text of ``estep.rank_cases`` output; the most informative columns first."""
    columns = list(LEADING_COLUMNS)
    for row in ranked:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in ranked:
        writer.writerow({key: _format(row.get(key, "")) for key in columns})
    return buffer.getvalue()


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def write_round_reports(round_folder: str, summary: dict, ranked: list[dict]) -> None:
    os.makedirs(round_folder, exist_ok=True)
    storage.write_text(os.path.join(round_folder, "cases.csv"), ranked_cases_csv(ranked))
    storage.write_json(os.path.join(round_folder, "cases.json"), ranked)
    storage.write_json(os.path.join(round_folder, "summary.json"), summary)


RUN_COLUMNS = (("round", "round", "{}"), ("log-lik/voxel", "log_likelihood", "{:.5f}"),
               ("temperature", "temperature", "{:.3f}"), ("network Dice", "model_dice", "{:.3f}"),
               ("changed %", "fraction_changed", "{:.3%}"), ("ignored %", "fraction_ignored", "{:.3%}"),
               ("vs previous %", "fraction_changed_since_previous", "{:.3%}"),
               ("mean review score", "mean_review_score", "{:.4f}"), ("pseudo cases", "pseudo_labelled_cases", "{}"))


def _round_rows(state: dict) -> list[dict]:
    rows = []
    for key in sorted(state["rounds"], key=int):
        summary = state["rounds"][key]
        rows.append({**summary, "log_likelihood": summary["noise_model"]["log_likelihood"],
                     "temperature": summary["noise_model"]["temperature"]})
    return rows


def run_summary_markdown(state: dict) -> str:
    rows = _round_rows(state)
    lines = ["| " + " | ".join(title for title, _, _ in RUN_COLUMNS) + " |",
             "|" + "---|" * len(RUN_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row.get(key, "")) if key in row else "" for _, key, fmt in
                                       RUN_COLUMNS) + " |")
    status = "converged" if state.get("converged") else f"{len(rows)} round(s) done"
    return f"# EM run on {state.get('dataset', '')}: {status}\n\n" + "\n".join(lines) + "\n"


def plot_run(state: dict, folder: str) -> list[str]:
    """PNG plots of the changed / ignored voxels, the likelihood and the review scores per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _round_rows(state)
    rounds = [row["round"] for row in rows]
    os.makedirs(folder, exist_ok=True)
    written = []
    panels = (("changed_voxels.png", "% of annotated voxels",
               (("changed", "fraction_changed"), ("ignored", "fraction_ignored"),
                ("differs from previous round", "fraction_changed_since_previous")), 100.0),
              ("likelihood.png", "mean log-likelihood per voxel", (("log-likelihood", "log_likelihood"),), 1.0),
              ("scores.png", "score", (("mean review score", "mean_review_score"),
                                      ("network Dice vs. annotation", "model_dice")), 1.0))
    for name, ylabel, series, scale in panels:
        figure, axis = plt.subplots(figsize=(5, 3.2))
        for label, key in series:
            axis.plot(rounds, [scale * row[key] for row in rows], marker="o", label=label)
        axis.set_xlabel("round")
        axis.set_ylabel(ylabel)
        axis.set_xticks(rounds)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(folder, name)
        storage.atomic_write(path, lambda temp, f=figure: f.savefig(temp, dpi=100), suffix=".png")
        plt.close(figure)
        written.append(path)
    return written


def write_run_summary(run_folder: str, state: dict) -> None:
    storage.write_json(os.path.join(run_folder, "summary.json"), state)
    storage.write_text(os.path.join(run_folder, "summary.md"), run_summary_markdown(state))
    plot_run(state, os.path.join(run_folder, "plots"))


def format_status(status: dict) -> str:
    """``nnunetv2_em status`` as text (see ``storage.dataset_status``)."""
    from nnunetv2_em.storage import version_name

    lines = [status["dataset"]]
    active = status["active"]
    labels = status["labelsTr"]
    if status["unfinished_switch"]:
        switch = status["unfinished_switch"]
        lines.append(f"  UNFINISHED: a switch to {version_name(switch['run'], switch['round'])} was interrupted; "
                     f"`nnunetv2_em restore -d {status['dataset']}` (or the next run) completes it")
    if not status["versions_kept"]:
        lines.append(f"  labelsTr: {labels['files']} label files, never replaced by nnunetv2_em (no em_labels/)")
        if labels["marker"]:
            lines.append(f"  WARNING: labelsTr carries an EM marker ({labels['marker']}) but em_labels/ is missing: "
                         f"these are EM output, not annotations")
    else:
        state = ("checksums match" if labels["matches_active"] else
                 f"CHANGED since: {len(labels['differing'])} file(s) differ, e.g. {labels['differing'][:3]}")
        lines.append(f"  labelsTr: {version_name(active['run'], active['round'])}, {labels['files']} files, {state}")
        if labels["matches_active"] is False and labels["equal_to"]:
            equal = labels["equal_to"]
            lines.append(f"  labelsTr equals {version_name(equal['run'], equal['round'])} (active.json is stale)")
        originals = ("intact (checksums match)" if not status["originals_changed"] else
                     f"CHANGED: {status['originals_changed'][:3]}")
        lines.append(f"  originals (em_labels/round_00): {originals}")
        if status["gt_segmentations_changed"]:
            changed = status["gt_segmentations_changed"]
            lines.append(f"  gt_segmentations: CHANGED: {len(changed)} file(s) are not the originals, e.g. "
                         f"{changed[:3]} (nnU-Net's planner copied labelsTr there); `nnunetv2_em restore -d "
                         f"{status['dataset']}` puts the originals back")
    if status["other_files"]:
        lines.append(f"  labelsTr also holds {len(status['other_files'])} other file(s) (kept through every switch): "
                     f"{status['other_files'][:5]}")
    for run, info in status["runs"].items():
        done = "" if info["rounds_done"] is None else (
            f"; run state: rounds {info['rounds_done']} done{', converged' if info['converged'] else ''}")
        lines.append(f"  run {run}: rounds kept {info['rounds_kept']}{done}")
    for identifier, marker in status["preprocessed"].items():
        what = ("switch in progress" if marker.get("switching") else
                version_name(marker.get("run"), int(marker.get("round", 0))))
        lines.append(f"  preprocessed {identifier}: {what}")
    if status["staging_left"] and not status["unfinished_switch"]:
        lines.append("  a staging folder of an activation that never started switching is left (the next run or "
                     "restore deletes it)")
    lines.append(f"  lock: {'held by ' + status['lock_holder'] if status['lock_holder'] else 'free'}")
    return "\n".join(lines)
