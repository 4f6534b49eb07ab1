"""Simulated labelling loop (issue 14): which unlabeled cases to annotate next, measured by test Dice after retraining.

From a clean raw dataset: a fixed held-out test set and a pool (``data_seed``). Per seed, ``initial`` pool cases are
labelled at random; then ``steps`` times: train on the labelled cases (the profile's trainer and budget, training
seed = the seed), score the test set, rank the rest of the pool with a strategy and "annotate" the top ``add``
(their clean labels join). Strategies (``rank_unlabeled``): ``examine`` (EXAMINE on the step's model's encoder
embeddings), ``examine-ssl`` (EXAMINE on a masked-image-pretrained encoder, trained once per seed on the pool's
images, labels unused), ``entropy`` (mean predictive entropy of the step's model), ``fg-random`` (random among cases
with predicted foreground first, nnActive's strong baseline), ``k-center`` (diversity on the step's embeddings,
from the labelled cases), ``random``. Step 0 is shared by every strategy of a seed.

One nnU-Net dataset holds the pool and the test cases, planned and preprocessed once; every training is one split
of its ``splits_final.json`` (appended, never changed), so each step costs one training and one prediction. Every
step is written down (``<records>/<strategy>/seed_<s>/step_<k>.json``: the labelled cases, test Dice; the picks in
``picks_<k>.json``) and skipped once done: the loop resumes where it stopped. The records are small and may live
apart from ``out`` (a committed folder): a later session with an empty ``out`` continues from them, retraining only
the seeded model a pending pick needs (seeded CPU trainings are bit-identical, ``scripts/results/seeded_training.md``).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from nnunetv2_em import rank_unlabeled, storage
from nnunetv2_em.benchmark import metrics
from nnunetv2_em.benchmark.harness import (
    PROFILES,
    Workspace,
    _console,
    _run_measured,
    predict_test,
    read_clean_dataset,
    test_dice,
    train_final,
    write_test_folder,
)
from nnunetv2_em.errors import EMInputError

STRATEGIES = ("examine", "examine-ssl", "entropy", "fg-random", "k-center", "random")
IDS = {"pool": 981}
SSL_TRAINERS = {"VanillaTrainer_cpu": "MaskedPretrainTrainer_cpu", "VanillaTrainer_tiny": "MaskedPretrainTrainer_tiny",
                "nnUNetTrainer": "MaskedPretrainTrainer"}


def pick(strategy: str, candidates: list[str], *, embeddings: np.ndarray | None, stats: list[dict],
         labelled_embeddings: np.ndarray | None, add: int, seed: int) -> list[str]:
    """The ``add`` candidates a strategy annotates next (``rank_unlabeled.rankings`` on the candidates' rows).

    Args:
        embeddings: ``(N, F)`` of ``candidates`` (``None`` for strategies without). stats: per candidate
            ``mean_entropy`` / ``foreground_voxels``. labelled_embeddings: ``(L, F)`` of the labelled cases.
    """
    if add > len(candidates):
        raise ValueError(f"{add} cases requested, {len(candidates)} left in the pool")
    name = "examine" if strategy == "examine-ssl" else strategy
    rows = embeddings if embeddings is not None else np.zeros((len(candidates), 1))
    order = rank_unlabeled.rankings(rows, stats, labelled_embeddings=labelled_embeddings, strategies=[name],
                                    seed=seed)[name]
    return [candidates[i] for i in order[:add]]


class LabellingLoop:
    """The whole simulated loop in ``out``: one dataset, strategies x seeds x steps; every step skipped once done."""

    def __init__(self, dataset_path: str, *, out: str, profile: str = "cpu", strategies=STRATEGIES, pool: int = 100,
                 test: int = 20, initial: int = 10, add: int = 5, steps: int = 4, data_seed: int = 0,
                 records: str | None = None):
        if profile not in PROFILES:
            raise EMInputError(f"--profile {profile}: unknown. Fix: pick one of {sorted(PROFILES)}.")
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown:
            raise EMInputError(f"--strategies {unknown[0]}: unknown. Fix: pick from {', '.join(STRATEGIES)}.")
        read_clean_dataset(self, dataset_path)
        if pool + test > len(self.cases) or initial + add * steps > pool:
            raise EMInputError(f"{self.source}: {len(self.cases)} cases; pool {pool} + test {test}, and {initial} + "
                               f"{add} x {steps} labelled from the pool, do not fit. Fix: smaller --pool/--steps.")
        self.profile, self.profile_name = PROFILES[profile], profile
        self.strategies = tuple(strategies)
        self.pool_size, self.test_size, self.initial, self.add, self.steps = pool, test, initial, add, steps
        self.data_seed = data_seed
        self.out = os.path.abspath(out)
        self.records = os.path.abspath(records) if records else os.path.join(self.out, "loop")
        self.workspace = Workspace(self.out, ids=dict(IDS))

    # data -------------------------------------------------------------------------------------------------
    def prepare(self) -> dict:
        """The pool and test split, the dataset (pool cases with their clean labels), planned and preprocessed."""
        path = os.path.join(self.out, "split.json")
        if not os.path.isfile(path):
            order = [str(c) for c in np.random.default_rng(self.data_seed).permutation(sorted(self.cases))]
            split = {"data_seed": self.data_seed, "pool": sorted(order[:self.pool_size]),
                     "test": sorted(order[self.pool_size:self.pool_size + self.test_size])}
            folder = self.workspace.raw("pool")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(os.path.join(folder, "imagesTr"))
            os.makedirs(os.path.join(folder, "labelsTr"))
            for case in split["pool"]:
                for index, image in enumerate(self.cases[case]["images"]):
                    os.symlink(image, os.path.join(folder, "imagesTr", f"{case}_{index:04d}{self.ending}"))
                os.symlink(self.cases[case]["label"], os.path.join(folder, "labelsTr", case + self.ending))
            dataset_json = {k: v for k, v in self.dataset_json.items() if k != "dataset"}
            dataset_json["numTraining"] = len(split["pool"])
            storage.write_json(os.path.join(folder, "dataset.json"), dataset_json)
            write_test_folder(self.out, self.cases, split["test"], self.ending)
            storage.write_json(path, split)
        with open(path) as handle:
            split = json.load(handle)
        recorded = os.path.join(self.records, "split.json")
        if not os.path.isfile(recorded):
            storage.write_json(recorded, split)
        with open(recorded) as handle:
            if json.load(handle) != split:
                raise EMInputError(f"{recorded}: the records were made with another pool/test split than {path}. "
                                   f"Fix: use the records' --pool/--test/dataset, or another --records folder.")
        if not os.path.isdir(os.path.join(self.workspace.preprocessed("pool"),
                                          f"nnUNetPlans_{self.profile.configuration}")):
            _run_measured([_console("nnUNetv2_plan_and_preprocess"), "-d", str(IDS["pool"]), "-c",
                           self.profile.configuration, "-np", "2", "-npfp", "2"], self.workspace.env(),
                          os.path.join(self.out, "logs", "plan.log"))
        return split

    def _split_index(self, labelled: list[str]) -> int:
        """The index of the split that trains on ``labelled`` (appended to splits_final.json when new)."""
        path = os.path.join(self.workspace.preprocessed("pool"), "splits_final.json")
        splits = []
        if os.path.isfile(path):
            with open(path) as handle:
                splits = json.load(handle)
        wanted = sorted(labelled)
        for index, split in enumerate(splits):
            if split["train"] == wanted:
                return index
        splits.append({"train": wanted, "val": wanted[:2]})  # validation is off; nnU-Net wants a non-empty list
        storage.write_json(path, splits)
        return len(splits) - 1

    # steps ------------------------------------------------------------------------------------------------
    def _train_and_test(self, labelled: list[str], seed: int, name: str) -> dict:
        fold = str(self._split_index(labelled))
        train_final(self.workspace, "pool", self.profile, log_name=name, seed_arguments=["--seed", str(seed)],
                    fold=fold)
        predict_test(self.workspace, "pool", self.profile, classes=self.classes, ending=self.ending, name=name,
                     fold=fold)
        return {"fold": int(fold), **{k: v for k, v in test_dice(self.workspace, name, classes=self.classes,
                                                                   ending=self.ending, seed=seed).items()
                                        if k in ("foreground", "per_class", "per_case")}}

    def _model(self, trainer: str | None = None) -> str:
        return os.path.join(self.workspace.nnunet, "results", self.workspace.dataset("pool"),
                            f"{trainer or self.profile.trainer}__nnUNetPlans__{self.profile.configuration}")

    def _ssl_model(self, seed: int) -> str:
        """A masked-image-pretrained network on the pool's images (labels unused), one per seed (``fold all``)."""
        trainer = SSL_TRAINERS.get(self.profile.trainer)
        if trainer is None:
            raise EMInputError(f"--profile {self.profile_name}: no masked-pretraining twin of "
                               f"{self.profile.trainer}. Fix: drop examine-ssl or use the cpu/smoke/gpu profile.")
        train_final(self.workspace, "pool", self.profile, trainer=trainer, log_name=f"ssl_seed_{seed}",
                    seed_arguments=["--seed", str(seed)])
        return self._model(trainer)

    def _features(self, model: str, fold, cases: list[str], *, embeddings: bool, stats: bool):
        predictor = rank_unlabeled.load_predictor(model, (fold,), self.profile.device)
        return rank_unlabeled.case_features({case: self.cases[case]["images"] for case in cases},
                                            embedder=predictor if embeddings else None,
                                            predictor=predictor if stats else None)

    def step_file(self, strategy: str, seed: int, step: int) -> str:
        return os.path.join(self.records, "shared" if step == 0 else strategy, f"seed_{seed}", f"step_{step}.json")

    def _step_model(self, record: dict) -> int:
        """The fold of the model trained at ``record``'s step, retrained (seeded, so the same weights) when only its
        record survived."""
        fold = self._split_index(record["labelled"])
        train_final(self.workspace, "pool", self.profile, log_name=f"seed_{record['seed']}_fold_{fold}_retrain",
                    seed_arguments=["--seed", str(record["seed"])], fold=str(fold))
        return fold

    def _record(self, path: str, labelled: list[str], seed: int, step: int, name: str) -> dict:
        """The step's record (trained and tested on ``labelled`` once; read back afterwards)."""
        if not os.path.isfile(path):
            storage.write_json(path, {"seed": seed, "step": step, "labelled": labelled,
                                      **self._train_and_test(labelled, seed, name)})
        with open(path) as handle:
            return json.load(handle)

    def run_seed(self, seed: int, split: dict) -> None:
        """Step 0 (shared: ``initial`` random pool cases), then per strategy ``steps`` rounds of pick and retrain."""
        start = sorted(str(c) for c in np.random.default_rng(seed).choice(split["pool"], self.initial,
                                                                           replace=False))
        first = self._record(self.step_file("shared", seed, 0), start, seed, 0, f"seed_{seed}_step_0")
        for strategy in self.strategies:
            record = first
            for step in range(1, self.steps + 1):
                labelled = sorted(record["labelled"] + self._pick(strategy, seed, record))
                record = self._record(self.step_file(strategy, seed, step), labelled, seed, step,
                                      f"seed_{seed}_step_{step}_{strategy}")

    def run(self, seeds) -> dict:
        """Every seed (each a whole loop), then the learning curves and their summary (``summary.json``)."""
        split = self.prepare()
        for seed in seeds:
            self.run_seed(seed, split)
        summary = self.summary()
        storage.write_json(os.path.join(self.out, "summary.json"), summary)
        return summary

    def summary(self) -> dict:
        """The learning curves of the seeds whose every step is recorded (nothing trained): per size and over the
        curve; ``unfinished``: the seeds per strategy left out (a partial curve would mix seeds between sizes)."""
        curves = learning_curves(self.records)
        finished = {strategy: done for strategy, seeds in curves.items()
                    if (done := {seed: steps for seed, steps in seeds.items() if len(steps) == self.steps + 1})}
        return {"profile": self.profile_name, "pool": self.pool_size, "test": self.test_size,
                "initial": self.initial, "add": self.add, "steps": self.steps,
                "curves": summarize(finished), "vs_fg-random": compare_curves(finished),
                "unfinished": {strategy: left for strategy, seeds in curves.items()
                               if (left := sorted(set(seeds) - set(finished.get(strategy, {}))))}}

    def _pick(self, strategy: str, seed: int, record: dict) -> list[str]:
        """The cases ``strategy`` annotates after the step of ``record`` (chosen once, kept in picks_<step>.json)."""
        picks_file = os.path.join(self.records, strategy, f"seed_{seed}", f"picks_{record['step']}.json")
        if os.path.isfile(picks_file):
            with open(picks_file) as handle:
                return json.load(handle)
        with open(os.path.join(self.out, "split.json")) as handle:
            pool = json.load(handle)["pool"]
        candidates = sorted(set(pool) - set(record["labelled"]))
        model = self._model()
        embeddings, labelled_embeddings, stats = None, None, [{}] * len(candidates)
        if strategy in ("examine", "k-center", "entropy", "fg-random"):
            fold = self._step_model(record)
            embeddings, stats = self._features(model, fold, candidates, embeddings=strategy in ("examine", "k-center"),
                                               stats=strategy in ("entropy", "fg-random"))
            if strategy == "k-center":
                labelled_embeddings, _ = self._features(model, fold, record["labelled"], embeddings=True, stats=False)
        elif strategy == "examine-ssl":
            embeddings, _ = self._features(self._ssl_model(seed), "all", candidates, embeddings=True, stats=False)
        picked = pick(strategy, candidates, embeddings=embeddings, stats=stats,
                      labelled_embeddings=labelled_embeddings, add=self.add, seed=seed * 1000 + record["step"])
        storage.write_json(picks_file, picked)
        return picked


def learning_curves(loop: str) -> dict:
    """``{strategy: {seed: [(labelled cases, test Dice, {test case: Dice}), ...]}}`` of the steps recorded in the
    records folder ``loop``, step 0 under every strategy."""
    curves: dict = {}
    shared = {}
    for seed_folder in sorted(os.listdir(os.path.join(loop, "shared"))) if os.path.isdir(
            os.path.join(loop, "shared")) else []:
        with open(os.path.join(loop, "shared", seed_folder, "step_0.json")) as handle:
            shared[seed_folder] = json.load(handle)
    for strategy in sorted(os.listdir(loop)) if os.path.isdir(loop) else []:
        if strategy == "shared" or not os.path.isdir(os.path.join(loop, strategy)):
            continue
        for seed_folder in sorted(os.listdir(os.path.join(loop, strategy))):
            steps = [shared[seed_folder]] if seed_folder in shared else []
            for name in sorted(os.listdir(os.path.join(loop, strategy, seed_folder))):
                if name.startswith("step_"):
                    with open(os.path.join(loop, strategy, seed_folder, name)) as handle:
                        steps.append(json.load(handle))
            curves.setdefault(strategy, {})[int(seed_folder.removeprefix("seed_"))] = sorted(
                (len(s["labelled"]), s["foreground"][0], s["per_case"]) for s in steps)
    return curves


def summarize(curves: dict, *, baseline: str = "fg-random") -> dict:
    """Per strategy and labelled-set size: mean test Dice over seeds (bootstrap interval over seeds x cases) and the
    paired difference to ``baseline`` on the same seeds and test cases."""
    summary = {}
    for strategy, seeds in curves.items():
        sizes = sorted({n for steps in seeds.values() for n, _, _ in steps})
        rows = {}
        for size in sizes:
            per_seed = {s: next(c for n, _, c in steps if n == size) for s, steps in seeds.items()
                        if any(n == size for n, _, _ in steps)}
            cases = sorted(next(iter(per_seed.values())))
            row = {"seeds": sorted(per_seed),
                   "dice": metrics.bootstrap_ci([v for c in per_seed.values() for v in c.values()])}
            theirs = {s: next((c for n, _, c in curves.get(baseline, {}).get(s, []) if n == size), None)
                      for s in per_seed}
            paired = [s for s in per_seed if theirs[s] is not None]
            if strategy != baseline and paired and size != sizes[0]:  # the first step is shared: no comparison
                differences = np.array([[per_seed[s][c] - theirs[s][c] for c in cases] for s in paired])
                row[f"vs_{baseline}"] = {"difference": metrics.paired_bootstrap(differences),
                                         "seeds_won": int(sum(d.mean() > 0 for d in differences)),
                                         "seeds_tied": int(sum(d.mean() == 0 for d in differences)),
                                         "seeds": paired}
            rows[size] = row
        summary[strategy] = rows
    return summary


def compare_curves(curves: dict, *, baseline: str = "fg-random") -> dict:
    """Per strategy: the paired test-Dice difference to ``baseline`` averaged over the steps after the shared step 0
    (the area between the learning curves per step), over the seeds both strategies finished, with its verdict
    (``metrics.difference_verdict``). Strategies without a finished seed in common are left out."""
    compared = {}
    for strategy, seeds in curves.items():
        if strategy == baseline or baseline not in curves:
            continue
        sizes = sorted({n for steps in seeds.values() for n, _, _ in steps})
        curve = _curve_difference(seeds, curves[baseline], sizes[1:])
        if curve:
            compared[strategy] = curve
    return compared


def _curve_difference(mine: dict, theirs: dict, later: list[int]) -> dict | None:
    finished = [s for s in sorted(mine) if s in theirs and {n for n, _, _ in mine[s]} >= set(later)
                and {n for n, _, _ in theirs[s]} >= set(later)]
    if not later or not finished:
        return None
    per_size = {s: ({n: c for n, _, c in mine[s]}, {n: c for n, _, c in theirs[s]}) for s in finished}
    cases = sorted(per_size[finished[0]][0][later[0]])
    differences = np.array([[np.mean([per_size[s][0][n][c] - per_size[s][1][n][c] for n in later]) for c in cases]
                            for s in finished])
    interval = metrics.paired_bootstrap(differences)
    per_seed = [float(d.mean()) for d in differences]
    return {"sizes": later, "seeds": finished, "difference": interval, "per_seed": per_seed,
            "verdict": metrics.difference_verdict(per_seed, interval)}
