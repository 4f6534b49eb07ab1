"""Round reports: the ranked case list (CSV + JSON) and the round summary (JSON)."""

from __future__ import annotations

import csv
import io
import os

from nnunetv2_em import label_store

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
    label_store.write_text(os.path.join(round_folder, "cases.csv"), ranked_cases_csv(ranked))
    label_store.write_json(os.path.join(round_folder, "cases.json"), ranked)
    label_store.write_json(os.path.join(round_folder, "summary.json"), summary)
