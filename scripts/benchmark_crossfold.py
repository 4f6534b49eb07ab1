"""Speed and memory figures of the cross-fold loop on real Hippocampus MRI (docs/run.md quotes its output).

    python scripts/benchmark_crossfold.py --data ../shared/data/Dataset004_Hippocampus --out bench_out/crossfold

Measures, on the 2d configuration with the CPU budget (VanillaTrainer_cpu):
  1. E-step post-processing time (posterior, refinement, scores, class_locations, label writes, and the noise-model fit
     divided over the cases) as a share of nnU-Net's inference time for the same case (nnUNetPredictor with its
     default test-time mirroring); target <= 5 %;
  2. refreshing a case's preprocessed segmentation from refined labels vs nnU-Net's full preprocessing of the case
     (DefaultPreprocessor.run_case_save); target >= 10x faster;
  3. peak memory (max RSS) of a whole E-step (fit + every case) over 20 and over 200 cases; target: the same;
  4. a warm-started round vs a cold one on the labels of a first EM round: epochs until the EMA pseudo Dice of
     nnU-Net's validation reaches what the cold round ends with.
The first round trains on labels corrupted with the seeded 'mix' noise so that the E-step has something to do.
Takes about 35 minutes on 2 CPU cores. Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

TRAINER = "VanillaTrainer_cpu"
CONFIGURATION = "2d"
DATASET_ID = 941


def _env(root: str, results: str | None = None) -> dict:
    return {**os.environ, "nnUNet_raw": os.path.join(root, "raw"),
            "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
            "nnUNet_results": results or os.path.join(root, "results"), "nnUNet_def_n_proc": "2",
            "nnUNet_n_proc_DA": "2", "nnUNet_compile": "f"}


def prepare(data: str, root: str, seed: int) -> tuple[str, dict]:
    """Raw dataset with 'mix'-corrupted labels (clean copies kept), planned and preprocessed."""
    import SimpleITK as sitk

    from nnunetv2_em.benchmark import noise

    name = f"Dataset{DATASET_ID}_HippoBench"
    folder = os.path.join(root, "raw", name)
    if not os.path.isdir(folder):
        staging = folder + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(os.path.join(data, "imagesTr"), os.path.join(staging, "imagesTr"))
        os.makedirs(os.path.join(staging, "labelsTr"))
        clean = {}
        for file in sorted(os.listdir(os.path.join(data, "labelsTr"))):
            clean[file[:-len(".nii.gz")]] = sitk.ReadImage(os.path.join(data, "labelsTr", file))
        arrays = {case: sitk.GetArrayFromImage(image) for case, image in clean.items()}
        noisy, records, _ = noise.corrupt_cases(arrays, noise.SETTINGS["mix"], seed=seed)
        for case, image in clean.items():
            out = sitk.GetImageFromArray(noisy[case].astype(np.uint8))
            out.CopyInformation(image)
            sitk.WriteImage(out, os.path.join(staging, "labelsTr", f"{case}.nii.gz"), True)
        shutil.copy(os.path.join(data, "dataset.json"), staging)
        with open(os.path.join(staging, "noise.json"), "w") as handle:
            json.dump(records, handle)
        os.replace(staging, folder)
    for key, value in _env(root).items():
        os.environ[key] = value
    if not os.path.isdir(os.path.join(root, "preprocessed", name, f"nnUNetPlans_{CONFIGURATION}")):
        from nnunetv2_em.planning import plan_and_preprocess

        plan_and_preprocess(name, configurations=[CONFIGURATION], num_processes=2)
    with open(os.path.join(folder, "noise.json")) as handle:
        return name, json.load(handle)


def train(root: str, results: str, name: str, *, init: str | None = None, fraction: float = 1.0) -> str:
    from nnunetv2_em.mstep import DONE_MARKER

    fold = os.path.join(results, name, f"{TRAINER}__nnUNetPlans__{CONFIGURATION}", "fold_0")
    if not os.path.isfile(os.path.join(fold, DONE_MARKER)):
        command = [sys.executable, "-m", "nnunetv2_em.mstep", name, CONFIGURATION, "0", "--trainer", TRAINER,
                   "--device", "cpu", "--no-validation"]
        if init:
            command += ["--init-checkpoint", init, "--epoch-fraction", str(fraction)]
        subprocess.run(command, env=_env(root, results), check=True, stdout=subprocess.DEVNULL)
    return fold


def ema_dice_per_epoch(fold: str) -> list[float]:
    import torch

    checkpoint = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    return [float(v) for v in checkpoint["logging"]["ema_fg_dice"]]


def predictor_for(fold: str, mirroring: bool):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=mirroring, perform_everything_on_device=False,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(os.path.dirname(fold), use_folds=(0,))
    return predictor


def _managers(root: str, name: str, configuration: str):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import checks, label_conventions

    preprocessed = os.path.join(root, "preprocessed", name)
    plans_manager = PlansManager(os.path.join(preprocessed, "nnUNetPlans.json"))
    dataset_json = label_conventions.with_ignore_label(
        checks.load_dataset_json(os.path.join(preprocessed, "dataset.json")))
    return plans_manager, plans_manager.get_configuration(configuration), dataset_json


def inference_seconds(root: str, name: str, fold: str, cases: list[str]) -> dict:
    """Median per-case time of nnU-Net's sliding-window inference with its default test-time mirroring, for the
    trained CPU-budget network and for the plans' default network (nnUNetTrainer's width; timing only)."""
    import blosc2
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans_manager, configuration_manager, dataset_json = _managers(root, name, CONFIGURATION)
    data_folder = os.path.join(root, "preprocessed", name, f"nnUNetPlans_{CONFIGURATION}")
    default_network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, 1, 3, False)
    default = predictor_for(fold, mirroring=True)
    default.manual_initialization(default_network, plans_manager, configuration_manager,
                                  [default_network.state_dict()], dataset_json, "nnUNetTrainer",
                                  tuple(range(len(configuration_manager.patch_size))))
    timings = {"cpu_budget_network": [], "default_network": []}
    for key, predictor in (("cpu_budget_network", predictor_for(fold, mirroring=True)), ("default_network", default)):
        for case in cases:
            data = torch.from_numpy(blosc2.open(os.path.join(data_folder, f"{case}.b2nd"))[:])
            started = time.perf_counter()
            predictor.predict_logits_from_preprocessed_data(data)
            timings[key].append(time.perf_counter() - started)
    return {key: float(np.median(values)) for key, values in timings.items()}


def _estep(logits_of, annotation_of, **overrides):
    """Round 1 of the product's E-step (its default settings, ``overrides`` applied) over these arrays: what a
    run executes, through the same front door (Hippocampus: 3 classes, ignore label 3)."""
    import dataclasses

    from nnunetv2_em.estep.pipeline import ArrayCaseInputs, EStep, EStepOptions
    from nnunetv2_em.settings import EMSettings

    options = dataclasses.replace(EStepOptions.from_settings(EMSettings.resolve(None, source="defaults")),
                                  **overrides)
    return EStep(options, ArrayCaseInputs(logits_of, annotation_of), num_classes=3, ignore_label=3, round_index=1)


def postprocessing_seconds(root: str, name: str, cache: str, cases: list[str]) -> dict:
    """A whole E-step over ``cases`` as the cross-fold loop runs it (fit on all, then per case: posterior,
    refinement, scores, class_locations, raw and preprocessed label writes); the fit is divided over the cases."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    from nnunetv2_em import nnunet_data, storage

    plans_manager, configuration_manager, dataset_json = _managers(root, name, CONFIGURATION)
    label_manager = plans_manager.get_label_manager(dataset_json)
    reader_writer = plans_manager.image_reader_writer_class()
    data_folder = os.path.join(root, "preprocessed", name, f"nnUNetPlans_{CONFIGURATION}")

    def logits(case):
        return np.load(os.path.join(cache, "logits", f"{case}.npy")).astype(np.float32)

    started = time.perf_counter()
    step = _estep(logits, lambda c: blosc2.open(os.path.join(data_folder, f"{c}_seg.b2nd"))[:][0])
    decision = step.fit(cases)
    fit_seconds = time.perf_counter() - started
    out = os.path.join(cache, "estep_share")
    os.makedirs(out, exist_ok=True)
    per_case = []
    for case in cases:
        started = time.perf_counter()  # in the loop the logits come from the prediction step's cache too
        refined = step.case(case, decision).labels
        original = step.inputs.annotation(case)
        properties = load_pickle(os.path.join(data_folder, f"{case}.pkl"))
        properties["class_locations"] = nnunet_data.class_locations(refined[None], label_manager)
        raw_original = np.asarray(reader_writer.read_seg(os.path.join(root, "raw", name, "labelsTr",
                                                                      f"{case}.nii.gz"))[0][0]).astype(np.int32)
        raw = nnunet_data.refined_raw_label(raw_original, original, refined, properties, plans_manager,
                                            configuration_manager)
        storage.write_label_image(os.path.join(out, f"{case}.nii.gz"), raw, properties, reader_writer)
        storage.write_seg_b2nd(os.path.join(out, f"{case}_seg.b2nd"), refined[None],
                               configuration_manager.patch_size)
        storage.write_pickle(os.path.join(out, f"{case}.pkl"), properties)
        per_case.append(time.perf_counter() - started)
    return {"cases": len(cases), "fit_s": fit_seconds, "median_case_s": float(np.median(per_case)),
            "median_with_fit_share_s": float(np.median(per_case) + fit_seconds / len(cases))}


def _refresh_cases(root: str, name: str, configuration: str, cases: list[str], out: str) -> None:
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    from nnunetv2_em import nnunet_data, storage

    plans_manager, configuration_manager, dataset_json = _managers(root, name, configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    data_folder = os.path.join(root, "preprocessed", name, f"nnUNetPlans_{configuration}")
    for case in cases:
        seg = blosc2.open(os.path.join(data_folder, f"{case}_seg.b2nd"))[:]
        properties = load_pickle(os.path.join(data_folder, f"{case}.pkl"))
        properties["class_locations"] = nnunet_data.class_locations(seg, label_manager)
        storage.write_seg_b2nd(os.path.join(out, f"{case}_seg.b2nd"), seg, configuration_manager.patch_size)
        storage.write_pickle(os.path.join(out, f"{case}.pkl"), properties)


def refresh_vs_preprocess(root: str, name: str, configuration: str, cache: str) -> dict:
    """Refreshing every case's preprocessed segmentation (and class_locations) from labels, as a round does (in a
    process that has nnU-Net loaded, like a Dask worker), vs the stock ``nnUNetv2_preprocess -np 2`` of the same
    configuration over the same cases."""
    started = time.perf_counter()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_preprocess"), "-d", str(DATASET_ID),
                    "-c", configuration, "-np", "2"], env=_env(root), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    full = time.perf_counter() - started
    data_folder = os.path.join(root, "preprocessed", name, f"nnUNetPlans_{configuration}")
    cases = sorted(f[:-len(".pkl")] for f in os.listdir(data_folder) if f.endswith(".pkl"))
    out = os.path.join(cache, f"refresh_{configuration}")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    _refresh_cases(root, name, configuration, cases, out)
    refresh = time.perf_counter() - started
    return {"configuration": configuration, "cases": len(cases), "refresh_s": refresh, "nnUNetv2_preprocess_s": full,
            "speedup": full / refresh}


def peak_rss_mib() -> float:
    """High-water RSS of this process since it started (VmHWM; ru_maxrss would include the forking parent)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args) -> None:
    """Run one whole E-step over the first ``--cases`` cached cases and print the peak RSS (MiB)."""
    from nnunetv2_em import storage

    before = peak_rss_mib()
    with open(os.path.join(args.cache, "cases.json")) as handle:
        cases = json.load(handle)[:args.cases]
    segs = os.path.join(args.cache, "segs")

    def logits(case):
        return np.load(os.path.join(args.cache, "logits", f"{case}.npy")).astype(np.float32)

    step = _estep(logits, lambda c: np.load(os.path.join(segs, f"{c}.npy")), min_model_dice=0.0)
    decision = step.fit(cases)
    out = os.path.join(args.cache, f"memory_{args.cases}")
    os.makedirs(out, exist_ok=True)
    for case in cases:
        refined = step.case(case, decision).labels
        storage.write_seg_b2nd(os.path.join(out, f"{case}_seg.b2nd"), refined[None], (56, 40))
    print(json.dumps({"cases": len(cases), "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": before}))


def cache_all_logits(root: str, name: str, fold: str, cache: str) -> list[str]:
    """Logits of every case from the first-round model (no mirroring), for the memory runs and the round-2 labels."""
    import blosc2
    import torch

    data_folder = os.path.join(root, "preprocessed", name, f"nnUNetPlans_{CONFIGURATION}")
    cases = sorted(f[:-len(".pkl")] for f in os.listdir(data_folder) if f.endswith(".pkl"))
    os.makedirs(os.path.join(cache, "logits"), exist_ok=True)
    os.makedirs(os.path.join(cache, "segs"), exist_ok=True)
    predictor = None
    for case in cases:
        target = os.path.join(cache, "logits", f"{case}.npy")
        if os.path.isfile(target):
            continue
        predictor = predictor or predictor_for(fold, mirroring=False)
        data = torch.from_numpy(blosc2.open(os.path.join(data_folder, f"{case}.b2nd"))[:])
        np.save(target, predictor.predict_logits_from_preprocessed_data(data).float().numpy().astype(np.float16))
        np.save(os.path.join(cache, "segs", f"{case}.npy"),
                blosc2.open(os.path.join(data_folder, f"{case}_seg.b2nd"))[:][0])
    with open(os.path.join(cache, "cases.json"), "w") as handle:
        json.dump(cases, handle)
    return cases


def refine_into(root: str, name: str, cache: str, cases: list[str], target_root: str) -> dict:
    """A preprocessed copy of the dataset whose segmentations are the first E-step's refined labels."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import checks, label_conventions, nnunet_data, storage

    source = os.path.join(root, "preprocessed", name)
    target = os.path.join(target_root, "preprocessed", name)
    if os.path.isdir(target):
        with open(os.path.join(target, "em_refined.json")) as handle:
            return json.load(handle)
    shutil.copytree(source, target, symlinks=True)
    plans_manager = PlansManager(os.path.join(source, "nnUNetPlans.json"))
    dataset_json = label_conventions.with_ignore_label(checks.load_dataset_json(os.path.join(source, "dataset.json")))
    label_manager = plans_manager.get_label_manager(dataset_json)
    patch = plans_manager.get_configuration(CONFIGURATION).patch_size
    segs = os.path.join(cache, "segs")
    step = _estep(lambda c: np.load(os.path.join(cache, "logits", f"{c}.npy")),
                  lambda c: np.load(os.path.join(segs, f"{c}.npy")), min_model_dice=0.0)
    decision = step.fit(cases)
    changed = 0
    data_folder = os.path.join(target, f"nnUNetPlans_{CONFIGURATION}")
    for case in cases:
        result = step.case(case, decision)
        refined, scores = result.labels, result.scores
        changed += scores["voxels_changed"] + scores["voxels_ignored"]
        properties = load_pickle(os.path.join(data_folder, f"{case}.pkl"))
        properties["class_locations"] = nnunet_data.class_locations(refined[None], label_manager)
        storage.write_seg_b2nd(os.path.join(data_folder, f"{case}_seg.b2nd"), refined[None], patch)
        storage.write_pickle(os.path.join(data_folder, f"{case}.pkl"), properties)
    summary = {"voxels_changed_or_ignored": int(changed), "model_dice": decision.model_dice}
    storage.write_json(os.path.join(target, "em_refined.json"), summary)
    if not os.path.exists(os.path.join(target_root, "raw")):
        os.symlink(os.path.join(root, "raw"), os.path.join(target_root, "raw"))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "Dataset004_Hippocampus"))
    parser.add_argument("--out", default=os.path.join("bench_out", "crossfold"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args)

    out = os.path.abspath(args.out)
    root = os.path.join(out, "work")
    cache = os.path.join(out, "cache")
    os.makedirs(cache, exist_ok=True)
    results = {"configuration": CONFIGURATION, "trainer": TRAINER}
    wall = time.time()
    name, noise_records = prepare(os.path.abspath(args.data), root, args.seed)
    results["corrupted_cases"] = len(noise_records)
    cold = train(root, os.path.join(root, "results_round1"), name)
    with open(os.path.join(root, "preprocessed", name, "splits_final.json")) as handle:
        split = json.load(handle)[0]
    print("1/4 E-step post-processing vs inference", flush=True)
    cases = cache_all_logits(root, name, cold, cache)
    post = postprocessing_seconds(root, name, cache, cases)
    inference = inference_seconds(root, name, cold, split["val"][:10])
    results["estep_share"] = {**post, "inference_s": inference,
                              "share": {key: post["median_with_fit_share_s"] / value
                                        for key, value in inference.items()}}
    print("2/4 segmentation refresh vs nnUNetv2_preprocess", flush=True)
    results["refresh"] = [refresh_vs_preprocess(root, name, configuration, cache)
                          for configuration in ("2d", "3d_fullres")]
    print("3/4 E-step memory at 20 and 200 cases", flush=True)
    results["memory"] = []
    for count in (20, len(cases)):
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", "--cache", cache,
                                "--cases", str(count)], capture_output=True, text=True, check=True)
        results["memory"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print("4/4 warm vs cold round", flush=True)
    refined_root = os.path.join(out, "round2")
    results["round2_labels"] = refine_into(root, name, cache, cases, refined_root)
    os.makedirs(os.path.join(refined_root, "results_cold"), exist_ok=True)
    cold2 = train(refined_root, os.path.join(refined_root, "results_cold"), name)
    warm2 = train(refined_root, os.path.join(refined_root, "results_warm"), name,
                  init=os.path.join(cold, "checkpoint_final.pth"), fraction=0.5)
    cold_curve, warm_curve = ema_dice_per_epoch(cold2), ema_dice_per_epoch(warm2)
    target = cold_curve[-1]
    reached = next((epoch + 1 for epoch, value in enumerate(warm_curve) if value >= target), None)
    results["warm_vs_cold"] = {"cold_epochs": len(cold_curve), "cold_final_ema_dice": target,
                               "warm_epochs": len(warm_curve), "warm_final_ema_dice": warm_curve[-1],
                               "warm_epochs_to_reach_cold_final": reached,
                               "cold_curve": cold_curve, "warm_curve": warm_curve}
    results["wall_minutes"] = (time.time() - wall) / 60
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    share, memory, warm = results["estep_share"], results["memory"], results["warm_vs_cold"]
    reached = warm["warm_epochs_to_reach_cold_final"]
    rows = [
        f"| measure ({results['configuration']}) | result | target |",
        "|---|---|---|",
        f"| E-step post-processing per case ({share['cases']} cases, fit {share['fit_s']:.1f} s shared) vs nnU-Net "
        f"inference with mirroring, default network | {share['median_with_fit_share_s'] * 1000:.0f} ms vs "
        f"{share['inference_s']['default_network'] * 1000:.0f} ms: {share['share']['default_network']:.1%} | <= 5 % |",
        f"| same, vs the narrow CPU-budget network ({results['trainer']}) | "
        f"{share['median_with_fit_share_s'] * 1000:.0f} ms vs {share['inference_s']['cpu_budget_network'] * 1000:.0f} "
        f"ms: {share['share']['cpu_budget_network']:.1%} | <= 5 % |",
    ]
    for refresh in results["refresh"]:
        rows.append(f"| segmentation refresh of {refresh['cases']} cases vs `nnUNetv2_preprocess` "
                    f"({refresh['configuration']}) | {refresh['refresh_s']:.1f} s vs "
                    f"{refresh['nnUNetv2_preprocess_s']:.1f} s: {refresh['speedup']:.1f}x faster | >= 10x |")
    rows += [
        f"| E-step peak RSS (VmHWM), {memory[0]['cases']} vs {memory[1]['cases']} cases | "
        f"{memory[0]['peak_rss_mib']:.0f} MiB vs {memory[1]['peak_rss_mib']:.0f} MiB (after imports "
        f"{memory[0]['rss_after_imports_mib']:.0f} MiB) | the same |",
        f"| warm-started round ({warm['warm_epochs']} epochs) vs cold ({warm['cold_epochs']} epochs): epochs until "
        f"the EMA pseudo Dice reaches the cold round's final {warm['cold_final_ema_dice']:.3f} | "
        f"{reached if reached else 'not reached'} (warm final {warm['warm_final_ema_dice']:.3f}) | fewer |",
        "",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
