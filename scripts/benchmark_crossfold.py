"""Speed and memory figures of the cross-fold loop on real Hippocampus MRI (the README quotes its output).

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
import resource
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

    from nnunetv2_em import noise

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


def estep_share(root: str, name: str, fold: str, val_cases: list[str], cache: str) -> dict:
    """Inference (nnU-Net default, with mirroring) vs E-step post-processing, per out-of-fold case."""
    import blosc2
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import checks, estep, label_store, nnunet_data

    preprocessed = os.path.join(root, "preprocessed", name)
    data_folder = os.path.join(preprocessed, f"nnUNetPlans_{CONFIGURATION}")
    plans_manager = PlansManager(os.path.join(preprocessed, "nnUNetPlans.json"))
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    dataset_json = checks.with_ignore_label(checks.load_dataset_json(os.path.join(preprocessed, "dataset.json")))
    label_manager = plans_manager.get_label_manager(dataset_json)
    reader_writer = plans_manager.image_reader_writer_class()
    predictor = predictor_for(fold, mirroring=True)
    inference, logits_by_case = {}, {}
    for case in val_cases:
        data = torch.from_numpy(blosc2.open(os.path.join(data_folder, f"{case}.b2nd"))[:])
        started = time.perf_counter()
        logits_by_case[case] = predictor.predict_logits_from_preprocessed_data(data).float().numpy()
        inference[case] = time.perf_counter() - started
    started = time.perf_counter()
    samples = [estep.sample_case(logits_by_case[c], blosc2.open(os.path.join(data_folder, f"{c}_seg.b2nd"))[:][0],
                                 max_voxels_per_class=estep.voxels_per_class(100_000, num_cases=len(val_cases),
                                                                             num_classes=3), seed=[0, 1, i])
               for i, c in enumerate(val_cases)]
    fit = estep.fit_round(samples, calibrate_temperature=True, max_iterations=30, min_model_dice=0.5)
    fit_seconds = time.perf_counter() - started
    out = os.path.join(cache, "estep_share")
    os.makedirs(out, exist_ok=True)
    post = {}
    for case in val_cases:
        started = time.perf_counter()
        original = blosc2.open(os.path.join(data_folder, f"{case}_seg.b2nd"))[:][0]
        refined, _ = estep.refine_case(logits_by_case[case], original, fit.model,
                                       thresholds=estep.RefinementThresholds(), ignore_label=3)
        properties = load_pickle(os.path.join(data_folder, f"{case}.pkl"))
        properties["class_locations"] = nnunet_data.class_locations(refined[None], label_manager)
        raw_original = np.asarray(reader_writer.read_seg(os.path.join(root, "raw", name, "labelsTr",
                                                                      f"{case}.nii.gz"))[0][0]).astype(np.int32)
        raw = nnunet_data.refined_raw_label(raw_original, original, refined, properties, plans_manager,
                                            configuration_manager)
        label_store.write_label_image(os.path.join(out, f"{case}.nii.gz"), raw, properties, reader_writer)
        label_store.write_seg_b2nd(os.path.join(out, f"{case}_seg.b2nd"), refined[None],
                                   configuration_manager.patch_size)
        label_store.write_pickle(os.path.join(out, f"{case}.pkl"), properties)
        post[case] = time.perf_counter() - started + fit_seconds / len(val_cases)
    shares = [post[c] / inference[c] for c in val_cases]
    return {"cases": len(val_cases), "median_inference_s": float(np.median(list(inference.values()))),
            "median_postprocessing_s": float(np.median(list(post.values()))),
            "fit_s": fit_seconds, "median_share": float(np.median(shares)), "max_share": float(np.max(shares)),
            "total_share": float(sum(post.values()) / sum(inference.values())), "model_dice": fit.model_dice}


def refresh_vs_preprocess(root: str, name: str, cases: list[str], cache: str) -> dict:
    """Preprocessed segmentation from refined labels (what a round writes) vs nnU-Net's full preprocessing."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import checks, label_store, nnunet_data

    preprocessed = os.path.join(root, "preprocessed", name)
    data_folder = os.path.join(preprocessed, f"nnUNetPlans_{CONFIGURATION}")
    plans_manager = PlansManager(os.path.join(preprocessed, "nnUNetPlans.json"))
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    dataset_json = checks.with_ignore_label(checks.load_dataset_json(os.path.join(preprocessed, "dataset.json")))
    label_manager = plans_manager.get_label_manager(dataset_json)
    out = os.path.join(cache, "refresh")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    for case in cases:
        seg = blosc2.open(os.path.join(data_folder, f"{case}_seg.b2nd"))[:]
        properties = load_pickle(os.path.join(data_folder, f"{case}.pkl"))
        properties["class_locations"] = nnunet_data.class_locations(seg, label_manager)
        label_store.write_seg_b2nd(os.path.join(out, f"{case}_seg.b2nd"), seg, configuration_manager.patch_size)
        label_store.write_pickle(os.path.join(out, f"{case}.pkl"), properties)
    refresh = time.perf_counter() - started
    preprocessor = DefaultPreprocessor(verbose=False)
    full_out = os.path.join(cache, "full_preprocess")
    os.makedirs(full_out, exist_ok=True)
    raw = os.path.join(root, "raw", name)
    started = time.perf_counter()
    for case in cases:
        preprocessor.run_case_save(os.path.join(full_out, case), [os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz")],
                                   os.path.join(raw, "labelsTr", f"{case}.nii.gz"), plans_manager,
                                   configuration_manager, dataset_json)
    full = time.perf_counter() - started
    return {"cases": len(cases), "refresh_s": refresh, "full_preprocess_s": full, "speedup": full / refresh}


def memory_child(args) -> None:
    """Run one whole E-step over the first ``--cases`` cached cases and print the peak RSS (MiB)."""
    from nnunetv2_em import estep, label_store

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(args.cache, "cases.json")) as handle:
        cases = json.load(handle)[:args.cases]
    segs = os.path.join(args.cache, "segs")

    def logits(case):
        return np.load(os.path.join(args.cache, "logits", f"{case}.npy")).astype(np.float32)

    cap = estep.voxels_per_class(100_000, num_cases=len(cases), num_classes=3)
    samples = [estep.sample_case(logits(c), np.load(os.path.join(segs, f"{c}.npy")), max_voxels_per_class=cap,
                                 seed=[0, 1, i]) for i, c in enumerate(cases)]
    fit = estep.fit_round(samples, calibrate_temperature=True, max_iterations=30, min_model_dice=0.0)
    del samples
    out = os.path.join(args.cache, f"memory_{args.cases}")
    os.makedirs(out, exist_ok=True)
    for case in cases:
        refined, _ = estep.refine_case(logits(case), np.load(os.path.join(segs, f"{case}.npy")), fit.model,
                                       thresholds=estep.RefinementThresholds(), ignore_label=3)
        label_store.write_seg_b2nd(os.path.join(out, f"{case}_seg.b2nd"), refined[None], (56, 40))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cases": len(cases), "peak_rss_mib": peak, "rss_after_imports_mib": before}))


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

    from nnunetv2_em import checks, estep, label_store, nnunet_data

    source = os.path.join(root, "preprocessed", name)
    target = os.path.join(target_root, "preprocessed", name)
    if os.path.isdir(target):
        with open(os.path.join(target, "em_refined.json")) as handle:
            return json.load(handle)
    shutil.copytree(source, target, symlinks=True)
    plans_manager = PlansManager(os.path.join(source, "nnUNetPlans.json"))
    dataset_json = checks.with_ignore_label(checks.load_dataset_json(os.path.join(source, "dataset.json")))
    label_manager = plans_manager.get_label_manager(dataset_json)
    patch = plans_manager.get_configuration(CONFIGURATION).patch_size
    segs = os.path.join(cache, "segs")
    samples = [estep.sample_case(np.load(os.path.join(cache, "logits", f"{c}.npy")).astype(np.float32),
                                 np.load(os.path.join(segs, f"{c}.npy")), max_voxels_per_class=200, seed=[0, 1, i])
               for i, c in enumerate(cases)]
    fit = estep.fit_round(samples, calibrate_temperature=True, max_iterations=30, min_model_dice=0.0)
    changed = 0
    data_folder = os.path.join(target, f"nnUNetPlans_{CONFIGURATION}")
    for case in cases:
        original = np.load(os.path.join(segs, f"{case}.npy"))
        refined, scores = estep.refine_case(np.load(os.path.join(cache, "logits", f"{case}.npy")).astype(np.float32),
                                            original, fit.model, thresholds=estep.RefinementThresholds(),
                                            ignore_label=3)
        changed += scores["voxels_changed"] + scores["voxels_ignored"]
        properties = load_pickle(os.path.join(data_folder, f"{case}.pkl"))
        properties["class_locations"] = nnunet_data.class_locations(refined[None], label_manager)
        label_store.write_seg_b2nd(os.path.join(data_folder, f"{case}_seg.b2nd"), refined[None], patch)
        label_store.write_pickle(os.path.join(data_folder, f"{case}.pkl"), properties)
    summary = {"voxels_changed_or_ignored": int(changed), "model_dice": fit.model_dice}
    label_store.write_json(os.path.join(target, "em_refined.json"), summary)
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
    print("1/4 E-step share of inference", flush=True)
    results["estep_share"] = estep_share(root, name, cold, split["val"], cache)
    print("2/4 segmentation refresh vs full preprocessing", flush=True)
    results["refresh"] = refresh_vs_preprocess(root, name, split["val"], cache)
    print("3/4 E-step memory at 20 and 200 cases", flush=True)
    cases = cache_all_logits(root, name, cold, cache)
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
    share, refresh, memory, warm = (results["estep_share"], results["refresh"], results["memory"],
                                    results["warm_vs_cold"])
    reached = warm["warm_epochs_to_reach_cold_final"]
    return "\n".join([
        f"| measure ({results['configuration']}, {results['trainer']}) | result | target |",
        "|---|---|---|",
        f"| E-step post-processing / nnU-Net inference per case ({share['cases']} cases) | median "
        f"{share['median_share']:.1%}, max {share['max_share']:.1%} ({share['median_postprocessing_s'] * 1000:.0f} ms "
        f"vs {share['median_inference_s'] * 1000:.0f} ms) | <= 5 % |",
        f"| segmentation refresh vs full nnU-Net preprocessing ({refresh['cases']} cases) | "
        f"{refresh['refresh_s']:.2f} s vs {refresh['full_preprocess_s']:.2f} s: {refresh['speedup']:.1f}x faster "
        f"| >= 10x |",
        f"| E-step peak RSS, {memory[0]['cases']} vs {memory[1]['cases']} cases | "
        f"{memory[0]['peak_rss_mib']:.0f} MiB vs {memory[1]['peak_rss_mib']:.0f} MiB | the same |",
        f"| warm-started round ({warm['warm_epochs']} epochs) vs cold ({warm['cold_epochs']} epochs): epochs to reach "
        f"the cold round's final EMA pseudo Dice {warm['cold_final_ema_dice']:.3f} | "
        f"{reached if reached else 'not reached'} (warm final {warm['warm_final_ema_dice']:.3f}) | fewer |",
        "",
    ])


if __name__ == "__main__":
    main()
