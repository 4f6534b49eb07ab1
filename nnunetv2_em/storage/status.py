"""What the user sees and asks for: the dataset's label status, and restoring any kept version.
"""

from __future__ import annotations

import os

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.layout import run_folder
from nnunetv2_em.storage.activation import (
    activate,
    gt_segmentations_changed,
    recover_activation,
    restore_gt_segmentations,
)
from nnunetv2_em.storage.files import label_stamp, read_json, sha256
from nnunetv2_em.storage.lock import lock_holder
from nnunetv2_em.storage.versions import (
    PREPROCESSED_MARKER_SUFFIX,
    DatasetLabelVersions,
    labels_digest,
    labels_switch_paths,
    non_label_files,
    read_labels_marker,
    version_name,
)


def dataset_versions(raw_folder: str, preprocessed_folder: str) -> DatasetLabelVersions:
    """The version store of a dataset, set to the run and data identifier labelsTr currently belongs to."""
    file_ending = read_json(os.path.join(raw_folder, "dataset.json"))["file_ending"]
    versions = DatasetLabelVersions(raw_folder, preprocessed_folder, "", file_ending)
    active = versions.active()
    versions.run, versions.data_identifier = active["run"], active["data_identifier"] or ""
    return versions


def restore(raw_folder: str, preprocessed_folder: str, *, round_index: int | None = None,
            run: str | None = None) -> dict:
    """Complete an interrupted switch, then (with ``round_index``) make that version labelsTr, atomically like a
    round's activation; gt_segmentations get the originals back (the stock planner copies labelsTr there). Then
    verify what it will claim: labelsTr against the active version's manifest, by checksum.

    Returns ``{"completed": journal or None, "active", "activated": bool, "labelsTr": labels_folder_state,
    "gt_repaired": [cases]}``. Raises ``EMInputError`` where labelsTr is not what the store says it is.
    """
    if round_index is not None and round_index < 0:
        raise ValueError(f"--round {round_index}: rounds are numbered from 0 (the original annotations)")
    completed = recover_activation(raw_folder, preprocessed_folder)
    versions = dataset_versions(raw_folder, preprocessed_folder)
    activated = False
    if round_index is not None:
        active = versions.active()
        if round_index > 0:
            runs = versions.runs()
            run = run or active["run"] or (next(iter(runs)) if len(runs) == 1 else None)
            if run is None:
                raise ValueError(f"several runs keep versions in {versions.root} ({sorted(runs)}): name one with --run")
            if round_index not in runs.get(run, []):
                raise ValueError(f"{versions.root}: run {run} has no complete round {round_index} (it has "
                                 f"{runs.get(run, [])})")
            versions.run = run
            versions.data_identifier = versions.read_manifest(round_index, run)["data_identifier"]
        elif not versions.has_originals():
            raise ValueError(f"{versions.root}/round_00: no originals kept; labelsTr was never replaced by nnunetv2_em")
        else:
            changed = versions.changed_originals()
            if changed:
                raise EMInputError(f"{versions.label_path(0, changed[0])}: the kept original annotation no longer "
                                   f"matches its checksum in {versions.manifest_path(0)} ({len(changed)} such "
                                   f"file(s)); labelsTr was not changed. Fix: put the original back from a backup, "
                                   f"then run the same command again.")
        if (active["run"], active["round"]) != (run if round_index else None, round_index) or \
                labels_folder_state(versions)["matches_active"] is False:
            activate(versions, round_index, run)
            activated = True
    state = labels_folder_state(versions)
    name = os.path.basename(os.path.normpath(raw_folder))
    if not versions.has_originals():
        stamped = state["marker"] or next((stamp for stamp in (label_stamp(path) for path in _label_files(versions))
                                           if stamp), None)
        if stamped:
            raise EMInputError(f"{versions.live_labels_folder()}: holds labels written by nnunetv2_em "
                               f"({stamped}), and the original annotations ({versions.root}/round_00) are missing; "
                               f"nothing was restored. Fix: put em_labels/ back from a backup, then `nnunetv2_em "
                               f"restore -d {name} --round 0`.")
    elif state["matches_active"] is False:
        active = versions.active()
        raise EMInputError(f"{versions.live_labels_folder()}: CHANGED: {len(state['differing'])} file(s) differ from "
                           f"{version_name(active['run'], active['round'])} (checksums in "
                           f"{versions.manifest_path(active['round'], active['run'])}), e.g. "
                           f"{state['differing'][:3]}. Fix: keep your edits (`nnunetv2_em status -d {name}` lists "
                           f"them), or `nnunetv2_em restore -d {name} --round {active['round']}` puts that version "
                           f"back.")
    gt_repaired = restore_gt_segmentations(versions) if versions.has_originals() else []
    return {"completed": completed, "active": versions.active(), "activated": activated, "labelsTr": state,
            "gt_repaired": gt_repaired}


def _label_files(versions: DatasetLabelVersions) -> list[str]:
    folder = versions.live_labels_folder()
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(versions.file_ending)] \
        if os.path.isdir(folder) else []


def labels_folder_state(versions: DatasetLabelVersions) -> dict:
    """What labelsTr holds, by checksum: whether it equals the active version, and which kept version it equals."""
    labels = versions.live_labels_folder()
    present = {name[:-len(versions.file_ending)]: sha256(os.path.join(labels, name))
               for name in sorted(os.listdir(labels)) if name.endswith(versions.file_ending)} \
        if os.path.isdir(labels) else {}
    digest = labels_digest(present)
    active = versions.active()
    matches_active, differing, equal_to = None, [], None
    if versions.has_originals():
        candidates = [(None, 0), *[(run, r) for run, rounds in versions.runs().items() for r in rounds]]
        for run, round_index in candidates:
            manifest = versions.read_manifest(round_index, run)
            expected = {case: entry["sha256"] for case, entry in manifest["cases"].items()}
            if labels_digest(expected) == digest:
                equal_to = {"run": run, "round": round_index}
            if (run, round_index) == (active["run"], active["round"]):
                differing = sorted(case for case in set(expected) | set(present)
                                   if expected.get(case) != present.get(case))
                matches_active = not differing
    return {"files": len(present), "marker": read_labels_marker(labels), "matches_active": matches_active,
            "differing": differing, "equal_to": equal_to}


def dataset_status(raw_folder: str, preprocessed_folder: str, results_folder: str | None = None) -> dict:
    """Everything ``nnunetv2_em status`` reports; reads only."""
    versions = dataset_versions(raw_folder, preprocessed_folder)
    journal_path = versions.journal_path()
    status = {
        "dataset": os.path.basename(os.path.normpath(raw_folder)),
        "versions_kept": versions.has_originals(),
        "active": versions.active(),
        "labelsTr": labels_folder_state(versions),
        "unfinished_switch": read_json(journal_path) if os.path.isfile(journal_path) else None,
        "staging_left": os.path.isdir(labels_switch_paths(raw_folder)[1]),
        "lock_holder": lock_holder(raw_folder),
        "originals_changed": versions.changed_originals() if versions.has_originals() else [],
        "gt_segmentations_changed": gt_segmentations_changed(versions),
        "other_files": non_label_files(versions.live_labels_folder(), versions.file_ending),
        "runs": {},
        "preprocessed": {},
    }
    for run, rounds in versions.runs().items():
        state_file = os.path.join(run_folder(results_folder or "", status["dataset"], run), "state.json")
        state = read_json(state_file) if results_folder and os.path.isfile(state_file) else None
        status["runs"][run] = {"rounds_kept": rounds, "rounds_done": sorted(int(r) for r in state["rounds"])
                               if state else None, "converged": state["converged"] if state else None}
    if os.path.isdir(preprocessed_folder):
        for name in sorted(os.listdir(preprocessed_folder)):
            if name.endswith(PREPROCESSED_MARKER_SUFFIX):
                status["preprocessed"][name[:-len(PREPROCESSED_MARKER_SUFFIX)]] = read_json(
                    os.path.join(preprocessed_folder, name))
    return status
