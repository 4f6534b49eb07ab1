"""Making a label version the live one: staged, journalled, switched in one atomic step, rolled forward after a
kill at any instant.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.label_conventions import with_ignore_label
from nnunetv2_em.storage.files import copy_file, fault_point, read_json, sha256, write_json
from nnunetv2_em.storage.versions import (
    EM_LABELS,
    JOURNAL,
    PSEUDO,
    VERSION_MARKER,
    DatasetLabelVersions,
    check_switchable,
    exchange_paths,
    labels_switch_paths,
    other_files,
    preprocessed_marker_path,
    read_labels_marker,
    soft_maps_path,
)


def activate(versions: DatasetLabelVersions, round_index: int, run: str | None = None) -> None:
    """Make a complete, staged version the dataset's labels: raw labelsTr + dataset.json, imagesTr of cases a
    run added, the preprocessed segmentations, splits_final.json and gt_segmentations (always the originals).

    1. stage: a full copy of the version's labels beside labelsTr, each file verified against the manifest
       (a kill here leaves only the staging folder, which the next command deletes);
    2. journal: ``em_labels/activation.json`` says what the switch does; from here on any command rolls it
       forward (``recover_activation``) before doing anything else;
    3. switch: labelsTr and the staged folder are exchanged in one atomic step (``renameat2``), so after a
       kill at any instant labelsTr is one complete version; then dataset.json, images, preprocessed files;
    4. ``active.json`` and the markers are written, the journal removed.
    """
    recover_activation(versions.raw_folder, versions.preprocessed_folder)
    run = None if round_index == 0 else (run or versions.run)
    manifest = versions.read_manifest(round_index, run)
    identifier = manifest.get("data_identifier") or versions.data_identifier
    previous = versions.active()
    if previous["round"] and not previous["run"]:
        raise EMInputError(f"{versions.active_path()}: written by nnunetv2_em 0.1 (rounds without a run). Fix: copy "
                           f"{versions.root}/round_00/labelsTr back into labelsTr by hand, then remove "
                           f"em_labels/active.json.")
    previous_path = versions.manifest_path(previous["round"], previous["run"])
    previous_manifest = read_json(previous_path) if os.path.isfile(previous_path) else {"cases": {}}
    token = uuid.uuid4().hex
    live, staging, _ = labels_switch_paths(versions.raw_folder)
    check_switchable(versions.raw_folder)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        for case, entry in manifest["cases"].items():
            destination = os.path.join(staging, case + versions.file_ending)
            shutil.copyfile(versions.label_path(round_index, case, run), destination)
            if sha256(destination) != entry["sha256"]:
                raise EMInputError(f"{versions.label_path(round_index, case, run)}: does not match its checksum in "
                                   f"{versions.manifest_path(round_index, run)}; the kept version was changed after "
                                   f"it was written, and labelsTr was not changed. Fix: put the file back from a "
                                   f"backup, or restore another version (`nnunetv2_em status` lists them).")
        # whatever else labelsTr holds (notes, sidecars, folders) is the user's: it travels with every version
        for name in other_files(live, versions.file_ending, versioned_cases=previous_manifest["cases"]):
            source = os.path.join(live, name)
            if name.endswith(versions.file_ending) and name[:-len(versions.file_ending)] in manifest["cases"]:
                continue  # a label of the version replaces a hand-placed file of the same case
            if os.path.isdir(source) and not os.path.islink(source):
                shutil.copytree(source, os.path.join(staging, name), symlinks=True)
            else:
                shutil.copy2(source, os.path.join(staging, name), follow_symlinks=False)
        write_json(os.path.join(staging, VERSION_MARKER), {
            "run": run, "round": round_index, "token": token, "labels_sha256": manifest.get("labels_sha256"),
            "note": "labelsTr holds labels written by nnunetv2_em, not the original annotations (those are in "
                    "em_labels/round_00). `nnunetv2_em status` tells more."})
    except BaseException:  # a full disk while staging: labelsTr untouched, nothing left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fault_point("staged")
    leaving = sorted(set(previous_manifest["cases"]) - set(manifest["cases"]))
    journal = {
        "token": token, "run": run, "round": round_index, "data_identifier": identifier,
        "file_ending": versions.file_ending, "previous": previous,
        "remove_images": sorted({case for case in leaving if previous_manifest["cases"][case].get("images")}),
        "remove_live_cases": leaving,
        "reset_identifier": (previous["data_identifier"] if previous["round"] and previous["data_identifier"]
                             not in (None, identifier) else None),
    }
    write_json(versions.journal_path(), journal)
    fault_point("journal_written")
    roll_forward(versions.raw_folder, versions.preprocessed_folder, journal)


def recover_activation(raw_folder: str, preprocessed_folder: str) -> dict | None:
    """Finish a switch that a kill interrupted (rolled forward from its journal), and delete a staging folder
    that never reached the journal. Returns the journal that was completed, if any."""
    root = os.path.join(raw_folder, EM_LABELS)
    journal_path = os.path.join(root, JOURNAL)
    if not os.path.isfile(journal_path):
        _, staging, previous = labels_switch_paths(raw_folder)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
        return None
    journal = read_json(journal_path)
    roll_forward(raw_folder, preprocessed_folder, journal)
    return journal


def _switch_labels_folder(raw_folder: str, token: str) -> None:
    """labelsTr <- the staged folder, idempotent: the staged folder is recognised by the journal's token. A
    symlinked labelsTr keeps its link; the folder it points to is what is switched."""
    live, staging, old = labels_switch_paths(raw_folder)
    staged_marker = read_labels_marker(staging) if os.path.isdir(staging) else None
    if staged_marker and staged_marker.get("token") == token:  # not switched yet
        if not os.path.isdir(live):  # a two-rename switch was killed between its renames
            os.rename(staging, live)
        elif exchange_paths(staging, live):
            fault_point("exchanged")
            shutil.rmtree(staging)  # it now holds the previous labels
        else:
            shutil.rmtree(old, ignore_errors=True)
            os.rename(live, old)
            fault_point("between_renames")
            os.rename(staging, live)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def roll_forward(raw_folder: str, preprocessed_folder: str, journal: dict) -> None:
    run, round_index, identifier = journal["run"], journal["round"], journal["data_identifier"]
    versions = DatasetLabelVersions(raw_folder, preprocessed_folder, identifier, journal["file_ending"], run)
    manifest = versions.read_manifest(round_index, run)
    target_json = read_json(os.path.join(versions.round_folder(round_index, run), "dataset.json"))
    live_json_path = os.path.join(raw_folder, "dataset.json")
    images_folder = os.path.join(raw_folder, "imagesTr")
    live = versions.live_data_folder()
    os.makedirs(live, exist_ok=True)
    write_json(preprocessed_marker_path(live), {"switching": True, "run": run, "round": round_index})

    # dataset.json valid for the labels before and after the switch: the ignore label if either has it
    current_json = read_json(live_json_path)
    bridge = {**target_json, "labels": {**current_json["labels"], **target_json["labels"]},
              "numTraining": current_json.get("numTraining", target_json.get("numTraining"))}
    if bridge != current_json:
        write_json(live_json_path, bridge)
    fault_point("bridge_json")
    _switch_labels_folder(raw_folder, journal["token"])
    if round_index == 0:  # the originals, byte for byte: no marker
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(labels_switch_paths(raw_folder)[0], VERSION_MARKER))

    # images of cases a run added (--unlabeled): in for the target, out for cases leaving
    for case, entry in manifest["cases"].items():
        for index, relative in enumerate(entry.get("images", [])):
            target = os.path.join(images_folder, f"{case}_{index:04d}{versions.file_ending}")
            if not os.path.isfile(target):
                copy_file(os.path.join(versions.root, relative), target)
    for case in journal["remove_images"]:
        for name in os.listdir(images_folder):
            if name.startswith(case + "_") and name.endswith(versions.file_ending) and \
                    len(name) == len(case) + len("_0000") + len(versions.file_ending):
                os.remove(os.path.join(images_folder, name))
    copy_file(os.path.join(versions.round_folder(round_index, run), "dataset.json"), live_json_path)
    fault_point("raw_switched")

    # preprocessed: segmentations (+ class_locations) of the target, images of added cases, nothing of leavers
    for index, (case, entry) in enumerate(sorted(manifest["cases"].items())):
        for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
            copy_file(os.path.join(versions.segmentation_folder(round_index, run), name), os.path.join(live, name))
        staged_soft = soft_maps_path(versions.segmentation_folder(round_index, run), case)
        if os.path.isfile(staged_soft):  # the version's sampled maps travel with it; no stale maps stay behind
            copy_file(staged_soft, soft_maps_path(live, case))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(soft_maps_path(live, case))
        image = entry.get("preprocessed_image")
        if image and not os.path.isfile(os.path.join(live, f"{case}.b2nd")):
            copy_file(image, os.path.join(live, f"{case}.b2nd"))
        if index == 0:
            fault_point("preprocessed_partly")
    for case in journal["remove_live_cases"]:
        for path in (*(os.path.join(live, name) for name in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl")),
                     soft_maps_path(live, case)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if journal.get("reset_identifier"):  # the previous run used another configuration: back to its originals
        other = versions.live_data_folder(journal["reset_identifier"])
        originals = versions.segmentation_folder(0, data_identifier=journal["reset_identifier"])
        for case in versions.read_manifest(0)["cases"]:
            for name in (f"{case}_seg.b2nd", f"{case}.pkl"):
                copy_file(os.path.join(originals, name), os.path.join(other, name))
        with contextlib.suppress(FileNotFoundError):
            os.remove(preprocessed_marker_path(other))
    _sync_splits(preprocessed_folder, manifest, journal["remove_live_cases"])
    _sync_preprocessed_dataset_json(preprocessed_folder)
    restore_gt_segmentations(versions)

    write_json(versions.active_path(), {"run": run, "round": round_index, "data_identifier": identifier})
    write_json(preprocessed_marker_path(live), {"run": run, "round": round_index,
                                                "labels_sha256": manifest.get("labels_sha256")})
    fault_point("before_journal_removed")
    os.remove(versions.journal_path())


def _sync_splits(preprocessed_folder: str, manifest: dict, leaving: list[str]) -> None:
    """Pseudo-labelled cases train in every fold (never validate: they have no annotation); leavers go."""
    path = os.path.join(preprocessed_folder, "splits_final.json")
    if not os.path.isfile(path):
        return
    splits = read_json(path)
    pseudo = {case for case, entry in manifest["cases"].items() if entry.get("provenance") == PSEUDO}
    updated = [{**split, "train": sorted((set(split["train"]) - set(leaving)) | pseudo),
                "val": [case for case in split["val"] if case not in leaving]} for split in splits]
    if updated != splits:
        write_json(path, updated)


def _sync_preprocessed_dataset_json(preprocessed_folder: str) -> None:
    """Training reads the preprocessed dataset.json: it needs the ignore label and no list of excluded images."""
    path = os.path.join(preprocessed_folder, "dataset.json")
    if not os.path.isfile(path):
        return
    dataset_json = read_json(path)
    updated = dict(with_ignore_label(dataset_json))
    updated.pop("dataset", None)
    if updated != dataset_json:
        write_json(path, updated)


def restore_gt_segmentations(versions: DatasetLabelVersions) -> list[str]:
    """nnU-Net validates against gt_segmentations: it holds the original annotations, whatever labelsTr holds.
    Returns the cases put back."""
    changed = gt_segmentations_changed(versions)
    folder = os.path.join(versions.preprocessed_folder, "gt_segmentations")
    for case in changed:
        copy_file(versions.label_path(0, case), os.path.join(folder, case + versions.file_ending))
    return changed


def gt_segmentations_changed(versions: DatasetLabelVersions) -> list[str]:
    """Cases whose file in nnU-Net's ``gt_segmentations`` is not the original annotation (nnU-Net's own planner,
    run while labelsTr held a refined version, copies those labels there)."""
    folder = os.path.join(versions.preprocessed_folder, "gt_segmentations")
    if not os.path.isdir(folder) or not versions.has_originals():
        return []
    return [case for case, entry in versions.read_manifest(0)["cases"].items()
            if os.path.isfile(os.path.join(folder, case + versions.file_ending)) and
            sha256(os.path.join(folder, case + versions.file_ending)) != entry["sha256"]]
