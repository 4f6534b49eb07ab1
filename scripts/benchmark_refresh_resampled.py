"""A round's segmentation refresh vs rerunning nnU-Net's preprocessing, on data that nnU-Net resamples.

    python scripts/benchmark_refresh_resampled.py --data ../shared/data/Dataset004_Hippocampus \
        --out bench_out/refresh_resampled --report scripts/results/refresh_resampled.md

Each round of ``nnunetv2_em run`` stages its labels without rerunning nnU-Net's preprocessing: the E-step's label is
already in the preprocessed geometry, so it is written as the training segmentation directly, and only the voxels
it changed are mapped back to the raw label (``crossfold.tasks.stage_case_labels``). On Hippocampus, whose cases
are all 1 mm isotropic, nnU-Net resamples nothing and the saving was small (2.8-5.5x, docs/run.md). Here every case
of a copy of the shared Hippocampus cases gets its own through-plane spacing (header only, voxels unchanged, drawn
uniformly from 1-3 mm with a fixed seed), so nnU-Net resamples every case to the median spacing, images with
third-order splines and labels per class; a second copy is also upsampled 3x in-plane (images linear, labels
nearest), for volumes nearer a clinical scan's size. Per copy, ``3d_fullres`` planned by ``EMPlanner`` (``2d``
resamples nothing here), on one core each:
  - nnU-Net's preprocessing of every case (``preprocessor.run_case_save`` in this process, imports done), and the
    stock ``nnUNetv2_preprocess -np 1`` command's wall time (its imports included);
  - the refresh of every case as a round stages it, for an E-step label that grows the anterior class by one voxel
    into the background (a typical boundary correction): the raw label mapped back, ``class_locations``, the
    segmentation and both files written (``stage_case_labels``, the function ``run`` calls); and the same for a
    label the E-step left unchanged (the raw label is then the original: no resampling);
  - what the refresh gives up: nnU-Net's preprocessing of the staged raw label compared with the staged
    segmentation (voxels that differ, and how many of the E-step's changes that preprocessing keeps).
The dataset and its preprocessing are built once and reused; results.json in --out, a table in --report and the
results beside it (``<report>.json``, committed: ``--report-only`` rebuilds the table from it).
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

FIRST_DATASET_ID = 943
RUN = "em_run__bench__nnUNetPlans__refresh"
CONFIGURATION = "3d_fullres"  # 2d resamples nothing here: every case keeps the same in-plane spacing
SEED = 943


def dataset_name(variant: int, upsample: int) -> str:
    return f"Dataset{FIRST_DATASET_ID + variant}_HippoResampledX{upsample}"


def _env(root: str) -> dict:
    return {**os.environ, "nnUNet_raw": os.path.join(root, "raw"),
            "nnUNet_preprocessed": os.path.join(root, "preprocessed"), "nnUNet_results": os.path.join(root, "results"),
            "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}


def prepare(data: str, root: str, name: str, upsample: int, limit: int | None = None) -> dict[str, float]:
    """The resampled copy (once), planned and preprocessed; returns each case's through-plane spacing.
    ``upsample``: in-plane factor (images linear, labels nearest; spacing divided by it), for volumes nearer the
    size of a clinical scan than Hippocampus's crops."""
    import SimpleITK as sitk
    from scipy import ndimage

    folder = os.path.join(root, "raw", name)
    if not os.path.isdir(folder):
        staging = folder + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(staging, sub))
        rng = np.random.default_rng(SEED)
        spacings = {}
        for file in sorted(os.listdir(os.path.join(data, "labelsTr")))[:limit]:
            case = file[:-len(".nii.gz")]
            spacings[case] = round(float(rng.uniform(1.0, 3.0)), 3)
            for source, target in ((os.path.join(data, "imagesTr", f"{case}_0000.nii.gz"),
                                    os.path.join(staging, "imagesTr", f"{case}_0000.nii.gz")),
                                   (os.path.join(data, "labelsTr", file), os.path.join(staging, "labelsTr", file))):
                image = sitk.ReadImage(source)
                if upsample > 1:
                    is_label = source.startswith(os.path.join(data, "labelsTr"))
                    array = ndimage.zoom(sitk.GetArrayFromImage(image), (1, upsample, upsample),
                                         order=0 if is_label else 1)
                    zoomed = sitk.GetImageFromArray(array)
                    zoomed.SetOrigin(image.GetOrigin())
                    zoomed.SetDirection(image.GetDirection())
                    image = zoomed
                image.SetSpacing((1.0 / upsample, 1.0 / upsample, spacings[case]))
                sitk.WriteImage(image, target, True)
        with open(os.path.join(data, "dataset.json")) as handle:
            dataset_json = json.load(handle)
        with open(os.path.join(staging, "dataset.json"), "w") as handle:
            json.dump({**dataset_json, "numTraining": len(spacings)}, handle, indent=2)
        with open(os.path.join(staging, "spacings.json"), "w") as handle:
            json.dump(spacings, handle)
        os.replace(staging, folder)
    os.environ.update(_env(root))
    if not os.path.isdir(os.path.join(root, "preprocessed", name, f"nnUNetPlans_{CONFIGURATION}")):
        from nnunetv2_em.planning import plan_and_preprocess

        plan_and_preprocess(name, configurations=[CONFIGURATION], num_processes=2)
    with open(os.path.join(folder, "spacings.json")) as handle:
        return json.load(handle)


def _managers(root: str, name: str, configuration: str):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = os.path.join(root, "preprocessed", name)
    plans_manager = PlansManager(os.path.join(preprocessed, "nnUNetPlans.json"))
    with open(os.path.join(preprocessed, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    return plans_manager, plans_manager.get_configuration(configuration), dataset_json


def refined(annotation: np.ndarray) -> np.ndarray:
    """The stand-in E-step label ``(*spatial)``: the anterior class (1) grown by one voxel into the background."""
    from scipy import ndimage

    labels = annotation.copy()
    labels[ndimage.binary_dilation(annotation == 1) & (annotation == 0)] = 1
    return labels


def measure(root: str, name: str, upsample: int, configuration: str = CONFIGURATION) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    from nnunetv2_em import nnunet_data, storage
    from nnunetv2_em.crossfold.tasks import stage_case_labels

    plans_manager, configuration_manager, dataset_json = _managers(root, name, configuration)
    raw = os.path.join(root, "raw", name)
    preprocessed = os.path.join(root, "preprocessed", name)
    identifier = configuration_manager.data_identifier
    data_folder = os.path.join(preprocessed, identifier)
    cases = sorted(f[:-len(".pkl")] for f in os.listdir(data_folder) if f.endswith(".pkl"))
    images = {case: [os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz")] for case in cases}

    # nnU-Net's preprocessing, per case in this process and as the stock command
    scratch = os.path.join(root, "scratch", configuration)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    started = time.perf_counter()
    for case in cases:
        preprocessor.run_case_save(os.path.join(scratch, case), images[case],
                                   os.path.join(raw, "labelsTr", f"{case}.nii.gz"), plans_manager,
                                   configuration_manager, dataset_json)
    in_process = time.perf_counter() - started
    shutil.rmtree(scratch)
    started = time.perf_counter()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_preprocess"), "-d",
                    name[len("Dataset"):len("Dataset") + 3],
                    "-c", configuration, "-np", "1"], env=_env(root), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    command = time.perf_counter() - started

    # the refresh, as a round stages its cases
    run = f"{RUN}_{configuration}"
    shutil.rmtree(os.path.join(preprocessed, "em_labels", run), ignore_errors=True)
    shutil.rmtree(os.path.join(raw, "em_labels", run), ignore_errors=True)
    versions = storage.DatasetLabelVersions(raw, preprocessed, identifier, dataset_json["file_ending"], run)
    versions.keep_originals(cases)
    inputs = {}
    for case in cases:
        annotation = versions.read_segmentation(0, case)[0]
        inputs[case] = (annotation, refined(annotation), load_pickle(os.path.join(data_folder, f"{case}.pkl")))

    def stage_round(round_index: int, changed: bool) -> float:
        """Seconds to stage every case as a round does: the E-step's change, or (``changed`` False) no change."""
        started = time.perf_counter()
        for case in cases:
            annotation, labels, properties = inputs[case]
            stage_case_labels(versions, round_index, case, labels if changed else annotation, annotation=annotation,
                              properties=properties, plans_manager=plans_manager,
                              configuration_manager=configuration_manager, dataset_json=dataset_json)
        return time.perf_counter() - started

    refresh = stage_round(1, changed=True)
    refresh_unchanged = stage_round(2, changed=False)  # a round that changes nothing (most cases of a later round)

    # what nnU-Net's preprocessing makes of the staged raw labels, against the staged segmentations
    differing, total, changes, changes_kept, shapes_differ = 0, 0, 0, 0, 0
    for case in cases:
        annotation, labels, _ = inputs[case]
        again, _ = nnunet_data.preprocess_label(versions.label_path(1, case), images[case], plans_manager,
                                                configuration_manager, dataset_json)
        if again[0].shape != labels.shape:
            shapes_differ += 1
            continue
        differing += int((again[0] != labels).sum())
        total += labels.size
        changed = labels != annotation
        changes += int(changed.sum())
        changes_kept += int((again[0][changed] == labels[changed]).sum())
    return {"dataset": name, "upsample": upsample, "configuration": configuration, "cases": len(cases),
            "median_shape": [int(v) for v in np.median([inputs[c][0].shape for c in cases], axis=0)],
            "target_spacing": [float(v) for v in configuration_manager.spacing],
            "nnunet_preprocessing_in_process_s": round(in_process, 2), "nnUNetv2_preprocess_np1_s": round(command, 2),
            "refresh_s": round(refresh, 2), "refresh_unchanged_s": round(refresh_unchanged, 2),
            "speedup_in_process": round(in_process / refresh, 2),
            "speedup_command": round(command / refresh, 2),
            "voxels_differing_after_repreprocessing": differing / max(total, 1),
            "estep_changes": changes, "estep_changes_kept_by_repreprocessing": changes_kept / max(changes, 1),
            "cases_whose_shape_differs": shapes_differ}


def report(results: dict) -> str:
    lines = ["# Segmentation refresh vs nnU-Net's preprocessing on resampled data", "",
             "`python scripts/benchmark_refresh_resampled.py --data ../shared/data/Dataset004_Hippocampus --out "
             "bench_out/refresh_resampled --report scripts/results/refresh_resampled.md`: the shared Hippocampus "
             "cases, each with its own through-plane spacing (1-3 mm, drawn with a fixed seed), so nnU-Net resamples "
             "every case to the median; x1: the volumes as they are, x3: upsampled in-plane (nearer a clinical scan's "
             "size); one core for each path; seconds for all cases on this machine (2 cores).", "",
             "| in-plane upsampling, configuration | cases (median preprocessed shape) | "
             "nnU-Net preprocessing, in process | `nnUNetv2_preprocess -np 1` | "
             "refresh (`stage_case_labels`), every case changed / none changed | "
             "speed-up (in process / command), every case changed | "
             "voxels differing if re-preprocessed | E-step changes kept if re-preprocessed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["configurations"]:
        lines.append(
            f"| x{r['upsample']}, {r['configuration']} | {r['cases']} ({' x '.join(map(str, r['median_shape']))}) | "
            f"{r['nnunet_preprocessing_in_process_s']:.1f} s | {r['nnUNetv2_preprocess_np1_s']:.1f} s | "
            f"{r['refresh_s']:.1f} s / {r['refresh_unchanged_s']:.1f} s | "
            f"{r['speedup_in_process']:.1f}x / {r['speedup_command']:.1f}x | "
            f"{100 * r['voxels_differing_after_repreprocessing']:.3f} % | "
            f"{100 * r['estep_changes_kept_by_repreprocessing']:.1f} % of {r['estep_changes']:,} |")
    lines += ["", "The refresh writes the E-step's label as the training segmentation as it is; the last two columns "
              "say how far that is from what `nnUNetv2_preprocess` would make of the staged raw label (its round "
              "trip through the raw geometry), i.e. what a user who reran nnU-Net's preprocessing on the round's "
              "`labelsTr` would train on instead."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--upsample", type=int, nargs="+", default=[1, 3],
                        help="in-plane upsampling factors, one dataset each (1: the cases as they are)")
    parser.add_argument("--limit", type=int, help="only the first N cases (a quick check of the script)")
    args = parser.parse_args(argv)
    result_file = os.path.join(args.out, "results.json")
    if not args.report_only:
        root = os.path.abspath(os.path.join(args.out, "work"))
        results = {"configurations": []}
        for variant, upsample in enumerate(args.upsample):
            name = dataset_name(variant, upsample)
            spacings = prepare(os.path.abspath(args.data), root, name, upsample, args.limit)
            results["spacing_range_mm"] = [min(spacings.values()), max(spacings.values())]
            results["configurations"].append(measure(root, name, upsample))
        with open(result_file, "w") as handle:
            json.dump(results, handle, indent=2)
    committed = os.path.splitext(args.report)[0] + ".json" if args.report else None
    if not os.path.isfile(result_file) and committed and os.path.isfile(committed):
        result_file = committed  # --report-only from the committed results
    with open(result_file) as handle:
        results = json.load(handle)
    text = report(results)
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(text)
        with open(committed, "w") as handle:
            json.dump(results, handle, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
