"""Per-seed benchmark records: one small JSON per training seed (``seed_<s>.json``, committed), measured once and
reported from the files, so ``--report-only`` recomputes a script's tables without training."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from nnunetv2_em import storage


def seed_records(folder: str, seeds: Iterable[int], measure: Callable[[int], dict], *,
                 belongs: Callable[[dict], bool]) -> list[dict]:
    """Measure every seed in ``seeds`` without a record in ``folder`` (``measure(seed)``, written atomically as it
    finishes, so an interrupted run continues), then return every record in ``folder`` that ``belongs`` accepts
    (its split, profile, ... match the report asked for), in file-name order."""
    os.makedirs(folder, exist_ok=True)
    for seed in seeds:
        path = os.path.join(folder, f"seed_{seed}.json")
        if not os.path.isfile(path):
            storage.write_json(path, measure(seed))
            print(f"seed {seed} done", flush=True)
    records = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as handle:
            record = json.load(handle)
        if belongs(record):
            records.append(record)
    return records
