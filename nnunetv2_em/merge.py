"""``nnunetv2_em merge``: one nnU-Net dataset from several that annotate different structures.

The merged label table is the union of the sources' label names (renamed with ``--map``), background first, values
renumbered in order of first appearance. Every label file is remapped to it; the classes each case's source
annotates are written to the new dataset's ``em_weak_labels.json`` as ``annotated_classes``, so the E-step reads a
case's background as "background or a class its source did not annotate" instead of training those classes as
background (what a naive merge does). Images are copied (or linked with ``--link``). Everything is written into a
temporary folder that is renamed into place at the end: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from nnunetv2_em import checks, storage
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.weak_labels import FORMAT_VERSION, WEAK_LABELS_FILE


def parse_mapping(items) -> dict[tuple[str, str], str]:
    """``["951:Hippo=Anterior", ...]`` -> ``{("Dataset951_X", "Hippo"): "Anterior"}`` (sources resolved later)."""
    mapping = {}
    for item in items or ():
        source, _, rest = item.partition(":")
        name, _, target = rest.partition("=")
        if not (source and name and target):
            raise EMInputError(f"--map {item}: expected SOURCE:NAME=TARGET. Fix: e.g. --map 951:Hippo=Anterior.")
        mapping[(source, name)] = target
    return mapping


def merged_label_table(sources: dict[str, dict], mapping: dict[tuple[str, str], str]) -> dict[str, int]:
    """``{target name: value}``: background 0, then every source's foreground labels (renamed) in order."""
    table = {"background": 0}
    for name, dataset_json in sources.items():
        labels = sorted(((int(v), label) for label, v in dataset_json["labels"].items() if label != "ignore"))
        for value, label in labels:
            if value == 0:
                continue
            target = mapping.get((name, label), label)
            if target not in table:
                table[target] = len(table)
    return table


def merge_datasets(sources: list[str], output: str, *, mapping=None, link: bool = False,
                   prefix: bool = False) -> dict:
    """Merge raw datasets ``sources`` (DatasetXXX_Name under ``$nnUNet_raw``) into ``$nnUNet_raw/output``.

    Returns:
        ``{"labels": table, "cases": {case: {"source": ..., "annotated_classes": [...]}}}``.
    """
    raw_root = checks.require_env("nnUNet_raw")["nnUNet_raw"]
    names, jsons, mapping = _checked_sources(raw_root, sources, output, mapping)
    table = merged_label_table(jsons, mapping)
    plan = _case_plan(raw_root, names, jsons, mapping, table, prefix=prefix)
    staging = os.path.join(raw_root, f".{output}.partial_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_merged(staging, plan, jsons, names, table, output=output, link=link)
        os.rename(staging, os.path.join(raw_root, output))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"labels": table, "cases": {case: {"source": item["source"],
                                              "annotated_classes": item["annotated_classes"]}
                                       for case, item in plan.items()}}


def _checked_sources(raw_root: str, sources: list[str], output: str, mapping) -> tuple[list[str], dict, dict]:
    """The source dataset names, their dataset.json and the label mapping keyed by dataset name; one EMInputError
    for the first problem (too few or repeated sources, a taken or malformed output id, an unknown mapped dataset or
    label, differing channels or file format)."""
    from nnunetv2_em.planning import dataset_name

    if len(sources) < 2:
        raise EMInputError("merge needs at least two datasets. Fix: -d A B [C ...].")
    names = [dataset_name(source) for source in sources]
    if len(set(names)) != len(names):
        raise EMInputError(f"-d {' '.join(sources)}: a dataset is listed twice. Fix: list each once.")
    if not output.startswith("Dataset") or "_" not in output or not output[7:10].isdigit():
        raise EMInputError(f"-o {output}: expected DatasetXXX_Name. Fix: e.g. -o Dataset950_Merged.")
    target = os.path.join(raw_root, output)
    taken = [n for n in os.listdir(raw_root) if n.startswith(output[:10])]
    if os.path.lexists(target) or taken:
        raise EMInputError(f"{target}: dataset id {output[7:10]} is taken ({', '.join(taken) or output}). Fix: pick "
                           f"another id.")
    mapping = {(dataset_name(source), label): new for (source, label), new in (mapping or {}).items()}
    unknown = sorted({source for source, _ in mapping} - set(names))
    if unknown:
        raise EMInputError(f"--map: {unknown[0]} is not one of the merged datasets. Fix: use one of {names}.")
    jsons = {name: checks.load_dataset_json(os.path.join(raw_root, name, "dataset.json")) for name in names}
    first = jsons[names[0]]
    for name in names[1:]:
        for key in ("channel_names", "file_ending"):
            if jsons[name].get(key) != first.get(key):
                raise EMInputError(f"{name}/dataset.json: {key} {jsons[name].get(key)} differs from {names[0]}'s "
                                   f"{first.get(key)}. Fix: merge datasets with the same channels and file format.")
    for (source, label) in mapping:
        if label not in jsons[source]["labels"]:
            raise EMInputError(f"--map {source}:{label}: no label {label} in {source}/dataset.json. Fix: use "
                               f"one of {sorted(jsons[source]['labels'])}.")
    return names, jsons, mapping


def _case_plan(raw_root: str, names: list[str], jsons: dict, mapping: dict, table: dict, *, prefix: bool) -> dict:
    """``{new case: {"source", "entry" (images, label), "lookup" (old value -> merged value), "annotated_classes"}}``
    over every source dataset, each checked; refuses a case id two sources share unless ``prefix``."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    plan, seen = {}, {}
    for name in names:
        source_folder = os.path.join(raw_root, name)
        checks.check_raw_dataset(source_folder)
        entries = get_filenames_of_train_images_and_targets(source_folder, jsons[name])
        lookup = np.zeros(max(int(v) for k, v in jsons[name]["labels"].items() if k != "ignore") + 1, np.int64)
        annotated = []
        for label, value in jsons[name]["labels"].items():
            if label != "ignore" and int(value) > 0:
                lookup[int(value)] = table[mapping.get((name, label), label)]
                annotated.append(mapping.get((name, label), label))
        for case, entry in sorted(entries.items()):
            new_case = f"{name}_{case}" if prefix else case
            if new_case in seen:
                raise EMInputError(f"case {case} is in {seen[new_case]} and {name}. Fix: pass --prefix (case ids "
                                   f"become <dataset>_<case>).")
            seen[new_case] = name
            plan[new_case] = {"source": name, "entry": entry, "lookup": lookup,
                              "annotated_classes": sorted(annotated, key=table.get)}
    return plan


def _write_merged(staging: str, plan: dict, jsons: dict, names: list[str], table: dict, *, output: str,
                  link: bool) -> None:
    """The merged dataset in ``staging``: images copied (or linked), labels remapped to ``table``, dataset.json,
    and the weak-label file naming the classes of cases that do not annotate every merged class."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    first = jsons[names[0]]
    ending = first["file_ending"]
    foreground = {name: value for name, value in table.items() if value > 0}
    reader_writer = SimpleITKIO()
    for case, item in sorted(plan.items()):
        storage.place_case_images(item["entry"]["images"], staging, case, ending, link=link)
        os.makedirs(os.path.join(staging, "labelsTr"), exist_ok=True)
        seg, properties = reader_writer.read_seg(item["entry"]["label"])
        values = np.unique(seg).astype(np.int64)
        if values.max(initial=0) >= item["lookup"].size or values.min(initial=0) < 0:
            raise EMInputError(f"{item['entry']['label']}: label values {values.tolist()} outside the labels of "
                               f"{item['source']}/dataset.json. Fix: correct the file.")
        remapped = item["lookup"][seg[0].astype(np.int64)].astype(np.uint8 if len(table) < 255 else np.uint16)
        storage.write_label_image(os.path.join(staging, "labelsTr", f"{case}{ending}"), remapped,
                                  properties, reader_writer)
    partial = {case: {"annotated_classes": item["annotated_classes"]} for case, item in plan.items()
               if set(item["annotated_classes"]) != set(foreground)}
    dataset_json = {"channel_names": first["channel_names"], "labels": table, "numTraining": len(plan),
                    "file_ending": ending, "name": output.split("_", 1)[1],
                    "description": f"merged by nnunetv2_em from {', '.join(names)}",
                    "merged_from": {name: {"labels": jsons[name]["labels"]} for name in names}}
    storage.write_json(os.path.join(staging, "dataset.json"), dataset_json)
    if partial:
        storage.write_json(os.path.join(staging, WEAK_LABELS_FILE), {"version": FORMAT_VERSION, "cases": partial})


def summary_line(result: dict, output: str) -> str:
    partial = sum(set(c["annotated_classes"]) != set(result["labels"]) - {"background"}
                  for c in result["cases"].values())
    return (f"{output}: {len(result['cases'])} cases, labels {json.dumps(result['labels'])}; {partial} case(s) "
            f"annotate only some classes ({WEAK_LABELS_FILE}).")
