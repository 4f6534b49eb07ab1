"""``nnunetv2_em benchmark``: EM vs vanilla nnU-Net on a dataset with trusted labels and seeded annotation noise.

From a clean raw nnU-Net dataset it (1) splits cases into train and held-out test (seeded, written down), (2) corrupts
only the training labels with a named noise setting (records which cases and voxels), (3) trains with the same
budget (a) vanilla nnU-Net on the noisy labels, (b) the cross-fold EM loop on the noisy labels followed by the same
training on its refined labels, (c) vanilla nnU-Net on the clean labels, and (4) reports test Dice with bootstrap
confidence intervals, the share of the noise-induced drop that EM recovers, label quality per EM round, how well
the ranked case list and the changed voxels find the corruption (next to cleanlab's segmentation label-issue finder
on the same out-of-fold probabilities), and wall time and peak memory per arm.

The vanilla arms plan with nnU-Net's own ``ExperimentPlanner``; every arm's final model uses the same trainer,
configuration and budget (``fold all``). Steps already done are skipped when the command is run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from nnunetv2_em import checks, estep, label_store
from nnunetv2_em.benchmark import noise
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.layout import RunLayout


@dataclass(frozen=True)
class Profile:
    configuration: str
    trainer: str
    train_cases: int | None  # None: 80 % of the dataset
    test_cases: int | None  # None: the rest
    folds: int
    rounds: int
    device: str
    mirroring: bool
    min_model_dice: float | None = None  # None: the plans' default
    description: str = ""


PROFILES = {
    "cpu": Profile("2d", "VanillaTrainer_cpu", 40, 20, folds=2, rounds=1, device="cpu", mirroring=False,
                   description="2-core CPU, under an hour: 2d, VanillaTrainer_cpu (20 x 40 iterations), 40 train / "
                               "20 test cases, EM with 2 folds x 1 round"),
    "cpu-long": Profile("2d", "VanillaTrainer_cpu_40epochs", 40, 20, folds=2, rounds=1, device="cpu",
                        mirroring=False, description="the cpu profile with twice the training (40 x 40 iterations), "
                                                     "about an hour on a fast 2-core machine"),
    "gpu": Profile("3d_fullres", "nnUNetTrainer", None, None, folds=5, rounds=3, device="cuda", mirroring=True,
                   description="one GPU, nnU-Net's full budget: 3d_fullres, nnUNetTrainer (1000 epochs), 80/20 split, "
                               "EM with 5 folds x 3 rounds"),
    "smoke": Profile("2d", "VanillaTrainer_tiny", 8, 3, folds=2, rounds=1, device="cpu", mirroring=False,
                     min_model_dice=0.0, description="checks the harness in minutes; the numbers mean nothing"),
}
ARM_IDS = {"noisy": 961, "em": 962, "clean": 963}


@dataclass
class Workspace:
    out: str

    @property
    def nnunet(self) -> str:
        return os.path.join(self.out, "nnunet")

    def env(self) -> dict:
        return {**os.environ, "nnUNet_raw": os.path.join(self.nnunet, "raw"),
                "nnUNet_preprocessed": os.path.join(self.nnunet, "preprocessed"),
                "nnUNet_results": os.path.join(self.nnunet, "results"),
                **{key: os.environ.get(key, value) for key, value in
                   (("nnUNet_def_n_proc", "2"), ("nnUNet_n_proc_DA", "2"), ("nnUNet_compile", "f"))}}

    def dataset(self, arm: str) -> str:
        return f"Dataset{ARM_IDS[arm]}_Bench{arm.capitalize()}"

    def raw(self, arm: str) -> str:
        return os.path.join(self.nnunet, "raw", self.dataset(arm))

    def preprocessed(self, arm: str) -> str:
        return os.path.join(self.nnunet, "preprocessed", self.dataset(arm))

    def em_run(self, profile: Profile) -> RunLayout:
        """The EM arm's ``nnunetv2_em run``."""
        return RunLayout(os.path.join(self.nnunet, "results"), self.dataset("em"), profile.trainer, "nnUNetPlans",
                         profile.configuration)

    def em_versions(self, profile: Profile, file_ending: str) -> label_store.DatasetLabelVersions:
        """The EM arm's label versions (round 0: the noisy labels; rounds >= 1: the run's refinements)."""
        return label_store.DatasetLabelVersions(self.raw("em"), self.preprocessed("em"),
                                                f"nnUNetPlans_{profile.configuration}", file_ending,
                                                run=self.em_run(profile).name)


# -------------------------------------------------------------------------------------------------- helpers
def _tree_rss_mib(process) -> float:
    """Resident memory of a process and all its descendants (MiB)."""
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _run_measured(command: list[str], env: dict, log_file: str) -> dict:
    """Run a command; return its wall time and the peak resident memory of its whole process tree, sampled twice a
    second (``ru_maxrss`` of a child would include the memory of this process at the fork)."""
    import psutil

    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    started = time.time()
    peak = 0.0
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            peak = max(peak, _tree_rss_mib(watched))
            time.sleep(0.5)
    if process.returncode != 0:
        with open(log_file) as log:
            raise RuntimeError(f"{' '.join(command)} failed (log {log_file}):\n{log.read()[-3000:]}")
    return {"seconds": time.time() - started, "peak_rss_mib": peak}


def _console(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _read_label(path: str) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _write_label_like(array: np.ndarray, reference: str, path: str) -> None:
    import SimpleITK as sitk

    image = sitk.ReadImage(reference)
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(image)
    label_store.atomic_write(path, lambda temp: sitk.WriteImage(out, temp, True), suffix=".nii.gz")


def bootstrap_ci(values, *, seed: int = 0, samples: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Mean over cases and its percentile bootstrap interval (cases resampled with replacement)."""
    values = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (samples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def recovery_share(noisy: float, em: float, clean: float) -> float:
    """Share of the noise-induced drop that EM recovers: ((b) - (a)) / ((c) - (a)); NaN without a drop."""
    drop = clean - noisy
    return float((em - noisy) / drop) if abs(drop) > 1e-12 else float("nan")


def detection_scores(truth: np.ndarray, flagged: np.ndarray) -> dict:
    """Precision, recall and F1 of boolean ``flagged`` against boolean ``truth`` (same shape)."""
    true_positive = int(np.count_nonzero(truth & flagged))
    precision = true_positive / max(int(flagged.sum()), 1)
    recall = true_positive / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum()),
            "true": int(truth.sum())}


FLAG_FACTOR = 2.0  # a case is flagged for review when its review score is above FLAG_FACTOR x the median


def ranking_scores(ranked: list[dict], corrupted: set[str]) -> dict:
    """Quality of the ranked case list (rows with ``case`` and ``review_score``, best first) against the truly
    corrupted cases: precision / recall of the flagged cases (review score > ``FLAG_FACTOR`` x median), precision
    at k = number of corrupted cases, and the average precision of the whole ranking."""
    cases = [row["case"] for row in ranked]
    scores = np.array([row["review_score"] for row in ranked], dtype=float)
    flagged = {case for case, score in zip(cases, scores, strict=True) if score > FLAG_FACTOR * np.median(scores)}
    k = len(corrupted)
    hits = [case in corrupted for case in cases]
    precisions = [sum(hits[:i + 1]) / (i + 1) for i, hit in enumerate(hits) if hit]
    return {"flagged": len(flagged), "precision": len(flagged & corrupted) / max(len(flagged), 1),
            "recall": len(flagged & corrupted) / max(k, 1), "k": k, "precision_at_k": sum(hits[:k]) / max(k, 1),
            "average_precision": float(np.mean(precisions)) if precisions else 0.0}


def label_dice(reference: np.ndarray, labels: np.ndarray, *, classes, ignore_label: int | None,
               annotation: np.ndarray | None = None) -> dict:
    """Dice per class of training labels against the clean ones, two ways, and the ignored share.

    ``dice_<c>`` leaves ignored voxels out (it rewards ignoring: a voxel set to ignore can no longer be wrong);
    ``dice_kept_<c>`` (with ``annotation``, the labels EM started from) scores an ignored voxel as the annotation
    it replaced, so ignoring gains nothing over keeping. All arrays have the same shape.
    """
    keep = np.ones(reference.shape, bool) if ignore_label is None else labels != ignore_label
    result = {f"dice_{c}": estep.dice((reference == c) & keep, (labels == c) & keep) for c in classes}
    if annotation is not None:
        filled = np.where(keep, labels, annotation)
        result.update({f"dice_kept_{c}": estep.dice(reference == c, filled == c) for c in classes})
    result["fraction_ignored"] = float(1 - keep.mean())
    return result


# ------------------------------------------------------------------------------------------------- the steps
class Benchmark:
    def __init__(self, dataset_path: str, noise_name: str, *, seed: int, profile: str, out: str,
                 training_seed: int | None = None):
        if noise_name not in noise.SETTINGS:
            raise EMInputError(f"--noise {noise_name}: unknown. Fix: pick one of {sorted(noise.SETTINGS)}.")
        if profile not in PROFILES:
            raise EMInputError(f"--profile {profile}: unknown. Fix: pick one of {sorted(PROFILES)}.")
        self.source = os.path.abspath(dataset_path)
        self.cases = checks.check_raw_dataset(self.source)
        self.dataset_json = checks.load_dataset_json(os.path.join(self.source, "dataset.json"))
        self.classes = checks.label_values(self.dataset_json, os.path.join(self.source, "dataset.json"))[1:]
        self.setting = noise.SETTINGS[noise_name]
        self.seed = seed
        self.training_seed = training_seed  # every training of every arm (nnunetv2_em.seeding); None: unseeded
        self.profile = PROFILES[profile]
        self.profile_name = profile
        self.workspace = Workspace(os.path.abspath(out))
        self.ending = self.dataset_json["file_ending"]
        needed = (self.profile.train_cases or 0) + (self.profile.test_cases or 0)
        if needed > len(self.cases):
            raise EMInputError(f"{self.source}: {len(self.cases)} cases, profile {profile} needs {needed}. Fix: use "
                               f"a larger dataset or another profile.")

    # 1 + 2: split and corrupt
    def prepare(self) -> dict:
        path = os.path.join(self.workspace.out, "split.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        rng = np.random.default_rng(self.seed)
        cases = [str(c) for c in rng.permutation(sorted(self.cases))]
        n_train = self.profile.train_cases or int(round(0.8 * len(cases)))
        n_test = self.profile.test_cases or len(cases) - n_train
        split = {"seed": self.seed, "train": sorted(cases[:n_train]), "test": sorted(cases[n_train:n_train + n_test])}
        clean = {case: _read_label(self.cases[case]["label"]) for case in split["train"]}
        noisy, records, corrupted = noise.corrupt_cases(clean, self.setting, seed=self.seed)
        corruption = os.path.join(self.workspace.out, "corruption")
        os.makedirs(corruption, exist_ok=True)
        for case in corrupted:
            mask = noisy[case] != clean[case]
            label_store.atomic_write(os.path.join(corruption, f"{case}.npz"),
                                     lambda temp, m=mask: np.savez_compressed(temp, corrupted_voxels=m),
                                     suffix=".npz")
        label_store.write_json(os.path.join(corruption, "records.json"),
                               {"setting": dataclasses.asdict(self.setting), "seed": self.seed,
                                "corrupted_cases": corrupted, "records": records})
        for arm in ARM_IDS:
            self._write_dataset(arm, split["train"], noisy if arm != "clean" else clean)
        test = os.path.join(self.workspace.out, "test")
        for sub in ("images", "labels"):
            os.makedirs(os.path.join(test, sub), exist_ok=True)
        for case in split["test"]:
            for index, image in enumerate(self.cases[case]["images"]):
                target = os.path.join(test, "images", f"{case}_{index:04d}{self.ending}")
                if not os.path.lexists(target):
                    os.symlink(image, target)
            label_store.copy_file(self.cases[case]["label"], os.path.join(test, "labels", case + self.ending))
        label_store.write_json(path, split)  # last: marks the preparation complete
        return split

    def _write_dataset(self, arm: str, cases: list[str], labels: dict[str, np.ndarray]) -> None:
        folder = self.workspace.raw(arm)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.join(folder, "imagesTr"))
        os.makedirs(os.path.join(folder, "labelsTr"))
        for case in cases:
            for index, image in enumerate(self.cases[case]["images"]):
                os.symlink(image, os.path.join(folder, "imagesTr", f"{case}_{index:04d}{self.ending}"))
            _write_label_like(labels[case], self.cases[case]["label"],
                              os.path.join(folder, "labelsTr", case + self.ending))
        dataset_json = {key: value for key, value in self.dataset_json.items() if key != "dataset"}
        dataset_json["numTraining"] = len(cases)
        label_store.write_json(os.path.join(folder, "dataset.json"), dataset_json)

    # 3: the arms
    def _plan(self, arm: str) -> None:
        data_folder = os.path.join(self.workspace.preprocessed(arm), f"nnUNetPlans_{self.profile.configuration}")
        if os.path.isdir(data_folder):
            return
        env = self.workspace.env()
        log = os.path.join(self.workspace.out, "logs", f"{arm}_plan.log")
        if arm == "em":
            command = [_console("nnunetv2_em"), "plan", "-d", str(ARM_IDS[arm]), "-c", self.profile.configuration]
            _run_measured(command, env, log)
            self._apply_profile_settings(arm)
        else:  # vanilla: nnU-Net's own planner and preprocessing
            _run_measured([_console("nnUNetv2_plan_and_preprocess"), "-d", str(ARM_IDS[arm]), "-c",
                           self.profile.configuration, "-np", "2", "-npfp", "2"], env, log)

    def _apply_profile_settings(self, arm: str) -> None:
        plans_file = os.path.join(self.workspace.preprocessed(arm), "nnUNetPlans.json")
        with open(plans_file) as handle:
            plans = json.load(handle)
        plans["em"]["mirroring"] = self.profile.mirroring
        if self.profile.min_model_dice is not None:
            plans["em"]["min_model_dice"] = self.profile.min_model_dice
        label_store.write_json(plans_file, plans)

    def _train_final(self, arm: str) -> dict:
        fold = os.path.join(self.workspace.nnunet, "results", self.workspace.dataset(arm),
                            f"{self.profile.trainer}__nnUNetPlans__{self.profile.configuration}", "fold_all")
        if os.path.isfile(os.path.join(fold, "em_mstep_done.json")):
            return {}
        command = [sys.executable, "-m", "nnunetv2_em.mstep", self.workspace.dataset(arm), self.profile.configuration,
                   "all", "--trainer", self.profile.trainer, "--device", self.profile.device, "--no-validation",
                   *self._seed_arguments()]
        return _run_measured(command, self.workspace.env(), os.path.join(self.workspace.out, "logs",
                                                                         f"{arm}_train.log"))

    def _predict_test(self, arm: str) -> dict:
        out = os.path.join(self.workspace.out, "predictions", arm)
        if os.path.isfile(os.path.join(out, "summary.json")):
            return {}
        command = [_console("nnUNetv2_predict"), "-i", os.path.join(self.workspace.out, "test", "images"), "-o", out,
                   "-d", str(ARM_IDS[arm]), "-c", self.profile.configuration, "-tr", self.profile.trainer, "-f",
                   "all", "-device", self.profile.device, "-npp", "1", "-nps", "1"]
        if not self.profile.mirroring:
            command.append("--disable_tta")
        measured = _run_measured(command, self.workspace.env(), os.path.join(self.workspace.out, "logs",
                                                                             f"{arm}_predict.log"))
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        compute_metrics_on_folder(os.path.join(self.workspace.out, "test", "labels"), out,
                                  os.path.join(out, "summary.json"), SimpleITKIO(), self.ending, self.classes, None,
                                  num_processes=1)
        return measured

    def _run_em(self) -> dict:
        marker = os.path.join(self.workspace.out, "logs", "em_run.done")
        if os.path.isfile(marker):
            return {}
        command = [_console("nnunetv2_em"), "run", "-d", str(ARM_IDS["em"]), "-c", self.profile.configuration,
                   "--folds", *[str(f) for f in range(self.profile.folds)], "--rounds", str(self.profile.rounds),
                   "--trainer", self.profile.trainer, "--device", self.profile.device, "--no-validation",
                   "--keep-logits", *self._seed_arguments()]
        measured = _run_measured(command, self.workspace.env(), os.path.join(self.workspace.out, "logs",
                                                                             "em_run.log"))
        label_store.write_json(marker, measured)
        return measured

    def _seed_arguments(self) -> list[str]:
        """The same training seed for every arm, so that arms (a) and (b) differ only by their labels."""
        return [] if self.training_seed is None else ["--seed", str(self.training_seed)]

    def run_arms(self) -> dict:
        timings_file = os.path.join(self.workspace.out, "arms.json")
        timings = {}
        if os.path.isfile(timings_file):
            with open(timings_file) as handle:
                timings = json.load(handle)
        for arm in ("noisy", "clean", "em"):
            if arm in timings:
                continue
            steps = []
            started = time.time()
            plan_started = time.time()
            self._plan(arm)
            steps.append({"seconds": time.time() - plan_started, "peak_rss_mib": 0.0})
            if arm == "em":
                steps.append(self._run_em())
            steps.append(self._train_final(arm))
            steps.append(self._predict_test(arm))
            timings[arm] = {"wall_minutes": (time.time() - started) / 60,
                            "peak_rss_mib": max((s.get("peak_rss_mib", 0.0) for s in steps), default=0.0)}
            label_store.write_json(timings_file, timings)
        return timings

    # 4: evaluation
    def test_dice(self) -> dict:
        results = {}
        for arm in ARM_IDS:
            with open(os.path.join(self.workspace.out, "predictions", arm, "summary.json")) as handle:
                summary = json.load(handle)
            per_class = {}
            for c in self.classes:
                values = [case["metrics"][str(c)]["Dice"] for case in summary["metric_per_case"]]
                per_class[str(c)] = bootstrap_ci(values, seed=self.seed)
            foreground = [np.nanmean([case["metrics"][str(c)]["Dice"] for c in self.classes])
                          for case in summary["metric_per_case"]]
            results[arm] = {"per_class": per_class, "foreground": bootstrap_ci(foreground, seed=self.seed),
                            "cases": len(foreground)}
        return results

    def label_quality(self, split: dict) -> list[dict]:
        """Mean label Dice of the training labels vs the clean ones: noisy (round 0), then after each EM round."""
        versions = self.workspace.em_versions(self.profile, self.ending)
        clean = {case: _read_label(self.cases[case]["label"]) for case in split["train"]}
        ignore = int(checks.with_ignore_label(self.dataset_json)["labels"]["ignore"])
        rounds = []
        noisy = {case: _read_label(versions.label_path(0, case)) for case in split["train"]}
        for round_index in [0, *versions.runs().get(versions.run, [])]:
            per_case = [label_dice(clean[case], _read_label(versions.label_path(round_index, case)),
                                   classes=self.classes, ignore_label=ignore, annotation=noisy[case])
                        for case in split["train"]]
            rounds.append({"round": round_index,
                           "mean_foreground_dice": self._mean_foreground(per_case, "dice"),
                           "mean_foreground_dice_ignored_kept": self._mean_foreground(per_case, "dice_kept"),
                           "mean_fraction_ignored": float(np.mean([p["fraction_ignored"] for p in per_case]))})
        return rounds

    def _mean_foreground(self, per_case: list[dict], key: str) -> float:
        return float(np.nanmean([np.nanmean([p[f"{key}_{c}"] for c in self.classes]) for p in per_case]))

    def em_rounds(self) -> list[dict]:
        """What each EM round's E-step did: out-of-fold model Dice against its quality gate, changes, ignores."""
        with open(os.path.join(self.workspace.preprocessed("em"), "nnUNetPlans.json")) as handle:
            min_model_dice = json.load(handle)["em"]["min_model_dice"]
        with open(self.workspace.em_run(self.profile).file("summary.json")) as handle:  # the run's completed rounds
            rounds = json.load(handle)["rounds"]
        return [{"round": summary["round"], "model_dice": summary["model_dice"], "min_model_dice": min_model_dice,
                 "refinement_applied": summary["refinement_applied"], "fraction_changed": summary["fraction_changed"],
                 "fraction_ignored": summary["fraction_ignored"]}
                for _, summary in sorted(rounds.items(), key=lambda item: int(item[0]))]

    def detection(self, split: dict) -> dict:
        """Corrupted cases vs the ranked list, and corrupted voxels vs EM's changes and cleanlab's label issues,
        in nnU-Net's preprocessed space on the last round's out-of-fold probabilities."""
        from cleanlab.segmentation.filter import find_label_issues

        with open(os.path.join(self.workspace.out, "corruption", "records.json")) as handle:
            corrupted = set(json.load(handle)["corrupted_cases"])
        layout = self.workspace.em_run(self.profile)
        versions = self.workspace.em_versions(self.profile, self.ending)
        last = max(layout.rounds_started())
        with open(layout.round_file(last, "cases.json")) as handle:
            ranked = json.load(handle)
        with open(layout.round_file(last, "fit.json")) as handle:
            temperature = json.load(handle)["noise_model"]["temperature"]
        clean_folder = os.path.join(self.workspace.preprocessed("clean"), versions.data_identifier)
        truths, em_flags, cleanlab_flags = [], [], []
        for case in split["train"]:
            noisy = versions.read_segmentation(0, case)[0]
            refined = versions.read_segmentation(last, case)[0]
            clean = label_store.read_seg_b2nd(os.path.join(clean_folder, f"{case}_seg.b2nd"))[0]
            inside = noisy >= 0
            truths.append((noisy != clean)[inside])
            em_flags.append((refined != noisy)[inside])
            probabilities = estep.softmax(np.load(layout.logits_file(last, case)), temperature).astype(np.float32)
            labels = np.maximum(noisy, 0)
            issues = find_label_issues(labels, np.moveaxis(probabilities, 0, 1), n_jobs=1, verbose=False)
            cleanlab_flags.append(issues[inside])
        truth = np.concatenate(truths)
        return {"cases": {"corrupted": len(corrupted), **ranking_scores(ranked, corrupted)},
                "voxels": {"em": detection_scores(truth, np.concatenate(em_flags)),
                           "cleanlab": detection_scores(truth, np.concatenate(cleanlab_flags))}}

    def run(self, command: str | None = None) -> dict:
        started = time.time()
        split = self.prepare()
        timings = self.run_arms()
        test = self.test_dice()
        results = {
            "dataset": self.source, "noise": dataclasses.asdict(self.setting), "seed": self.seed,
            "training_seed": self.training_seed,
            "profile": self.profile_name, "profile_settings": dataclasses.asdict(self.profile),
            "train_cases": len(split["train"]), "test_cases": len(split["test"]),
            "test_dice": test,
            "recovery_share": recovery_share(test["noisy"]["foreground"][0], test["em"]["foreground"][0],
                                             test["clean"]["foreground"][0]),
            "label_quality": self.label_quality(split), "em_rounds": self.em_rounds(),
            "detection": self.detection(split), "arms": timings,
            "command": command,
            "report_minutes": (time.time() - started) / 60,
        }
        from nnunetv2_em.benchmark import report as benchmark_report

        benchmark_report.write(self.workspace.out, results, self)
        return results


def run_benchmark(dataset: str, noise_name: str, *, seed: int = 0, profile: str = "cpu", out: str,
                  command: str | None = None, training_seed: int | None = None) -> dict:
    return Benchmark(dataset, noise_name, seed=seed, profile=profile, out=out, training_seed=training_seed).run(command)

