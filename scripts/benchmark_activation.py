"""Switching labelsTr between versions on the full real Hippocampus dataset, killed at random instants.

    python scripts/benchmark_activation.py --data ../shared/data/Dataset004_Hippocampus --out bench_out/activation

The tests kill an activation at its named write windows; this script kills it at *random* instants, on 200 real
cases (2d preprocessing): a staged round 1 (every case refined: some voxels set to ignore, a few relabelled) and the
originals are switched back and forth by `activate` in a child process, which is SIGKILLed after a random delay
drawn uniformly over the measured length of a switch. After each kill it checks what a user finds (labelsTr equals
one complete version by checksum, nnU-Net's verify_dataset_integrity accepts the dataset, the originals are
byte-identical), then runs `nnunetv2_em restore -d D` and checks that the switch was completed (labelsTr, markers
and every preprocessed segmentation equal the journal's target). Also times an unkilled switch and a restore.
Writes results.json and results.md to --out (docs/run.md quotes them). About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

DATASET_ID = 942
DATASET = "Dataset942_HippoAll"
RUN = "em_run__bench__nnUNetPlans__2d"
IDENTIFIER = "nnUNetPlans_2d"

CHILD = """
import sys, time
from nnunetv2_em import storage
versions = storage.DatasetLabelVersions({raw!r}, {pre!r}, {identifier!r}, ".nii.gz", {run!r})
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
started = time.perf_counter()
storage.activate(versions, {round_index})
sys.stdout.write(f"{{time.perf_counter() - started:.3f}}\\n")
"""


def _env(root: str) -> dict:
    return {**os.environ, "nnUNet_raw": os.path.join(root, "raw"),
            "nnUNet_preprocessed": os.path.join(root, "preprocessed"), "nnUNet_results": os.path.join(root, "results"),
            "nnUNet_def_n_proc": "2", "nnUNet_compile": "f"}


def _console(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def prepare(data: str, root: str) -> None:
    """The dataset planned for 2d, its originals kept and a refined round 1 staged (once; reused when rerun)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_em import storage

    raw = os.path.join(root, "raw", DATASET)
    pre = os.path.join(root, "preprocessed", DATASET)
    versions = storage.DatasetLabelVersions(raw, pre, IDENTIFIER, ".nii.gz", RUN)
    if os.path.isfile(versions.manifest_path(1)):
        return
    if not os.path.isdir(raw):
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        shutil.copytree(data, raw, ignore=shutil.ignore_patterns("imagesTs", "em_labels"))
    if not os.path.isdir(os.path.join(pre, IDENTIFIER)):
        subprocess.run([_console("nnunetv2_em"), "plan", "-d", str(DATASET_ID), "-c", "2d", "-np", "2"],
                       env=_env(root), check=True)
    with open(os.path.join(raw, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    cases = sorted(name[:-len(".nii.gz")] for name in os.listdir(os.path.join(raw, "labelsTr"))
                   if name.endswith(".nii.gz"))
    versions.keep_originals(cases)
    ignore = max(int(v) for v in dataset_json["labels"].values()) + 1
    with open(os.path.join(pre, "nnUNetPlans.json")) as handle:
        patch_size = json.load(handle)["configurations"]["2d"]["patch_size"]
    reader_writer = SimpleITKIO()
    rng = np.random.default_rng(0)
    for case in cases:
        raw_label, raw_properties = reader_writer.read_seg(versions.label_path(0, case))
        segmentation = versions.read_segmentation(0, case)
        refined_raw, refined = raw_label[0].astype(np.int16), segmentation.copy()
        for array in (refined_raw, refined):
            foreground = np.flatnonzero(array > 0)
            array.flat[rng.choice(foreground, size=max(1, foreground.size // 20), replace=False)] = ignore
        with open(os.path.join(versions.segmentation_folder(0), f"{case}.pkl"), "rb") as handle:
            import pickle
            properties = pickle.load(handle)
        versions.write_case(1, case, raw_label=refined_raw, raw_properties=raw_properties,
                            reader_writer=reader_writer, segmentation=refined, properties=properties,
                            patch_size=patch_size)
    dataset_json["labels"]["ignore"] = ignore
    versions.write_round_metadata(1, dataset_json, {case: {"provenance": storage.REFINED} for case in cases})


def switch(root: str, round_index: int, kill_after: float | None) -> float | None:
    """Activate a version in a child; SIGKILL it ``kill_after`` seconds into the switch. Returns its duration."""
    raw = os.path.join(root, "raw", DATASET)
    pre = os.path.join(root, "preprocessed", DATASET)
    code = CHILD.format(raw=raw, pre=pre, identifier=IDENTIFIER, run=RUN, round_index=round_index)
    child = subprocess.Popen([sys.executable, "-c", code], env=_env(root), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.stdin.write("go\n")
    child.stdin.flush()
    if kill_after is None:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"activation failed ({child.returncode})")
        return float(out.strip())
    time.sleep(kill_after)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return None


def check(root: str) -> dict:
    """What a user finds after a kill, and after `restore` completes the switch."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunetv2_em import storage

    raw = os.path.join(root, "raw", DATASET)
    pre = os.path.join(root, "preprocessed", DATASET)
    versions = storage.dataset_versions(raw, pre)
    state = storage.labels_folder_state(versions)
    journal = os.path.isfile(versions.journal_path())
    result = {"one_complete_version": state["equal_to"] is not None, "journal_left": journal,
              "originals_intact": versions.changed_originals() == []}
    try:
        verify_dataset_integrity(raw, num_processes=2)
        result["verify_dataset_integrity"] = True
    except Exception:  # noqa: BLE001 (any failure of nnU-Net's check counts)
        result["verify_dataset_integrity"] = False
    started = time.perf_counter()
    subprocess.run([_console("nnunetv2_em"), "restore", "-d", str(DATASET_ID)], env=_env(root), check=True,
                   capture_output=True)
    result["seconds_restore_completion"] = round(time.perf_counter() - started, 3)
    versions = storage.dataset_versions(raw, pre)
    active = versions.active()
    state = storage.labels_folder_state(versions)
    live_ok = all(storage.sha256(os.path.join(versions.live_data_folder(IDENTIFIER), f"{case}_seg.b2nd")) ==
                  storage.sha256(os.path.join(versions.segmentation_folder(active["round"], active["run"],
                                                                           IDENTIFIER), f"{case}_seg.b2nd"))
                  for case in versions.read_manifest(0)["cases"])
    result["after_restore_consistent"] = bool(state["matches_active"] and live_ok and
                                              not os.path.isfile(versions.journal_path()))
    result["active_after"] = active["round"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = os.path.abspath(os.path.join(args.out, "nnunet"))
    started = time.time()
    prepare(os.path.abspath(args.data), root)
    seconds_prepare = time.time() - started
    from nnunetv2_em import storage

    versions = storage.dataset_versions(os.path.join(root, "raw", DATASET),
                                        os.path.join(root, "preprocessed", DATASET))
    forward = switch(root, 1 if versions.active()["round"] == 0 else 0, None)
    backward = switch(root, 1 if storage.dataset_versions(
        os.path.join(root, "raw", DATASET), os.path.join(root, "preprocessed", DATASET)).active()["round"] == 0
        else 0, None)
    longest = max(forward, backward)
    rng = np.random.default_rng(args.seed)
    trials = []
    for trial in range(args.kills):
        current = storage.dataset_versions(os.path.join(root, "raw", DATASET),
                                           os.path.join(root, "preprocessed", DATASET)).active()["round"]
        delay = float(rng.uniform(0, longest))
        switch(root, 1 - current, delay)
        outcome = {"trial": trial, "from_round": current, "killed_after_s": round(delay, 3), **check(root)}
        trials.append(outcome)
        print(json.dumps(outcome), flush=True)
    keys = ("one_complete_version", "verify_dataset_integrity", "originals_intact", "after_restore_consistent")
    summary = {
        "command": f"python scripts/benchmark_activation.py --data {args.data} --out {args.out} --kills {args.kills} "
                   f"--seed {args.seed}",
        "cases": len(versions.read_manifest(0)["cases"]),
        "seconds_prepare": round(seconds_prepare, 1),
        "seconds_switch_to_round_1_or_0": [round(forward, 2), round(backward, 2)],
        "kills": len(trials),
        "kills_after_the_journal": sum(t["journal_left"] for t in trials),
        **{key: f"{sum(bool(t[key]) for t in trials)}/{len(trials)}" for key in keys},
        "seconds_restore_completion_max": max(t["seconds_restore_completion"] for t in trials) if trials else None,
        "trials": trials,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    lines = [f"`{summary['command']}`", "", "| measure | result |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in summary.items()
              if key not in ("command", "trials")]
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
