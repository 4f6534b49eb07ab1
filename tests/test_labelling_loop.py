"""The simulated labelling loop's bookkeeping with training, prediction and features stubbed: shared step 0, picks
only from the rest of the pool, one split per labelled set, resumption without retraining, curves and summary, and a
fresh checkout continuing from committed records."""

import json
import os

import numpy as np
import pytest

from nnunetv2_em.benchmark import labelling_loop
from nnunetv2_em.benchmark.labelling_loop import LabellingLoop, pick


def test_pick_follows_each_strategy():
    candidates = ["a", "b", "c", "d"]
    stats = [{"mean_entropy": e, "foreground_voxels": f} for e, f in ((0.1, 0), (0.9, 5), (0.5, 0), (0.7, 3))]
    assert pick("entropy", candidates, embeddings=None, stats=stats, labelled_embeddings=None, add=2,
                seed=0) == ["b", "d"]
    assert set(pick("fg-random", candidates, embeddings=None, stats=stats, labelled_embeddings=None, add=2,
                    seed=0)) == {"b", "d"}  # cases with predicted foreground first
    embeddings = np.eye(4)[[0, 0, 1, 2]] + 0.01 * np.arange(4)[:, None]
    assert pick("k-center", candidates, embeddings=embeddings, stats=stats,
                labelled_embeddings=np.eye(4)[[0]], add=1, seed=0) in (["c"], ["d"])  # far from the labelled one
    assert pick("examine-ssl", candidates, embeddings=embeddings, stats=stats, labelled_embeddings=None, add=4,
                seed=0) == pick("examine", candidates, embeddings=embeddings, stats=stats,
                                labelled_embeddings=None, add=4, seed=0)
    with pytest.raises(ValueError, match="left in the pool"):
        pick("random", candidates, embeddings=None, stats=stats, labelled_embeddings=None, add=5, seed=0)


def test_loop_bookkeeping_and_resumption(tmp_path, monkeypatch):
    from conftest import demo_cases, make_raw_dataset

    source = make_raw_dataset(str(tmp_path / "raw"), 4, demo_cases(14))
    trained = []

    def train_and_test(self, labelled, seed, name):
        trained.append((name, tuple(labelled)))
        fold = self._split_index(labelled)
        score = 0.5 + 0.01 * len(labelled)
        return {"fold": fold, "foreground": [score, score, score], "per_class": {},
                "per_case": {"t1": score, "t2": score - 0.1}}

    def features(self, model, fold, cases, *, embeddings, stats):
        rng = np.random.default_rng(len(cases))
        return (rng.random((len(cases), 3)) if embeddings else None,
                [{"mean_entropy": float(sum(map(ord, c)) % 7), "foreground_voxels": 1} for c in cases])

    monkeypatch.setattr(LabellingLoop, "_train_and_test", train_and_test)
    monkeypatch.setattr(LabellingLoop, "_features", features)
    monkeypatch.setattr(LabellingLoop, "_ssl_model", lambda self, seed: "ssl")
    monkeypatch.setattr(labelling_loop, "_run_measured", lambda *a, **k: {})  # no planning
    models = []  # (fold, seed) of every step model the picks asked for
    monkeypatch.setattr(labelling_loop, "train_final",
                        lambda workspace, arm, profile, *, fold, seed_arguments, **k: models.append(
                            (fold, seed_arguments[-1])))

    def loop(records=None):
        return LabellingLoop(source, out=str(tmp_path / "loop"), profile="smoke", pool=10, test=3, initial=4, add=2,
                             steps=2, strategies=("examine", "entropy", "fg-random"), records=records)

    summary = loop().run([0, 1])
    assert len(trained) == 2 * (1 + 3 * 2)  # per seed: a shared step 0, then 2 steps per strategy
    with open(tmp_path / "loop" / "split.json") as handle:
        split = json.load(handle)
    for seed in (0, 1):
        for strategy in ("examine", "entropy", "fg-random"):
            sizes = []
            previous = None
            for step in range(3):
                with open(loop().step_file(strategy, seed, step)) as handle:
                    record = json.load(handle)
                assert set(record["labelled"]) <= set(split["pool"])
                if previous is not None:
                    assert set(previous) < set(record["labelled"])  # picks are new pool cases
                previous = record["labelled"]
                sizes.append(len(record["labelled"]))
            assert sizes == [4, 6, 8]
    with open(os.path.join(tmp_path / "loop", "nnunet", "preprocessed", "Dataset981_BenchPool",
                           "splits_final.json")) as handle:
        splits = json.load(handle)
    assert len({tuple(s["train"]) for s in splits}) == len(splits)  # one split per distinct labelled set
    trained.clear()
    again = loop().run([0, 1])
    assert trained == [] and again == summary  # resumed: nothing retrained, the same curves
    rows = summary["curves"]["examine"]
    assert sorted(rows) == [4, 6, 8] and rows[4]["seeds"] == [0, 1]
    assert rows[8]["vs_fg-random"]["difference"][0] == pytest.approx(0.0)  # same stub score at the same size


def test_loop_continues_from_records_alone(tmp_path, monkeypatch):
    """A later session keeps only the records (committed) and an empty ``out``: finished steps are not retrained, the
    one pending pick retrains just its step's seeded model, and the curves are those of one uninterrupted run."""
    import shutil

    from conftest import demo_cases, make_raw_dataset

    source = make_raw_dataset(str(tmp_path / "raw"), 4, demo_cases(14))
    trained, models = [], []

    def train_and_test(self, labelled, seed, name):
        trained.append(name)
        score = 0.5 + 0.01 * len(labelled)
        return {"fold": self._split_index(labelled), "foreground": [score, score, score], "per_class": {},
                "per_case": {"t1": score, "t2": score - 0.1 * seed}}

    def features(self, model, fold, cases, *, embeddings, stats):
        return (np.arange(3 * len(cases), dtype=float).reshape(len(cases), 3) ** 1.5 if embeddings else None,
                [{"mean_entropy": float(sum(map(ord, c)) % 7), "foreground_voxels": 1} for c in cases])

    monkeypatch.setattr(LabellingLoop, "_train_and_test", train_and_test)
    monkeypatch.setattr(LabellingLoop, "_features", features)
    monkeypatch.setattr(labelling_loop, "_run_measured", lambda *a, **k: {})
    monkeypatch.setattr(labelling_loop, "train_final",
                        lambda workspace, arm, profile, *, fold, seed_arguments, **k: models.append(
                            (fold, seed_arguments[-1])))
    records = str(tmp_path / "records")

    def loop(out):
        return LabellingLoop(source, out=str(tmp_path / out), profile="smoke", pool=10, test=3, initial=4, add=2,
                             steps=2, strategies=("examine", "random"), records=records)

    whole = loop("first").run([0])
    assert os.path.isfile(os.path.join(records, "split.json"))
    assert not os.path.isdir(tmp_path / "first" / "loop")  # every record went to the records folder
    with open(os.path.join(records, "examine", "seed_0", "step_1.json")) as handle:
        step_one = json.load(handle)
    os.remove(os.path.join(records, "examine", "seed_0", "step_2.json"))
    os.remove(os.path.join(records, "examine", "seed_0", "picks_1.json"))
    shutil.rmtree(tmp_path / "first")
    partial = loop("second").summary()  # a seed with a missing step is left out of the curves, and named
    assert partial["unfinished"] == {"examine": [0]} and sorted(partial["curves"]) == ["random"]
    assert not os.path.isdir(tmp_path / "second")  # reporting trains and writes nothing
    trained.clear()
    models.clear()
    again = loop("second").run([0])
    assert trained == ["seed_0_step_2_examine"]
    assert len(models) == 1 and models[0][1] == "0"  # only step 1's model, with its seed
    with open(os.path.join(tmp_path / "second", "nnunet", "preprocessed", "Dataset981_BenchPool",
                           "splits_final.json")) as handle:
        assert json.load(handle)[int(models[0][0])]["train"] == step_one["labelled"]
    assert again == whole and whole["unfinished"] == {}

    with open(os.path.join(records, "split.json"), "w") as handle:  # records of another split are refused
        json.dump({"data_seed": 0, "pool": ["x"], "test": []}, handle)
    with pytest.raises(labelling_loop.EMInputError, match="split.json"):
        loop("second").run([0])


def _curve(gain: float, seeds=(0, 1, 2), sizes=(4, 6, 8), cases=("t1", "t2", "t3")):
    """Learning curves where every later step scores ``gain`` (per seed, a number or a list) above 0.5."""
    gains = gain if isinstance(gain, list) else [gain] * len(seeds)
    return {seed: [(n, 0.0, {c: 0.5 + (g if n > sizes[0] else 0.0) + 0.01 * i for i, c in enumerate(cases)})
                   for n in sizes] for seed, g in zip(seeds, gains, strict=True)}


def test_curve_comparison_and_its_verdict():
    curves = {"fg-random": _curve(0.0), "examine": _curve(0.02), "entropy": _curve([0.02, 0.03, -0.01]),
              "random": _curve(0.02, seeds=(0, 1)), "same-picks": _curve(0.0)}
    compared = labelling_loop.compare_curves(curves)
    assert compared["same-picks"]["verdict"].startswith("no difference")  # not "the interval covers 0"
    summary = labelling_loop.summarize(curves)
    assert summary["same-picks"][8]["vs_fg-random"]["seeds_tied"] == 3
    assert summary["examine"][8]["vs_fg-random"]["seeds_won"] == 3
    assert summary["examine"][8]["vs_fg-random"]["seeds_tied"] == 0
    assert compared["examine"]["difference"][0] == pytest.approx(0.02)
    assert compared["examine"]["sizes"] == [6, 8] and compared["examine"]["seeds"] == [0, 1, 2]
    assert compared["examine"]["verdict"] == "established"
    assert compared["entropy"]["per_seed"] == pytest.approx([0.02, 0.03, -0.01])
    assert "not established" in compared["entropy"]["verdict"]
    assert "fewer than 3 seeds" in compared["random"]["verdict"]
    assert "fg-random" not in compared

    # a seed the strategy has not finished is left out, not compared on its first steps
    curves["examine"][2] = curves["examine"][2][:2]
    assert labelling_loop.compare_curves(curves)["examine"]["seeds"] == [0, 1]
    # no seed finished by both: nothing to compare
    assert "k-center" not in labelling_loop.compare_curves({**curves, "k-center": {5: _curve(0.1)[0]}})
