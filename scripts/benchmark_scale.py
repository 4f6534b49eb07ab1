"""What EM's bookkeeping costs as a dataset grows: synthetic datasets of N tiny cases, every step timed.

    python scripts/benchmark_scale.py --out bench_out/scale --sizes 1000 10000 50000 \
        --report scripts/results/scale.md

No training: what grows with the number of cases is the bookkeeping around nnU-Net, so each case is a tiny
4 x 8 x 8 label (and its preprocessed segmentation) and the network's logits are drawn at random. Per size, in a
fresh child process (its peak memory is its own): keeping the originals (verified copies), the E-step through the
front door (``EStep.fit`` over every case, then ``EStep.case`` per case), staging the round (label + segmentation per
case), the round's reports and review ranking, the switch of ``labelsTr`` to the round and back (``activate``),
``status`` and the originals' checksum verification. Each size's results land in ``--out/<N>/result.json`` and a
finished size is not run again; ``--report`` writes the table from them (``--report-only``: nothing runs). Not
measured here: nnU-Net's own planning, preprocessing and training, and the seg-only refresh against
``nnUNetv2_preprocess`` on a resampled configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time

import numpy as np

SHAPE = (4, 8, 8)
NUM_CLASSES = 3
IDENTIFIER = "nnUNetPlans_3d_fullres"
RUN = "em_run__bench__nnUNetPlans__3d_fullres"


def _case(index: int) -> str:
    return f"case_{index:06d}"


def build_dataset(root: str, size: int) -> tuple[str, str, list[str]]:
    """Raw dataset (one shared image, linked per case; a label per case) and preprocessed segmentations."""
    import SimpleITK as sitk

    from nnunetv2_em import storage

    raw = os.path.join(root, "raw", "Dataset990_Scale")
    preprocessed = os.path.join(root, "preprocessed", "Dataset990_Scale")
    data = os.path.join(preprocessed, IDENTIFIER)
    for folder in (os.path.join(raw, "imagesTr"), os.path.join(raw, "labelsTr"), data):
        os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(size)
    image_file = os.path.join(root, "image.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(size=SHAPE).astype(np.float32)), image_file)
    cases = [_case(i) for i in range(size)]
    for case in cases:
        label = np.zeros(SHAPE, np.uint8)
        label[1:3, 2:6, 2:6] = 1
        label[1:3, 4:6, 4:6] = 2
        sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(raw, "labelsTr", f"{case}.nii.gz"))
        os.symlink(image_file, os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"))
        storage.write_seg_b2nd(os.path.join(data, f"{case}_seg.b2nd"), label[None].astype(np.int16), SHAPE)
        with open(os.path.join(data, f"{case}.pkl"), "wb") as handle:
            pickle.dump({"shape_before_cropping": SHAPE, "bbox_used_for_cropping": [[0, s] for s in SHAPE],
                         "shape_after_cropping_and_before_resampling": SHAPE, "spacing": (1.0, 1.0, 1.0),
                         "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                        "direction": tuple(np.eye(3).ravel())}}, handle)
    storage.write_json(os.path.join(raw, "dataset.json"), {
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": size, "file_ending": ".nii.gz"})
    return raw, preprocessed, cases


def measure(root: str, size: int) -> dict:
    """Every timed step for one size (run in a child process)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_em import reports, storage
    from nnunetv2_em.estep.pipeline import ArrayCaseInputs, EStep, EStepOptions
    from nnunetv2_em.settings import EMSettings

    timings = {}

    def timed(name, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        timings[name] = round(time.perf_counter() - started, 3)
        return result

    raw, preprocessed, cases = timed("build synthetic dataset", build_dataset, root, size)
    versions = storage.DatasetLabelVersions(raw, preprocessed, IDENTIFIER, ".nii.gz", RUN)
    timed("keep originals (verified copies)", versions.keep_originals, cases)

    def annotation(case):
        return versions.read_segmentation(0, case)[0]

    def logits(case):  # a confident network that agrees with the annotation, plus noise; drawn per case
        rng = np.random.default_rng(int(case.split("_")[1]))
        one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[annotation(case)].transpose(3, 0, 1, 2)
        return rng.normal(size=(NUM_CLASSES, *SHAPE)).astype(np.float32) + 3.0 * one_hot

    settings = EMSettings.resolve({"min_model_dice": 0.0}, source="benchmark")
    step = EStep(EStepOptions.from_settings(settings), ArrayCaseInputs(logits_of=logits, annotation_of=annotation),
                 num_classes=NUM_CLASSES, ignore_label=NUM_CLASSES, round_index=1)
    decision = timed("E-step fit (all cases)", step.fit, cases)

    reader_writer = SimpleITKIO()
    _, raw_properties = reader_writer.read_seg(versions.label_path(0, cases[0]))  # every case has this geometry
    scores, estep_seconds, stage_seconds = {}, 0.0, 0.0
    for case in cases:  # as a run does it: each case's result staged at once, only its scores kept
        started = time.perf_counter()
        result = step.case(case, decision)
        scores[case] = result.scores
        staged = time.perf_counter()
        with open(versions.original_properties_path(case), "rb") as handle:
            case_properties = pickle.load(handle)
        versions.write_case(1, case, raw_label=result.labels.astype(np.int16), raw_properties=raw_properties,
                            reader_writer=reader_writer, segmentation=result.labels[None].astype(np.int16),
                            properties=case_properties, patch_size=SHAPE)
        estep_seconds += staged - started
        stage_seconds += time.perf_counter() - staged
    timings["E-step per case (all cases)"] = round(estep_seconds, 3)
    started = time.perf_counter()
    with open(os.path.join(raw, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    dataset_json["labels"]["ignore"] = NUM_CLASSES
    versions.write_round_metadata(1, dataset_json, {case: {"provenance": storage.REFINED} for case in cases})
    timings["stage the round (label + segmentation per case, manifest)"] = round(
        stage_seconds + time.perf_counter() - started, 3)
    round_folder = os.path.join(root, "results", "round_01")
    timed("round reports + review ranking", lambda: reports.write_round_reports(
        round_folder, step.summary(scores, refine=decision.refine), step.ranking(scores)))
    timed("switch labelsTr to the round (activate)", storage.activate, versions, 1)
    timed("status", storage.dataset_status, raw, preprocessed)
    timed("verify the originals' checksums", versions.changed_originals)
    timed("switch back to the originals (restore)", storage.activate, versions, 0)
    return {"cases": size, "seconds": timings,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def report(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: r["cases"])
    steps = list(results[0]["seconds"])
    lines = ["# EM's bookkeeping at scale (synthetic cases, no training)", "",
             "`python scripts/benchmark_scale.py --out bench_out/scale --sizes "
             + " ".join(str(r["cases"]) for r in results) + " --report scripts/results/scale.md`; seconds on this "
             "machine (2 cores), each size in a fresh process; cases are 4 x 8 x 8 labels, so the figures are the "
             "bookkeeping's own cost, not nnU-Net's.", "",
             "| step | " + " | ".join(f"{r['cases']:,} cases" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for name in steps:
        lines.append(f"| {name} | " + " | ".join(f"{r['seconds'][name]:.2f}" for r in results) + " |")
    lines.append("| per case, the whole round (without building the dataset) | " + " | ".join(
        f"{1000 * sum(v for k, v in r['seconds'].items() if k != 'build synthetic dataset') / r['cases']:.2f} ms"
        for r in results) + " |")
    lines.append("| peak memory (MiB) | " + " | ".join(f"{r['peak_rss_mib']:.0f}" for r in results) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--report", help="markdown report to write")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        root = os.path.join(args.out, str(args.child))
        result = measure(os.path.join(root, "work"), args.child)
        with open(os.path.join(root, "result.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        return 0
    if not args.report_only:
        for size in args.sizes:
            root = os.path.join(args.out, str(size))
            if os.path.isfile(os.path.join(root, "result.json")):
                continue
            if os.path.isdir(root):
                import shutil

                shutil.rmtree(root)  # an interrupted size starts over
            os.makedirs(root)
            subprocess.run([sys.executable, __file__, "--out", args.out, "--child", str(size)], check=True)
            print(f"{size} cases done", flush=True)
    results = []
    for size in args.sizes:
        path = os.path.join(args.out, str(size), "result.json")
        if os.path.isfile(path):
            with open(path) as handle:
                results.append(json.load(handle))
    if not results:
        print("no results yet", file=sys.stderr)
        return 1
    text = report(results)
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
