"""nnU-Net's label conventions as nnunetv2_em applies them (no imports beyond the standard library: checks,
storage and the CLIs all use it, so it must not pull in nnU-Net or torch)."""

from __future__ import annotations


def with_ignore_label(dataset_json: dict) -> dict:
    """A copy of ``dataset_json`` that has nnU-Net's ignore label (max label + 1), added if missing."""
    if "ignore" in dataset_json["labels"]:
        return dataset_json
    updated = dict(dataset_json)
    labels = dict(dataset_json["labels"])
    labels["ignore"] = max(int(v) for v in labels.values()) + 1
    updated["labels"] = labels
    return updated
