"""One benchmark replicate: EM vs vanilla nnU-Net and a cleanlab peer, on trusted labels with seeded annotation noise.

From a clean raw nnU-Net dataset a replicate (1) splits cases into train and held-out test (seeded, written down),
(2) corrupts only the training labels with a named noise setting (records which cases and voxels), (3) trains with
the same budget and the same training seed (a) vanilla nnU-Net on the noisy labels, (b) the cross-fold EM loop on
the noisy labels followed by the same training on its refined labels, (p) the peer: the voxels cleanlab flags on the
EM run's first out-of-fold probabilities set to the ignore label, then the same training, and (4) scores the
training labels against the clean ones (Dice both ways, HD95, surface Dice; corrupted and untouched cases apart),
the ranked case list and the voxel flags against the corruption, and test Dice per case. The clean reference arm is
the replicate of the ``clean`` setting with the same seeds (``suite.py``). With ``label_quality_only`` only the EM
run and cleanlab's filtering happen (no final trainings).

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

from nnunetv2_em import checks, label_conventions, storage
from nnunetv2_em.benchmark import metrics, noise
from nnunetv2_em.benchmark.label_files import read_label, write_label_like
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
    em_overrides: tuple[tuple[str, object], ...] = ()  # settings of the EM arm's plans (em block) to override
    description: str = ""


# The benchmark measures what EM's corrections do, so its EM arm may change classes without verified cases (the
# product's default only ignores there); with --verified N the precision gate decides, as in the product.
CORRECTIONS = (("changes_without_verified_cases", True),)
PROFILES = {
    "cpu": Profile("2d", "VanillaTrainer_cpu", 40, 20, folds=2, rounds=1, device="cpu", mirroring=False,
                   em_overrides=CORRECTIONS,
                   description="2-core CPU, under an hour: 2d, VanillaTrainer_cpu (20 x 40 iterations), 40 train / "
                               "20 test cases, EM with 2 folds x 1 round"),
    "cpu-long": Profile("2d", "VanillaTrainer_cpu_40epochs", 40, 20, folds=2, rounds=1, device="cpu",
                        mirroring=False, em_overrides=CORRECTIONS,
                        description="the cpu profile with twice the training (40 x 40 iterations), about an hour on "
                                    "a fast 2-core machine"),
    "gpu": Profile("3d_fullres", "nnUNetTrainer", None, None, folds=5, rounds=3, device="cuda", mirroring=True,
                   em_overrides=CORRECTIONS,
                   description="one GPU, nnU-Net's full budget: 3d_fullres, nnUNetTrainer (1000 epochs), 80/20 split, "
                               "EM with 5 folds x 3 rounds"),
    "smoke": Profile("2d", "VanillaTrainer_tiny", 8, 3, folds=2, rounds=1, device="cpu", mirroring=False,
                     em_overrides=(*CORRECTIONS, ("min_model_dice", 0.0), ("max_ignored_share", 1.0),
                                   ("calibrate_temperature", False)),
                     description="checks the harness in minutes (the E-step always refines); the numbers mean "
                                 "nothing"),
}
ARM_IDS = {"noisy": 961, "em": 962, "cleanlab": 964}
ARMS = ("noisy", "em", "cleanlab")


@dataclass
class Workspace:
    out: str
    ids: dict = dataclasses.field(default_factory=lambda: dict(ARM_IDS))  # arm: nnU-Net dataset id

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
        return f"Dataset{self.ids[arm]}_Bench{arm.replace('_', ' ').title().replace(' ', '')}"

    def raw(self, arm: str) -> str:
        return os.path.join(self.nnunet, "raw", self.dataset(arm))

    def preprocessed(self, arm: str) -> str:
        return os.path.join(self.nnunet, "preprocessed", self.dataset(arm))

    def em_run(self, profile: Profile) -> RunLayout:
        """The EM arm's ``nnunetv2_em run``."""
        return RunLayout(os.path.join(self.nnunet, "results"), self.dataset("em"), profile.trainer, "nnUNetPlans",
                         profile.configuration)

    def em_versions(self, profile: Profile, file_ending: str) -> storage.DatasetLabelVersions:
        """The EM arm's label versions (round 0: the noisy labels; rounds >= 1: the run's refinements)."""
        return storage.DatasetLabelVersions(self.raw("em"), self.preprocessed("em"),
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


def update_plans(workspace: Workspace, arm: str, edit) -> None:
    """Read the arm's ``nnUNetPlans.json``, let ``edit(plans)`` change it in place, write it back atomically."""
    plans_file = os.path.join(workspace.preprocessed(arm), "nnUNetPlans.json")
    with open(plans_file) as handle:
        plans = json.load(handle)
    edit(plans)
    storage.write_json(plans_file, plans)


def write_test_folder(out: str, cases: dict, test_cases: list[str], ending: str) -> None:
    """``out/test/images`` (links to the test cases' images) and ``out/test/labels`` (copies of their clean labels),
    what ``predict_test`` predicts and scores."""
    test = os.path.join(out, "test")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(test, sub), exist_ok=True)
    for case in test_cases:
        for index, image in enumerate(cases[case]["images"]):
            target = os.path.join(test, "images", f"{case}_{index:04d}{ending}")
            if not os.path.lexists(target):
                os.symlink(image, target)
        storage.copy_file(cases[case]["label"], os.path.join(test, "labels", case + ending))


def read_clean_dataset(benchmark, dataset_path: str) -> None:
    """Check the trusted raw dataset a benchmark starts from and set on ``benchmark``: ``source`` (its path),
    ``cases`` (nnU-Net's {case: {"images", "label"}}), ``dataset_json``, ``classes`` (foreground values),
    ``ignore_label`` (the value the arms' ignore label gets) and ``ending``."""
    benchmark.source = os.path.abspath(dataset_path)
    benchmark.cases = checks.check_raw_dataset(benchmark.source)
    benchmark.dataset_json = checks.load_dataset_json(os.path.join(benchmark.source, "dataset.json"))
    benchmark.classes = checks.label_values(benchmark.dataset_json,
                                            os.path.join(benchmark.source, "dataset.json"))[1:]
    benchmark.ignore_label = int(label_conventions.with_ignore_label(benchmark.dataset_json)["labels"]["ignore"])
    benchmark.ending = benchmark.dataset_json["file_ending"]


# ------------------------------------------------------------------------------------------------- the steps
class Benchmark:
    """One replicate: one noise setting, one training seed, in its own folder; every step skipped once done."""

    def __init__(self, dataset_path: str, noise_name: str, *, seed: int, profile: str, out: str,
                 training_seed: int | None = None, label_quality_only: bool = False, verified_cases: int = 0):
        if noise_name not in noise.SETTINGS:
            raise EMInputError(f"--noise {noise_name}: unknown. Fix: pick one of {sorted(noise.SETTINGS)}.")
        if profile not in PROFILES:
            raise EMInputError(f"--profile {profile}: unknown. Fix: pick one of {sorted(PROFILES)}.")
        read_clean_dataset(self, dataset_path)
        self.setting = noise.SETTINGS[noise_name]
        self.seed = seed
        self.training_seed = training_seed  # every training of every arm (nnunetv2_em.seeding); None: unseeded
        self.label_quality_only = label_quality_only
        self.verified_cases = verified_cases  # untouched training cases the EM arm is told were checked
        self.profile = PROFILES[profile]
        self.profile_name = profile
        self.workspace = Workspace(os.path.abspath(out))
        needed = (self.profile.train_cases or 0) + (self.profile.test_cases or 0)
        if needed > len(self.cases):
            raise EMInputError(f"{self.source}: {len(self.cases)} cases, profile {profile} needs {needed}. Fix: use "
                               f"a larger dataset or another profile.")

    @property
    def arms(self) -> tuple[str, ...]:
        return ("em",) if self.label_quality_only else ARMS

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
        clean = {case: read_label(self.cases[case]["label"]) for case in split["train"]}
        noisy, records, corrupted = noise.corrupt_cases(clean, self.setting, seed=self.seed)
        corruption = os.path.join(self.workspace.out, "corruption")
        os.makedirs(corruption, exist_ok=True)
        for case in corrupted:
            mask = noisy[case] != clean[case]
            storage.atomic_write(os.path.join(corruption, f"{case}.npz"),
                                 lambda temp, m=mask: np.savez_compressed(temp, corrupted_voxels=m),
                                 suffix=".npz")
        storage.write_json(os.path.join(corruption, "records.json"),
                           {"setting": dataclasses.asdict(self.setting), "seed": self.seed,
                            "corrupted_cases": corrupted, "records": records})
        for arm in ("noisy", "em"):
            self._write_dataset(arm, split["train"], noisy)
        if self.verified_cases:  # a reviewer checked a few cases: the EM arm's precision gate learns from them
            untouched = sorted(case for case in split["train"] if case not in corrupted)
            if self.verified_cases > len(untouched):
                raise EMInputError(f"--verified {self.verified_cases}: only {len(untouched)} training cases are "
                                   f"untouched by the noise. Fix: ask for fewer.")
            chosen = np.random.default_rng(self.seed).choice(untouched, size=self.verified_cases, replace=False)
            storage.write_json(os.path.join(self.workspace.raw("em"), checks.VERIFIED_CASES_FILE),
                               sorted(str(case) for case in chosen))
        write_test_folder(self.workspace.out, self.cases, split["test"], self.ending)
        storage.write_json(path, split)  # last: marks the preparation complete
        return split

    def _write_dataset(self, arm: str, cases: list[str], labels: dict[str, np.ndarray] | None = None,
                       label_files: dict[str, str] | None = None) -> None:
        folder = self.workspace.raw(arm)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.join(folder, "imagesTr"))
        os.makedirs(os.path.join(folder, "labelsTr"))
        for case in cases:
            for index, image in enumerate(self.cases[case]["images"]):
                os.symlink(image, os.path.join(folder, "imagesTr", f"{case}_{index:04d}{self.ending}"))
            target = os.path.join(folder, "labelsTr", case + self.ending)
            if label_files is not None:
                storage.copy_file(label_files[case], target)
            else:
                write_label_like(labels[case], self.cases[case]["label"], target)
        dataset_json = {key: value for key, value in self.dataset_json.items() if key != "dataset"}
        if arm == "cleanlab":  # the flagged voxels are nnU-Net's ignore label
            dataset_json = label_conventions.with_ignore_label(dataset_json)
        dataset_json["numTraining"] = len(cases)
        storage.write_json(os.path.join(folder, "dataset.json"), dataset_json)

    # 3: the arms
    def _plan(self, arm: str) -> None:
        data_folder = os.path.join(self.workspace.preprocessed(arm), f"nnUNetPlans_{self.profile.configuration}")
        if os.path.isdir(data_folder):
            return
        env = self.workspace.env()
        log = os.path.join(self.workspace.out, "logs", f"{arm}_plan.log")
        if arm == "em":
            command = [_console("nnunetv2_em"), "plan", "-d", str(self.workspace.ids[arm]), "-c",
                       self.profile.configuration]
            _run_measured(command, env, log)
            self._apply_profile_settings(arm)
        else:  # vanilla and cleanlab: nnU-Net's own planner and preprocessing
            _run_measured([_console("nnUNetv2_plan_and_preprocess"), "-d", str(self.workspace.ids[arm]), "-c",
                           self.profile.configuration, "-np", "2", "-npfp", "2"], env, log)

    def _apply_profile_settings(self, arm: str) -> None:
        def settings(plans: dict) -> None:
            plans["em"]["mirroring"] = self.profile.mirroring
            plans["em"].update(dict(self.profile.em_overrides))

        update_plans(self.workspace, arm, settings)

    def _train_final(self, arm: str) -> dict:
        return train_final(self.workspace, arm, self.profile, log_name=arm, seed_arguments=self._seed_arguments())

    def _predict_test(self, arm: str) -> dict:
        return predict_test(self.workspace, arm, self.profile, classes=self.classes, ending=self.ending)

    def _run_em(self) -> dict:
        marker = os.path.join(self.workspace.out, "logs", "em_run.done")
        if os.path.isfile(marker):
            return {}
        command = [_console("nnunetv2_em"), "run", "-d", str(self.workspace.ids["em"]), "-c",
                   self.profile.configuration, "--folds", *[str(f) for f in range(self.profile.folds)],
                   "--rounds", str(self.profile.rounds),
                   "--trainer", self.profile.trainer, "--device", self.profile.device, "--no-validation",
                   "--keep-logits", *self._seed_arguments()]
        measured = _run_measured(command, self.workspace.env(), os.path.join(self.workspace.out, "logs",
                                                                             "em_run.log"))
        storage.write_json(marker, measured)
        return measured

    def _seed_arguments(self) -> list[str]:
        """The same training seed for every arm, so that the arms differ only by their labels."""
        return [] if self.training_seed is None else ["--seed", str(self.training_seed)]

    def _cleanlab_folder(self) -> str:
        return os.path.join(self.workspace.out, "cleanlab")

    def filter_with_cleanlab(self, split: dict) -> dict[str, str]:
        """The peer arm's labels (``cleanlab_peer.filtered_labels`` on the EM run's round-1 probabilities):
        ``{case: raw label file}``."""
        from nnunetv2_em.benchmark import cleanlab_peer

        return cleanlab_peer.filtered_labels(
            split["train"], folder=self._cleanlab_folder(), layout=self.workspace.em_run(self.profile),
            versions=self.workspace.em_versions(self.profile, self.ending),
            plans_file=os.path.join(self.workspace.preprocessed("em"), "nnUNetPlans.json"),
            configuration=self.profile.configuration, label_files={c: self.cases[c]["label"] for c in split["train"]},
            ending=self.ending, ignore_label=self.ignore_label)

    def run_arms(self, split: dict) -> dict:
        timings_file = os.path.join(self.workspace.out, "arms.json")
        timings = {}
        if os.path.isfile(timings_file):
            with open(timings_file) as handle:
                timings = json.load(handle)
        for arm in ("noisy", "em", "cleanlab"):  # cleanlab's labels need the EM run's probabilities
            if arm in timings and (self.label_quality_only or timings[arm].get("final_training", False)):
                continue  # a label-quality-only arm rerun in full still gets its final training (steps skip if done)
            steps = []
            started = time.time()
            if arm == "cleanlab":
                if "em" not in timings:
                    continue
                files = self.filter_with_cleanlab(split)
                if arm in self.arms and not os.path.isfile(os.path.join(self.workspace.raw(arm), "dataset.json")):
                    self._write_dataset(arm, split["train"], label_files=files)
            if arm not in self.arms:
                continue
            plan_started = time.time()
            self._plan(arm)
            steps.append({"seconds": time.time() - plan_started, "peak_rss_mib": 0.0})
            if arm == "em":
                steps.append(self._run_em())
            if not self.label_quality_only:
                steps.append(self._train_final(arm))
                steps.append(self._predict_test(arm))
            earlier = timings.get(arm, {})
            timings[arm] = {"wall_minutes": earlier.get("wall_minutes", 0.0) + (time.time() - started) / 60,
                            "peak_rss_mib": max([s.get("peak_rss_mib", 0.0) for s in steps]
                                                + [earlier.get("peak_rss_mib", 0.0)]),
                            "final_training": not self.label_quality_only}
            storage.write_json(timings_file, timings)
        if "em" in timings:
            self.filter_with_cleanlab(split)
        return timings

    # 4: evaluation
    def test_dice(self) -> dict:
        """Per arm: foreground-mean Dice per test case (for pairing), per-class means and bootstrap intervals."""
        return {arm: test_dice(self.workspace, arm, classes=self.classes, ending=self.ending, seed=self.seed)
                for arm in self.arms}

    def label_quality(self, split: dict) -> dict:
        """Training labels vs the clean ones, in the raw geometry: the noisy input, EM after each round, cleanlab's
        filtered labels. Per version and group of cases (all / corrupted / untouched): mean over cases of the
        foreground-mean Dice both ways, HD95, surface Dice (ignored voxels kept at the annotation) and the ignored
        share; per case in ``per_case``."""
        with open(os.path.join(self.workspace.out, "corruption", "records.json")) as handle:
            corrupted = set(json.load(handle)["corrupted_cases"])
        versions = self.workspace.em_versions(self.profile, self.ending)
        clean = {case: read_label(self.cases[case]["label"]) for case in split["train"]}
        noisy = {case: read_label(versions.label_path(0, case)) for case in split["train"]}
        candidates = {"noisy": noisy}
        for round_index in versions.runs().get(versions.run, []):
            candidates[f"em_round_{round_index}"] = {case: read_label(versions.label_path(round_index, case))
                                                     for case in split["train"]}
        cleanlab_files = self.filter_with_cleanlab(split)
        candidates["cleanlab"] = {case: read_label(path) for case, path in cleanlab_files.items()}
        result = {"corrupted_cases": sorted(corrupted), "versions": {}, "per_case": {}}
        for name, labels in candidates.items():
            per_case = {case: metrics.label_scores(clean[case], labels[case], classes=self.classes,
                                                   ignore_label=self.ignore_label, annotation=noisy[case],
                                                   surfaces=True)
                        for case in split["train"]}
            result["versions"][name] = metrics.summarize_groups(per_case, corrupted, classes=self.classes)
            result["per_case"][name] = per_case
        return result

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
        """Corrupted cases vs the ranked list; corrupted voxels vs EM's changes or ignores (last round) and
        cleanlab's flags, in the raw geometry of the labels."""
        with open(os.path.join(self.workspace.out, "corruption", "records.json")) as handle:
            corrupted = set(json.load(handle)["corrupted_cases"])
        layout = self.workspace.em_run(self.profile)
        versions = self.workspace.em_versions(self.profile, self.ending)
        last = max(layout.rounds_started())
        with open(layout.round_file(last, "cases.json")) as handle:
            ranked = json.load(handle)
        cleanlab_files = self.filter_with_cleanlab(split)
        truths, em_flags, cleanlab_flags = [], [], []
        for case in split["train"]:
            noisy = read_label(versions.label_path(0, case))
            mask_file = os.path.join(self.workspace.out, "corruption", f"{case}.npz")
            truths.append(np.load(mask_file)["corrupted_voxels"].ravel() if case in corrupted
                          else np.zeros(noisy.size, bool))
            em_flags.append((read_label(versions.label_path(last, case)) != noisy).ravel())
            cleanlab_flags.append((read_label(cleanlab_files[case]) == self.ignore_label).ravel())
        truth = np.concatenate(truths)
        return {"cases": {"corrupted": len(corrupted), **metrics.ranking_scores(ranked, corrupted)},
                "voxels": {"em": metrics.detection_scores(truth, np.concatenate(em_flags)),
                           "cleanlab": metrics.detection_scores(truth, np.concatenate(cleanlab_flags))}}

    def run(self) -> dict:
        """Every step of the replicate (each skipped once done), then its results (``results.json``)."""
        started = time.time()
        split = self.prepare()
        timings = self.run_arms(split)
        results = {
            "dataset": self.source, "noise": dataclasses.asdict(self.setting), "seed": self.seed,
            "training_seed": self.training_seed, "label_quality_only": self.label_quality_only,
            "verified_cases": self.verified_cases,
            "profile": self.profile_name, "profile_settings": dataclasses.asdict(self.profile),
            "train_cases": len(split["train"]), "test_cases": len(split["test"]), "test_case_ids": split["test"],
            "label_quality": self.label_quality(split), "em_rounds": self.em_rounds(),
            "detection": self.detection(split), "arms": timings,
        }
        if not self.label_quality_only:
            results["test_dice"] = self.test_dice()
        results["evaluation_minutes"] = (time.time() - started) / 60
        storage.write_json(os.path.join(self.workspace.out, "results.json"), results)
        return results


# ------------------------------------------------------------- final training and test scores (every benchmark)
def train_final(workspace: Workspace, arm: str, profile: Profile, *, trainer: str | None = None, log_name: str,
                seed_arguments: list[str], fold: str = "all") -> dict:
    """The arm's final model: ``trainer`` (default the profile's) on every training case of the arm's dataset
    (``fold all``; or the cases of split ``fold`` of its splits_final.json), no validation; skipped once done."""
    trainer = trainer or profile.trainer
    folder = os.path.join(workspace.nnunet, "results", workspace.dataset(arm),
                          f"{trainer}__nnUNetPlans__{profile.configuration}", f"fold_{fold}")
    if os.path.isfile(os.path.join(folder, "em_mstep_done.json")):
        return {}
    command = [sys.executable, "-m", "nnunetv2_em.mstep", workspace.dataset(arm), profile.configuration, str(fold),
               "--trainer", trainer, "--device", profile.device, "--no-validation", *seed_arguments]
    return _run_measured(command, workspace.env(), os.path.join(workspace.out, "logs", f"{log_name}_train.log"))


def predict_test(workspace: Workspace, arm: str, profile: Profile, *, classes, ending: str,
                 trainer: str | None = None, name: str | None = None, fold: str = "all") -> dict:
    """The final model's predictions of the held-out test images (``workspace.out/test``) in
    ``predictions/<name>`` and nnU-Net's metrics of them (``summary.json``); skipped once done."""
    trainer = trainer or profile.trainer
    name = name or arm
    out = os.path.join(workspace.out, "predictions", name)
    if os.path.isfile(os.path.join(out, "summary.json")):
        return {}
    command = [_console("nnUNetv2_predict"), "-i", os.path.join(workspace.out, "test", "images"), "-o", out,
               "-d", str(workspace.ids[arm]), "-c", profile.configuration, "-tr", trainer, "-f", str(fold),
               "-device", profile.device, "-npp", "1", "-nps", "1"]
    if not profile.mirroring:
        command.append("--disable_tta")
    measured = _run_measured(command, workspace.env(), os.path.join(workspace.out, "logs", f"{name}_predict.log"))
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    compute_metrics_on_folder(os.path.join(workspace.out, "test", "labels"), out, os.path.join(out, "summary.json"),
                              SimpleITKIO(), ending, classes, None, num_processes=1)
    return measured


def test_dice(workspace: Workspace, name: str, *, classes, ending: str, seed: int) -> dict:
    """Test Dice of ``predictions/<name>``: foreground-mean Dice per test case (for pairing), per class per case,
    per-class means and the foreground mean with bootstrap intervals over cases."""
    with open(os.path.join(workspace.out, "predictions", name, "summary.json")) as handle:
        summary = json.load(handle)
    cases = {os.path.basename(case["reference_file"]).removesuffix(ending): case["metrics"]
             for case in summary["metric_per_case"]}
    per_case = {case: float(np.nanmean([scores[str(c)]["Dice"] for c in classes])) for case, scores in cases.items()}
    per_class_case = {str(c): {case: float(scores[str(c)]["Dice"]) for case, scores in sorted(cases.items())}
                      for c in classes}
    per_class = {str(c): metrics.bootstrap_ci(list(per_class_case[str(c)].values()), seed=seed) for c in classes}
    return {"per_case": dict(sorted(per_case.items())), "per_class_case": per_class_case, "per_class": per_class,
            "foreground": metrics.bootstrap_ci(list(per_case.values()), seed=seed), "cases": len(per_case)}
