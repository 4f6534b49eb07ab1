"""``nnunetv2_em demo``: the EM loop end to end on 30 real Hippocampus MRI cases, on a CPU, in minutes.

It runs nnU-Net's stock commands (shown as they run), so it doubles as a walk-through of the plugin:
``nnUNetv2_plan_and_preprocess -pl EMPlanner`` then ``nnUNetv2_train -tr EMTrainer_cpu``. Rerunning it continues
where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from nnunetv2_em.layout import TrainerLayout

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", "hippocampus")
DEMO_DATASET_ID = 904
DEMO_DATASET = "Dataset904_HippocampusDemo"
CPU_ENV = {"nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", "nnUNet_compile": "f"}


def install_demo_dataset(raw_root: str, *, dataset_id: int = DEMO_DATASET_ID, name: str = "HippocampusDemo") -> str:
    """Copy the committed cases into ``raw_root`` as an nnU-Net raw dataset (kept if present)."""
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        staging = folder + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        for sub in ("imagesTr", "labelsTr"):
            shutil.copytree(os.path.join(DEMO_DATA, sub), os.path.join(staging, sub))
        shutil.copy(os.path.join(DEMO_DATA, "dataset.json"), staging)
        os.replace(staging, folder)
    return folder


def _stock(command: list[str], env: dict) -> None:
    print("\n$ " + " ".join(command), flush=True)
    executable = os.path.join(os.path.dirname(sys.executable), command[0])
    subprocess.run([executable, *command[1:]], env=env, check=True)


def run_demo(workdir: str, *, trainer: str = "EMTrainer_cpu", configuration: str = "2d", fold: int = 0) -> dict:
    workdir = os.path.abspath(workdir)
    paths = {key: os.path.join(workdir, key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    env = {**os.environ, **{key: os.environ.get(key, value) for key, value in CPU_ENV.items()}, **paths}
    print(f"nnunetv2-em demo in {workdir} (30 real Hippocampus MRI cases, CC-BY-SA 4.0, see "
          f"{os.path.join(DEMO_DATA, 'ATTRIBUTION.md')})")
    for key, value in paths.items():
        print(f"  export {key}={value}")
    install_demo_dataset(paths["nnUNet_raw"])

    plans = os.path.join(paths["nnUNet_preprocessed"], DEMO_DATASET, "nnUNetPlans.json")
    data_folder = os.path.join(paths["nnUNet_preprocessed"], DEMO_DATASET, f"nnUNetPlans_{configuration}")
    if not (os.path.isfile(plans) and os.path.isdir(data_folder)):
        _stock(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_DATASET_ID), "-pl", "EMPlanner", "-c", configuration,
                "-np", "2", "-npfp", "2"], env)
    fold_folder = TrainerLayout.of(paths["nnUNet_results"], DEMO_DATASET, trainer, "nnUNetPlans", configuration,
                                   fold).fold_folder
    if not os.path.isfile(os.path.join(fold_folder, "validation", "summary.json")):
        resume = ["--c"] if any(os.path.isfile(os.path.join(fold_folder, c))
                                for c in ("checkpoint_latest.pth", "checkpoint_final.pth")) else []
        _stock(["nnUNetv2_train", str(DEMO_DATASET_ID), configuration, str(fold), "-tr", trainer, "-device", "cpu",
                *resume], env)
    return report(fold_folder)


def report(fold_folder: str, top: int = 5) -> dict:
    """Print the rounds and the cases most in need of review; return the numbers printed."""
    layout = TrainerLayout(fold_folder)
    with open(layout.state_file) as handle:
        state = json.load(handle)
    with open(os.path.join(fold_folder, "validation", "summary.json")) as handle:
        validation = json.load(handle)
    print("\nround | log-lik/voxel | temperature | changed % | ignored % | differs from previous round %  "
          "(of the judged cases' annotated voxels)")
    for summary in state["rounds"]:
        noise = summary["noise_model"]
        print(f"{summary['round']:5d} | {noise['log_likelihood']:13.5f} | {noise['temperature']:11.3f} | "
              f"{100 * summary['fraction_changed']:9.3f} | {100 * summary['fraction_ignored']:9.3f} | "
              f"{100 * summary['fraction_changed_since_previous']:.3f}")
    last = layout.round_folder(state["rounds"][-1]["round"])
    with open(os.path.join(last, "cases.json")) as handle:
        ranked = json.load(handle)
    print(f"\ncases most in need of review (of the {len(ranked)} validation cases this fold judged: a network "
          f"never judges the cases it trained on; all in {os.path.join(last, 'cases.csv')}):")
    for row in ranked[:top]:
        print(f"  {row['rank']:2d}. {row['case']}  review score {row['review_score']:.4f}, "
              f"{row['voxels_changed']} voxels changed, {row['voxels_ignored']} ignored")
    print(f"\nrefined labels (raw geometry, complete labelsTr): {os.path.join(last, 'labelsTr')}")
    print(f"validation Dice (foreground mean, original labels as reference): "
          f"{validation['foreground_mean']['Dice']:.4f}")
    return {"rounds": state["rounds"], "ranked": ranked, "validation": validation["foreground_mean"]}
