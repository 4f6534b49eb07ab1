"""Benchmark of partial and weak labels on real data: what constraints and soft targets buy over what users do today.

Regimes, built from a clean raw dataset's training cases (the split and the regime's assignment fixed by
``data_seed``; the training seed is the replicate):

* ``partial`` (partial labels by class): half of the training cases annotate only the first foreground class,
  half only the second (the other class is background in their masks, as when two datasets are merged).
* ``weak``: a quarter of the training cases keep their full mask; the rest are **weak-only** (image, no mask) with
  the tags a report would give, derived from the clean mask: present / absent classes, volume within +-20 %
  (``volume_margin``) and the bounding box of each present class.
* ``full``: every training case with its clean mask (the control, trained once per seed and shared by the regimes).
* ``tags`` (issue 15): a fifth of the training cases keep their full mask; the rest carry only presence tags
  (present / absent and each present class's bounding box, so a slice through the box is tagged "contains it").

Arms (same trainer, budget and training seed; test Dice on the same held-out cases):

* ``clean``: vanilla nnU-Net on the clean full masks (the ``full`` regime).
* ``naive``: vanilla on what users train on today: ``partial`` the partial masks as they are (unannotated classes
  as background); ``weak`` the fully annotated subset only (weak-only cases have no mask to train on).
* ``marginal`` (``partial``): the naive arm's partial masks with ``MarginalTrainer`` (background of a partial case
  trained as "background or the unannotated class", Shi et al. 2021): the peer that needs no E-step.
* ``multitask`` / ``multitask_bridge`` (``tags``): ``MultiTaskTrainer`` (``MultiTaskBridgeTrainer``) on the masks and
  the tag-only cases (label files all ignore, tags from the weak-label file), with the tag AUROC per slice of the
  test cases.
* ``em_multitask`` (``tags``): ``MultiTaskTrainer`` on the ``em_map`` run's labels (pseudo-labels of the tag-only
  cases) and the same tags: whether EM's pseudo-labels and the tag head add up.
* ``em_map``: ``nnunetv2_em run`` with the weak-label file (``weak_mode: map``), then the same final training on
  its labels; ``em_soft``: the same run's soft targets (``soft_targets``) with ``SoftTargetTrainer``;
  ``em_sample``: ``weak_mode: sample``. The sample run reuses the map run's fold models and out-of-fold logits
  (seeded trainings on identical labels are bit-identical, ``scripts/results/seeded_training.md``), so it differs
  from the map run only in its E-step.

Label quality: the labels each arm trains on against the clean masks, for the partial / weak-only cases and the
fully annotated ones apart, Dice with ignored voxels scored as the annotation (``dice_kept``; a weak-only case's
annotation is background) next to Dice with them left out (``dice``), and the ignored share.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from nnunetv2_em import label_conventions, storage, weak_labels
from nnunetv2_em.benchmark import metrics, suite
from nnunetv2_em.benchmark.harness import (
    PROFILES,
    Workspace,
    _console,
    _run_measured,
    predict_test,
    read_clean_dataset,
    test_dice,
    train_final,
    update_plans,
    write_test_folder,
)
from nnunetv2_em.benchmark.label_files import read_label, write_label_like
from nnunetv2_em.errors import EMInputError

REGIMES = ("full", "partial", "weak", "tags")
ARMS = {"full": ("clean",), "partial": ("naive", "em_map", "em_soft", "em_sample", "marginal"),
        "weak": ("naive", "em_map", "em_soft", "em_sample"),
        "tags": ("naive", "multitask", "multitask_bridge", "em_map", "em_multitask")}
IDS = {"clean": 971, "naive": 972, "em": 973, "multitask": 974}
FULL_FRACTION = {"weak": 0.25, "tags": 0.2}
MARGINAL_TRAINERS = {"VanillaTrainer_cpu": "MarginalTrainer_cpu", "VanillaTrainer_tiny": "MarginalTrainer_tiny",
                     "nnUNetTrainer": "MarginalTrainer"}
MULTITASK_TRAINERS = {"VanillaTrainer_cpu": {"multitask": "MultiTaskTrainer_cpu",
                                             "multitask_bridge": "MultiTaskBridgeTrainer_cpu"},
                      "VanillaTrainer_tiny": {"multitask": "MultiTaskTrainer_tiny",
                                              "multitask_bridge": "MultiTaskBridgeTrainer_tiny"},
                      "nnUNetTrainer": {"multitask": "MultiTaskTrainer", "multitask_bridge": "MultiTaskBridgeTrainer"}}
# arms with a tag head: (the dataset they train on, their trainer's key in MULTITASK_TRAINERS)
TAG_HEAD_ARMS = {"multitask": ("multitask", "multitask"), "multitask_bridge": ("multitask", "multitask_bridge"),
                 "em_multitask": ("em", "multitask")}
SOFT_TRAINERS = {"VanillaTrainer_cpu": "SoftTargetTrainer_cpu", "VanillaTrainer_tiny": "SoftTargetTrainer_tiny",
                 "nnUNetTrainer": "SoftTargetTrainer"}
SOFT_SAMPLES = 8
# regimes whose arms train on datasets of different sizes (tags: 8 masks vs 40 label files), for which nnU-Net
# plans different batch sizes (11 vs 54 patches): every arm gets the clean dataset's, so they differ by labels only
PINNED_BATCH_REGIMES = ("tags",)


# ------------------------------------------------------------------------------------ the regimes (pure arrays)
def assign_partial_classes(cases: list[str], classes: list[int], *, seed: int) -> dict[str, int]:
    """``{case: the one class its mask annotates}``: the cases shuffled with ``seed`` and dealt to ``classes`` in
    turn, so every class is annotated by ``len(cases) / len(classes)`` cases (the first classes get the rest)."""
    if len(classes) < 2:
        raise ValueError(f"partial labels by class need at least 2 foreground classes, got {classes}")
    order = [str(c) for c in np.random.default_rng(seed).permutation(sorted(cases))]
    return {case: int(classes[index % len(classes)]) for index, case in enumerate(order)}


def partial_mask(label: np.ndarray, annotated: int) -> np.ndarray:
    """``label (*spatial)`` with every foreground class but ``annotated`` set to background."""
    label = np.asarray(label)
    return np.where(label == annotated, label, 0).astype(label.dtype)


def choose_full_cases(cases: list[str], *, fraction: float, seed: int) -> list[str]:
    """The ``fraction`` of ``cases`` (at least 2, for the cross-fold run) that keep their full mask, chosen with
    ``seed``; the others become weak-only."""
    count = max(2, int(round(fraction * len(cases))))
    if count > len(cases):
        raise ValueError(f"{count} full cases requested from {len(cases)}")
    order = [str(c) for c in np.random.default_rng(seed + 1).permutation(sorted(cases))]
    return sorted(order[:count])


def weak_row_from_mask(label: np.ndarray, *, class_names: dict[int, str], volume_margin: float = 0.2) -> dict:
    """The tags a report would give about a case, derived from its clean mask ``label (*spatial)``: ``present`` and
    ``absent`` classes, each present class's ``volume`` within ``+-volume_margin`` (voxels) and its bounding
    ``box`` (voxel indices, stop exclusive), in the format of ``em_weak_labels.json``."""
    label = np.asarray(label)
    if not 0 <= volume_margin < 1:
        raise ValueError(f"volume_margin must be in [0, 1), got {volume_margin}")
    row = {"present": [], "absent": [], "volume": {}, "location": {}}
    for value, name in sorted(class_names.items()):
        mask = label == value
        if not mask.any():
            row["absent"].append(name)
            continue
        row["present"].append(name)
        voxels = int(mask.sum())
        row["volume"][name] = {"min": int(np.floor(voxels * (1 - volume_margin))),
                               "max": int(np.ceil(voxels * (1 + volume_margin))), "unit": "voxels"}
        where = np.nonzero(mask)
        row["location"][name] = {"box": [[int(axis.min()), int(axis.max()) + 1] for axis in where]}
    return {key: value for key, value in row.items() if value}


# ------------------------------------------------------------------------------------------- one replicate
def regime_labels(design: dict, clean_files: dict[str, str], *, class_names: dict[int, str],
                  volume_margin: float, presence_only: bool) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """What a regime's annotators hand over, per training case of ``design``: ``(labels, weak_rows)``, the mask
    (``full``: the clean label from ``clean_files``; ``partial``: only its annotated class) and the weak-label row
    (``partial``: ``annotated_classes``; ``weak_only``: tags from the clean mask, without volumes when
    ``presence_only``, as a slice-level tag says no more)."""
    labels, rows = {}, {}
    for case, entry in design.items():
        clean = read_label(clean_files[case])
        if entry["kind"] == "full":
            labels[case] = clean
        elif entry["kind"] == "partial":
            labels[case] = partial_mask(clean, entry["annotated"])
            rows[case] = {"annotated_classes": [class_names[entry["annotated"]]]}
        else:
            row = weak_row_from_mask(clean, class_names=class_names, volume_margin=volume_margin)
            if presence_only:
                row.pop("volume", None)
            rows[case] = row
    return labels, rows


def write_dataset(folder: str, cases: dict, labels: dict[str, np.ndarray], dataset_json: dict, *, ending: str,
                  weak_rows: dict | None = None, images_only=(), with_ignore: bool = False) -> None:
    """A raw nnU-Net dataset at ``folder`` (replaced): images linked from ``cases`` (``{case: {"images", "label"}}``)
    for every case of ``labels`` and ``images_only``, ``labels`` written in the geometry of the case's label,
    ``dataset.json`` (with the ignore label if ``with_ignore``) and the weak-label file of ``weak_rows``."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    for case in [*labels, *images_only]:
        for index, image in enumerate(cases[case]["images"]):
            os.symlink(image, os.path.join(folder, "imagesTr", f"{case}_{index:04d}{ending}"))
    for case, label in labels.items():
        write_label_like(label, cases[case]["label"], os.path.join(folder, "labelsTr", case + ending))
    dataset_json = {key: value for key, value in dataset_json.items() if key != "dataset"}
    if with_ignore:
        dataset_json = label_conventions.with_ignore_label(dataset_json)
    dataset_json["numTraining"] = len(labels)
    storage.write_json(os.path.join(folder, "dataset.json"), dataset_json)
    if weak_rows:
        storage.write_json(weak_labels.weak_labels_path(folder),
                           {"version": weak_labels.FORMAT_VERSION, "cases": weak_rows})


class RegimeReplicate:
    """One regime with one training seed, in its own folder (``out``); every step skipped once done."""

    def __init__(self, dataset_path: str, regime: str, *, seed: int, profile: str, out: str, data_seed: int = 0,
                 full_fraction: float | None = None, volume_margin: float = 0.2):
        if regime not in REGIMES:
            raise EMInputError(f"--regimes {regime}: unknown. Fix: pick from {list(REGIMES)}.")
        if profile not in PROFILES:
            raise EMInputError(f"--profile {profile}: unknown. Fix: pick one of {sorted(PROFILES)}.")
        read_clean_dataset(self, dataset_path)
        if len(self.classes) < 2 and regime == "partial":
            raise EMInputError(f"{self.source}: the partial regime needs 2 foreground classes. Fix: use another "
                               f"dataset or drop the regime.")
        self.class_names = {int(v): name for name, v in self.dataset_json["labels"].items()
                            if name not in ("background", "ignore") and int(v) > 0}
        self.regime, self.seed, self.data_seed = regime, seed, data_seed
        self.profile, self.profile_name = PROFILES[profile], profile
        if regime != "full" and self.profile.trainer not in SOFT_TRAINERS or \
                regime == "partial" and self.profile.trainer not in MARGINAL_TRAINERS:
            raise EMInputError(f"--profile {profile}: its trainer {self.profile.trainer} has no soft-target or "
                               f"marginal-loss twin. Fix: use one of the profiles cpu, smoke, gpu.")
        self.full_fraction = FULL_FRACTION.get(regime, 1.0) if full_fraction is None else full_fraction
        self.volume_margin = volume_margin
        if regime == "tags" and self.profile.trainer not in MULTITASK_TRAINERS:
            raise EMInputError(f"--profile {profile}: its trainer {self.profile.trainer} has no multi-task twin. "
                               f"Fix: use one of the profiles cpu, smoke, gpu.")
        self.out = os.path.abspath(out)
        self.workspace = Workspace(self.out, ids=dict(IDS))
        self.sample_workspace = Workspace(os.path.join(self.out, "sample"), ids=dict(IDS))

    @property
    def arms(self) -> tuple[str, ...]:
        return ARMS[self.regime]

    # datasets ---------------------------------------------------------------------------------------------
    def split(self) -> dict:
        """The harness's split rule with ``data_seed``: the same test cases for every regime and seed."""
        rng = np.random.default_rng(self.data_seed)
        cases = [str(c) for c in rng.permutation(sorted(self.cases))]
        n_train = self.profile.train_cases or int(round(0.8 * len(cases)))
        n_test = self.profile.test_cases or len(cases) - n_train
        return {"data_seed": self.data_seed, "train": sorted(cases[:n_train]),
                "test": sorted(cases[n_train:n_train + n_test])}

    def design(self, split: dict) -> dict:
        """Per training case what the regime gives it: ``{"kind": full | partial | weak_only, ...}``."""
        train = split["train"]
        if self.regime == "full":
            return {case: {"kind": "full"} for case in train}
        if self.regime == "partial":
            assigned = assign_partial_classes(train, self.classes, seed=self.data_seed)
            return {case: {"kind": "partial", "annotated": assigned[case]} for case in train}
        full = set(choose_full_cases(train, fraction=self.full_fraction, seed=self.data_seed))
        return {case: {"kind": "full" if case in full else "weak_only"} for case in train}

    def prepare(self) -> dict:
        path = os.path.join(self.out, "design.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        split = self.split()
        design = self.design(split)
        labels, rows = regime_labels(design, {case: self.cases[case]["label"] for case in design},
                                     class_names=self.class_names, volume_margin=self.volume_margin,
                                     presence_only=self.regime == "tags")
        if self.regime == "full":
            self._write_dataset(self.workspace, "clean", labels)
        else:
            masked = {case: label for case, label in labels.items()}
            self._write_dataset(self.workspace, "naive", masked)  # partial masks as they are / the full subset
            weak_only = sorted(case for case, entry in design.items() if entry["kind"] == "weak_only")
            self._write_dataset(self.workspace, "em", masked, weak_rows=rows, images_only=weak_only)
            if self.regime == "tags":  # the multi-task trainers: tag-only cases as label files of ignore only
                blank = {case: np.full(read_label(self.cases[case]["label"]).shape, self.ignore_label, np.uint8)
                         for case in weak_only}
                self._write_dataset(self.workspace, "multitask", {**masked, **blank}, weak_rows=rows,
                                    with_ignore=True)
        for workspace in (self.workspace, self.sample_workspace):
            write_test_folder(workspace.out, self.cases, split["test"], self.ending)
        storage.write_json(path, {"regime": self.regime, "split": split, "design": design,
                                  "weak_labels": rows})
        return self.prepare()

    def _write_dataset(self, workspace: Workspace, arm: str, labels: dict[str, np.ndarray], *,
                       weak_rows: dict | None = None, images_only: list[str] = (), with_ignore: bool = False) -> None:
        write_dataset(workspace.raw(arm), self.cases, labels, self.dataset_json, ending=self.ending,
                      weak_rows=weak_rows, images_only=images_only, with_ignore=with_ignore)

    # steps ------------------------------------------------------------------------------------------------
    def _seed_arguments(self) -> list[str]:
        return ["--seed", str(self.seed)]

    def _plan_vanilla(self, arm: str) -> None:
        if not os.path.isdir(os.path.join(self.workspace.preprocessed(arm),
                                          f"nnUNetPlans_{self.profile.configuration}")):
            _run_measured([_console("nnUNetv2_plan_and_preprocess"), "-d", str(IDS[arm]), "-c",
                           self.profile.configuration, "-np", "2", "-npfp", "2"], self.workspace.env(),
                          os.path.join(self.out, "logs", f"{arm}_plan.log"))
        self._pin_batch(self.workspace, arm)

    def reference_batch_size(self) -> int | None:
        """The batch size nnU-Net plans for the clean training set (the ``full`` replicate of this seed), which
        every arm of a ``PINNED_BATCH_REGIMES`` regime trains with; None for the other regimes."""
        if self.regime not in PINNED_BATCH_REGIMES:
            return None
        full = Workspace(replicate_folder(os.path.dirname(os.path.dirname(self.out)), "full", self.seed),
                         ids=dict(IDS))
        plans_file = os.path.join(full.preprocessed("clean"), "nnUNetPlans.json")
        if not os.path.isfile(plans_file):
            raise EMInputError(f"{plans_file}: not found; the {self.regime} regime trains every arm with the batch "
                               f"size of the clean dataset's plans. Fix: include full in --regimes (it runs first).")
        with open(plans_file) as handle:
            return int(json.load(handle)["configurations"][self.profile.configuration]["batch_size"])

    def _pin_batch(self, workspace: Workspace, arm: str) -> None:
        batch_size = self.reference_batch_size()
        if batch_size is None:
            return
        update_plans(workspace, arm,
                     lambda plans: plans["configurations"][self.profile.configuration].update(batch_size=batch_size))

    def _plan_em(self) -> None:
        """Plan the EM dataset once, then copy it for the sample run (the same plans, ``weak_mode: sample``)."""
        marker = os.path.join(self.out, "logs", "em_plan.done")
        if os.path.isfile(marker):
            return
        _run_measured([_console("nnunetv2_em"), "plan", "-d", str(IDS["em"]), "-c", self.profile.configuration],
                      self.workspace.env(), os.path.join(self.out, "logs", "em_plan.log"))
        self._pin_batch(self.workspace, "em")
        self._set_em(self.workspace, weak_mode="map", soft_targets=SOFT_SAMPLES)
        for source, target in ((self.workspace.raw("em"), self.sample_workspace.raw("em")),
                               (self.workspace.preprocessed("em"), self.sample_workspace.preprocessed("em"))):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, symlinks=True)
        self._set_em(self.sample_workspace, weak_mode="sample", soft_targets=0)
        storage.write_json(marker, {"planned": True})

    def _set_em(self, workspace: Workspace, **settings) -> None:
        update_plans(workspace, "em", lambda plans: plans["em"].update({"mirroring": self.profile.mirroring,
                                                                        **settings}))

    def _run_em(self, workspace: Workspace, name: str) -> dict:
        marker = os.path.join(self.out, "logs", f"{name}_run.done")
        if os.path.isfile(marker):
            return {}
        command = [_console("nnunetv2_em"), "run", "-d", str(IDS["em"]), "-c", self.profile.configuration,
                   "--folds", *[str(f) for f in range(self.profile.folds)], "--rounds", str(self.profile.rounds),
                   "--trainer", self.profile.trainer, "--device", self.profile.device, "--no-validation",
                   "--keep-logits", *self._seed_arguments()]
        measured = _run_measured(command, workspace.env(), os.path.join(self.out, "logs", f"{name}_run.log"))
        storage.write_json(marker, measured)
        return measured

    def _reuse_map_models(self) -> None:
        """Give the sample run the map run's fold models and out-of-fold logits of every round, so it skips
        training and prediction and differs only in its E-step."""
        source = self.workspace.em_run(self.profile)
        target = self.sample_workspace.em_run(self.profile)
        for round_index in source.rounds_started():
            for folder in (source.round_results(round_index), source.logits_folder(round_index)):
                destination = os.path.join(target.round_folder(round_index), os.path.basename(folder))
                if not os.path.isdir(destination):
                    shutil.copytree(folder, destination + ".partial", symlinks=True, dirs_exist_ok=True)
                    os.replace(destination + ".partial", destination)

    def run_arms(self) -> dict:
        timings_file = os.path.join(self.out, "arms.json")
        timings = {}
        if os.path.isfile(timings_file):
            with open(timings_file) as handle:
                timings = json.load(handle)
        soft_trainer = SOFT_TRAINERS.get(self.profile.trainer)
        for arm in self.arms:
            if arm in timings:
                continue
            started = time.time()
            if arm in ("clean", "naive"):
                self._plan_vanilla(arm)
                train_final(self.workspace, arm, self.profile, log_name=arm, seed_arguments=self._seed_arguments())
                predict_test(self.workspace, arm, self.profile, classes=self.classes, ending=self.ending)
            elif arm == "marginal":
                weak_file = weak_labels.weak_labels_path(self.workspace.raw("naive"))
                if not os.path.isfile(weak_file):  # which classes each partial case annotates (vanilla ignores it)
                    with open(os.path.join(self.out, "design.json")) as handle:
                        rows = json.load(handle)["weak_labels"]
                    storage.write_json(weak_file, {"version": weak_labels.FORMAT_VERSION, "cases": rows})
                self._plan_vanilla("naive")
                trainer = MARGINAL_TRAINERS[self.profile.trainer]
                train_final(self.workspace, "naive", self.profile, trainer=trainer, log_name=arm,
                            seed_arguments=self._seed_arguments())
                predict_test(self.workspace, "naive", self.profile, classes=self.classes, ending=self.ending,
                             trainer=trainer, name=arm)
            elif arm in TAG_HEAD_ARMS:
                dataset, head = TAG_HEAD_ARMS[arm]
                if dataset == "em":  # after em_map's run: its labels, pseudo-labels included
                    self._plan_em()
                    self._run_em(self.workspace, "em_map")
                else:
                    self._plan_vanilla(dataset)
                trainer = MULTITASK_TRAINERS[self.profile.trainer][head]
                train_final(self.workspace, dataset, self.profile, trainer=trainer, log_name=arm,
                            seed_arguments=self._seed_arguments())
                predict_test(self.workspace, dataset, self.profile, classes=self.classes, ending=self.ending,
                             trainer=trainer, name=arm)
            elif arm == "em_map":
                self._plan_em()
                self._run_em(self.workspace, "em_map")
                train_final(self.workspace, "em", self.profile, log_name=arm, seed_arguments=self._seed_arguments())
                predict_test(self.workspace, "em", self.profile, classes=self.classes, ending=self.ending, name=arm)
            elif arm == "em_soft":
                train_final(self.workspace, "em", self.profile, trainer=soft_trainer, log_name=arm,
                            seed_arguments=self._seed_arguments())
                predict_test(self.workspace, "em", self.profile, classes=self.classes, ending=self.ending,
                             trainer=soft_trainer, name=arm)
            else:  # em_sample
                self._reuse_map_models()
                self._run_em(self.sample_workspace, "em_sample")
                train_final(self.sample_workspace, "em", self.profile, log_name=arm,
                            seed_arguments=self._seed_arguments())
                predict_test(self.sample_workspace, "em", self.profile, classes=self.classes, ending=self.ending,
                             name=arm)
            timings[arm] = {"wall_minutes": (time.time() - started) / 60}
            storage.write_json(timings_file, timings)
        return timings

    # evaluation -------------------------------------------------------------------------------------------
    def training_labels(self, arm: str, design: dict) -> dict[str, np.ndarray | None]:
        """The labels ``arm`` trained on, per training case (``None``: the case was not trained on)."""
        if arm in ("clean", "naive"):
            folder = os.path.join(self.workspace.raw(arm), "labelsTr")
        else:  # the run's active labels (refined and pseudo-labelled cases alike); em_soft trains on em_map's maps
            folder = os.path.join((self.sample_workspace if arm == "em_sample" else self.workspace).raw("em"),
                                  "labelsTr")
        return {case: read_label(os.path.join(folder, case + self.ending))
                if os.path.isfile(os.path.join(folder, case + self.ending)) else None for case in design}

    def tag_auroc(self, split: dict) -> dict:
        """Per multi-task arm and class: AUROC of the slice tags of the test cases (``tag_prediction.slice_tags``
        of the final model) against "the clean mask holds the class in this slice", both in the preprocessed
        array; with the number of slices and of positive ones."""
        result = {}
        for arm in (a for a in self.arms if a in TAG_HEAD_ARMS):
            dataset, head = TAG_HEAD_ARMS[arm]
            trainer = MULTITASK_TRAINERS[self.profile.trainer][head]
            model = os.path.join(self.workspace.nnunet, "results", self.workspace.dataset(dataset),
                                 f"{trainer}__nnUNetPlans__{self.profile.configuration}")
            result[arm] = slice_tag_auroc(model, [self.cases[case] for case in split["test"]], classes=self.classes,
                                          device=self.profile.device)
        return result

    def label_quality(self, design: dict) -> dict:
        """Per arm and kind of case: the mean over cases of the foreground-mean ``dice_kept`` and ``dice`` against
        the clean masks, the ignored share, and how many cases the arm trained on."""
        result = {}
        for arm in self.arms:
            if arm in ("em_soft", "marginal") or arm in TAG_HEAD_ARMS:
                continue  # em_soft's / em_multitask's hard labels are em_map's, marginal's naive's; multi-task: masks
                # and tags
            labels = self.training_labels(arm, design)
            groups = {}
            for case, entry in design.items():
                clean = read_label(self.cases[case]["label"])
                annotation = (partial_mask(clean, entry["annotated"]) if entry["kind"] == "partial"
                              else np.zeros_like(clean) if entry["kind"] == "weak_only" else clean)
                group = groups.setdefault(entry["kind"], {"cases": 0, "trained": 0, "rows": []})
                group["cases"] += 1
                if labels[case] is None:
                    continue
                group["trained"] += 1
                group["rows"].append(metrics.label_scores(clean, labels[case], classes=self.classes,
                                                          ignore_label=self.ignore_label, annotation=annotation))
            result[arm] = {kind: summarize_label_group(group, classes=self.classes) for kind, group in groups.items()}
        return result

    def run(self) -> dict:
        prepared = self.prepare()
        timings = self.run_arms()
        results = {"regime": self.regime, "seed": self.seed, "data_seed": self.data_seed,
                   "profile": self.profile_name, "train_cases": len(prepared["split"]["train"]),
                   "pinned_batch_size": self.reference_batch_size(),
                   "test_case_ids": prepared["split"]["test"],
                   "kinds": {kind: sum(e["kind"] == kind for e in prepared["design"].values())
                             for kind in ("full", "partial", "weak_only")},
                   **({"tag_auroc": self.tag_auroc(prepared["split"])} if self.regime == "tags" else {}),
                   "arms": timings,
                   "test_dice": {arm: test_dice(self.sample_workspace if arm == "em_sample" else self.workspace,
                                                arm, classes=self.classes, ending=self.ending, seed=self.seed)
                                 for arm in self.arms},
                   "label_quality": self.label_quality(prepared["design"])}
        storage.write_json(os.path.join(self.out, "results.json"), results)
        return results


# -------------------------------------------------------------------------------------- per-arm evaluation
def slice_tag_auroc(model: str, cases: list[dict], *, classes, device: str) -> dict:
    """AUROC per class of a multi-task ``model``'s slice tags (``tag_prediction.slice_tags``, fold ``all``) on
    ``cases`` (``{"images": [...], "label": path}``) against "the clean mask holds the class in this slice", both in
    the preprocessed array: ``{class: {"auroc", "slices", "positive"}}`` (AUROC NaN where one kind is missing)."""
    from sklearn.metrics import roc_auc_score

    from nnunetv2_em.rank_unlabeled import load_predictor
    from nnunetv2_em.tag_prediction import slice_tags

    predictor = load_predictor(model, ("all",), device)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    scores, truths = [], []
    for case in cases:
        data, seg, _ = preprocessor.run_case(case["images"], case["label"], predictor.plans_manager,
                                             predictor.configuration_manager, predictor.dataset_json)
        scores.append(slice_tags(predictor, data))
        truths.append(np.stack([(seg[0] == c).reshape(seg.shape[1], -1).any(axis=1) for c in classes], axis=1))
    scores, truths = np.concatenate(scores), np.concatenate(truths)
    return {str(c): {"auroc": float(roc_auc_score(truths[:, i], scores[:, i]))
                     if 0 < truths[:, i].sum() < len(truths) else float("nan"),
                     "slices": int(len(truths)), "positive": int(truths[:, i].sum())}
            for i, c in enumerate(classes)}


def summarize_label_group(group: dict, *, classes) -> dict:
    """One kind of case of one arm: ``group`` = ``{"cases", "trained", "rows": [metrics.label_scores rows]}`` ->
    the counts, the mean over cases of the foreground-mean ``dice_kept`` and ``dice``, the ignored share and the
    per-class ``dice_kept`` (scores only where the arm trained on a case)."""
    summary = {"cases": group["cases"], "trained": group["trained"]}
    rows = group["rows"]
    if not rows:
        return summary
    for key in ("dice_kept", "dice"):
        summary[key] = float(np.mean([np.nanmean([row[f"{key}_{c}"] for c in classes]) for row in rows]))
    summary["fraction_ignored"] = float(np.mean([row["fraction_ignored"] for row in rows]))
    summary["per_class_dice_kept"] = {str(c): float(np.nanmean([row[f"dice_kept_{c}"] for row in rows]))
                                      for c in classes}
    return summary


# --------------------------------------------------------------------------------------------------- the suite
def replicate_folder(out: str, regime: str, seed: int) -> str:
    return os.path.join(out, regime, f"seed_{seed}")


def run_suite(dataset: str, *, regimes, seeds, profile: str, out: str, data_seed: int = 0) -> dict:
    """Every regime x seed (seed by seed, so a stopped suite has whole replicates); results per replicate in
    ``<out>/<regime>/seed_<s>/results.json``, the summary in ``<out>/summary.json``."""
    for seed in seeds:
        for regime in regimes:
            RegimeReplicate(dataset, regime, seed=seed, profile=profile, data_seed=data_seed,
                            out=replicate_folder(out, regime, seed)).run()
    summary = summarize(load_replicates(out))
    storage.write_json(os.path.join(out, "summary.json"), summary)
    return summary


def load_replicates(out: str) -> dict[tuple[str, int], dict]:
    return suite.load_replicates(out, known=REGIMES)


def summarize(replicates: dict[tuple[str, int], dict]) -> dict:
    """Per regime and arm, over the seeds that have the arm: test Dice per class and foreground (mean and bootstrap
    interval over seeds x cases), the paired difference to ``naive`` and to ``clean`` (seeds x cases, with the
    number of seeds won), and label quality averaged over seeds."""
    summary = {"regimes": {}}
    clean = {seed: r for (regime, seed), r in replicates.items() if regime == "full"}
    for regime in REGIMES:
        runs = {seed: r for (name, seed), r in replicates.items() if name == regime}
        if not runs:
            continue
        seeds = sorted(runs)
        arms = {}
        for arm in runs[seeds[0]]["test_dice"]:
            rows = [runs[s]["test_dice"][arm] for s in seeds]
            entry = {"seeds": seeds,
                     "foreground": metrics.bootstrap_ci([v for r in rows for v in r["per_case"].values()]),
                     "per_class": {c: metrics.bootstrap_ci([v for r in rows for v in r["per_class_case"][c].values()])
                                   for c in rows[0]["per_class_case"]},
                     "per_seed": [r["foreground"][0] for r in rows]}
            for name, baseline in (("vs_naive", {s: runs[s]["test_dice"].get("naive") for s in seeds}),
                                   ("vs_clean", {s: clean[s]["test_dice"]["clean"] if s in clean else None
                                                 for s in seeds})):
                paired = [s for s in seeds if baseline[s] is not None]
                if arm in ("naive", "clean") and name == "vs_naive" or not paired or arm == "clean":
                    continue
                cases = sorted(rows[0]["per_case"])
                differences = np.array([[runs[s]["test_dice"][arm]["per_case"][c] - baseline[s]["per_case"][c]
                                         for c in cases] for s in paired])
                entry[name] = {"difference": metrics.paired_bootstrap(differences),
                               "seeds_won": int(sum(row.mean() > 0 for row in differences)), "seeds": paired}
            arms[arm] = entry
        quality = {}
        for arm in runs[seeds[0]]["label_quality"]:
            kinds = runs[seeds[0]]["label_quality"][arm]
            quality[arm] = {kind: {key: float(np.mean([runs[s]["label_quality"][arm][kind][key] for s in seeds]))
                                   for key in ("dice_kept", "dice", "fraction_ignored")
                                   if key in kinds[kind]} | {"cases": kinds[kind]["cases"],
                                                             "trained": kinds[kind]["trained"]}
                            for kind in kinds}
        summary["regimes"][regime] = {"seeds": seeds, "kinds": runs[seeds[0]]["kinds"], "test": arms,
                                      "label_quality": quality}
        if all("tag_auroc" in runs[s] for s in seeds):
            first = runs[seeds[0]]["tag_auroc"]
            summary["regimes"][regime]["tag_auroc"] = {
                arm: {c: {"auroc": float(np.mean([runs[s]["tag_auroc"][arm][c]["auroc"] for s in seeds])),
                          "per_seed": [runs[s]["tag_auroc"][arm][c]["auroc"] for s in seeds],
                          "slices": first[arm][c]["slices"], "positive": first[arm][c]["positive"]}
                      for c in first[arm]} for arm in first}
    return summary


def markdown(summary: dict, *, command: str, classes: dict[str, str]) -> str:
    """The report: test Dice per regime and arm with intervals and paired differences, then label quality."""
    def f(value, digits=3):
        return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"

    def interval(triple):
        return f"{f(triple[0])} [{f(triple[1])}, {f(triple[2])}]"

    # the report covers every finished replicate under --out, also those an earlier command (other regimes or
    # seeds) trained: the command that wrote it is not the only one behind it
    lines = [f"Written by `{command}` from every finished replicate under its `--out` (each section names its "
             "seeds; earlier commands may have trained some of them).", ""]
    for regime, entry in summary["regimes"].items():
        lines += [f"### {regime} ({', '.join(f'{n} {k}' for k, n in entry['kinds'].items() if n)}; seeds "
                  f"{entry['seeds']})", "",
                  "| arm | test Dice (fg mean) | " + " | ".join(classes.values()) +
                  " | vs naive (paired) | seeds won | vs clean (paired) |",
                  "|---|---|" + "---|" * len(classes) + "---|---|---|"]
        for arm, row in entry["test"].items():
            naive, clean = row.get("vs_naive"), row.get("vs_clean")
            won = f"{naive['seeds_won']}/{len(naive['seeds'])}" if naive else "-"
            lines.append(f"| {arm} | {interval(row['foreground'])} | "
                         + " | ".join(interval(row["per_class"][c]) for c in classes)
                         + f" | {interval(naive['difference']) if naive else '-'} | {won} | "
                         f"{interval(clean['difference']) if clean else '-'} |")
        if entry.get("tag_auroc"):
            lines += ["", "| tag AUROC per test slice (mean over seeds) | "
                      + " | ".join(classes.values()) + " |", "|---|" + "---|" * len(classes)]
            for arm, per_class in entry["tag_auroc"].items():
                lines.append(f"| {arm} | " + " | ".join(
                    f"{f(per_class[c]['auroc'])} ({per_class[c]['positive']}/{per_class[c]['slices']} slices hold it)"
                    for c in classes) + " |")
        lines += ["", "| training labels vs clean | case kind | cases (trained) | Dice, ignored kept as annotation | "
                  "Dice, ignored left out | ignored share |", "|---|---|---|---|---|---|"]
        for arm, kinds in entry["label_quality"].items():
            for kind, q in kinds.items():
                lines.append(f"| {arm} | {kind} | {q['cases']} ({q['trained']}) | {f(q.get('dice_kept'))} | "
                             f"{f(q.get('dice'))} | {f(q.get('fraction_ignored'))} |")
        lines.append("")
    return "\n".join(lines)
