"""Simulated reviewer on the benchmark's real replicates: label quality of the whole training set vs review budget.

At budgets of 0, 2, 5 and 10 % of the training cases an oracle reviews the top cases (its "correction" is the clean
label) chosen three ways: EM's ranked list (review score, what ``nnunetv2_em review export --top`` takes), cleanlab's
per-image ranking (``cleanlab.segmentation.rank.get_label_quality_scores``, soft-min of the given label's
probability, on the same probabilities) and random cases (3 draws, averaged). Then the E-step of the same round runs
as the next round would with those reviews: reviewed cases frozen at their reviewed labels, fitted as complete data,
and the precision gate's verified cases (``estep.gate_round(truth_of=)``). "review only" keeps every other case as
annotated (the review without EM). No network is retrained (the round-1 out-of-fold logits of each replicate's EM
run are reused), so the test Dice of a retrained network is not measured here.

    python scripts/simulate_review.py --suite bench_out/suite_lq --dataset ../shared/data/Dataset004_Hippocampus \\
        --out scripts/results/simulated_review.md
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_noise_models import replicates, suite_parser  # noqa: E402

from nnunetv2_em import checks, estep, label_conventions, nnunet_data, storage  # noqa: E402
from nnunetv2_em.benchmark import metrics  # noqa: E402
from nnunetv2_em.benchmark.label_files import read_label  # noqa: E402
from nnunetv2_em.estep.pipeline import ArrayCaseInputs, EStep, EStepOptions  # noqa: E402
from nnunetv2_em.settings import EMSettings  # noqa: E402

BUDGETS = (0.0, 0.02, 0.05, 0.10)
RANDOM_DRAWS = 3


def cleanlab_order(cases, noisy_of, logits_of) -> list[str]:
    """Cases from the lowest cleanlab label quality score (soft-min of the given label's probability) up."""
    from cleanlab.segmentation.rank import get_label_quality_scores

    scores = {}
    for case in cases:
        noisy, probabilities = noisy_of(case), estep.softmax(logits_of(case), 1.0).astype(np.float32)
        inside = noisy >= 0
        labels = noisy[inside].reshape(1, -1, 1)
        probs = probabilities[:, inside].reshape(1, probabilities.shape[0], -1, 1)
        scores[case] = float(get_label_quality_scores(labels, probs, method="softmin", verbose=False)[0][0])
    return sorted(cases, key=lambda case: (scores[case], case))


def estep_with_reviews(cases, reviewed, *, noisy_of, logits_of, truth_of, settings, ignore_label,
                       gate_cases=None) -> dict:
    """The round's E-step as the next round runs it after ``reviewed`` were reviewed: fit with their truths as
    complete data, gate on ``gate_cases`` (default: all reviewed), refine every other case; reviewed cases take
    their truth."""
    gate_cases = reviewed if gate_cases is None else gate_cases
    inputs = ArrayCaseInputs(logits_of, noisy_of, truth_of=lambda c: truth_of(c) if c in reviewed else None)
    step = EStep(EStepOptions.from_settings(settings), inputs, num_classes=3, ignore_label=ignore_label,
                 round_index=1)
    decision = step.fit(cases, verified=gate_cases)
    gate = decision.gate
    labels, scores = {}, {}
    for case in cases:
        if case in reviewed:
            labels[case] = truth_of(case)
            continue
        result = step.case(case, decision)
        labels[case], scores[case] = result.labels, result.scores
    return {"labels": labels, "scores": scores, "changes_allowed": bool(gate["changes_allowed"]),
            "precision_lower_bound": gate.get("lower_bound")}


def main():
    parser = suite_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=None)
    parser.add_argument("--gate-policy", choices=("audit", "all"), default="audit",
                        help="audit (the product's): the precision gate estimates only from cases drawn at random; "
                             "all: from every reviewed case (what the first version did)")
    args = parser.parse_args()
    settings = EMSettings.resolve(None, source="defaults (the product's current E-step)")
    rows = []
    for setting, seed, _, folder, benchmark in replicates(args, args.settings):
        rows += simulate_replicate(setting, seed, folder, benchmark, settings, gate_policy=args.gate_policy)
        storage.write_json(os.path.splitext(args.out)[0] + ".json", rows)
    storage.write_text(args.out, markdown(rows, " ".join(sys.argv)))


def simulate_replicate(setting, seed, folder, benchmark, settings, *, gate_policy: str) -> list[dict]:
    """The table's rows of one replicate: every budget x strategy."""
    rows = []
    with open(os.path.join(folder, "split.json")) as handle:
        cases = json.load(handle)["train"]
    with open(os.path.join(folder, "corruption", "records.json")) as handle:
        corrupted = set(json.load(handle)["corrupted_cases"])
    layout = benchmark.workspace.em_run(benchmark.profile)
    versions = benchmark.workspace.em_versions(benchmark.profile, benchmark.ending)
    plans = PlansManager(os.path.join(benchmark.workspace.preprocessed("em"), "nnUNetPlans.json"))
    configuration = plans.get_configuration(benchmark.profile.configuration)
    dataset_json = label_conventions.with_ignore_label(checks.load_dataset_json(
        os.path.join(benchmark.workspace.preprocessed("em"), "dataset.json")))
    logits = {c: np.load(layout.logits_file(1, c)).astype(np.float32) for c in cases}
    noisy = {c: versions.read_segmentation(0, c)[0] for c in cases}
    truths = {}

    def truth_of(case):
        if case not in truths:  # the clean label, preprocessed as nnU-Net would (the oracle's review)
            seg, _ = nnunet_data.preprocess_label(benchmark.cases[case]["label"], benchmark.cases[case]["images"],
                                                  plans, configuration, dataset_json)
            truths[case] = seg[0]
        return truths[case]

    def score(labels: dict) -> dict:
        per_case = {}
        for case in cases:
            noisy_raw = read_label(versions.label_path(0, case))
            raw = nnunet_data.refined_raw_label(noisy_raw, noisy[case], labels[case],
                                                load_pickle(versions.original_properties_path(case)), plans,
                                                configuration)
            per_case[case] = metrics.label_scores(read_label(benchmark.cases[case]["label"]), raw,
                                                  classes=benchmark.classes, ignore_label=benchmark.ignore_label,
                                                  annotation=noisy_raw)
        summary = metrics.summarize_groups(per_case, corrupted, classes=benchmark.classes)["all"]
        return {key: summary[key] for key in ("dice", "dice_kept", "fraction_ignored", "fraction_wrong")}

    # EM's ranked list: the review scores of the round before any review (what `review export --top` takes)
    first = estep_with_reviews(cases, set(), noisy_of=noisy.get, logits_of=logits.get, truth_of=truth_of,
                               settings=settings, ignore_label=benchmark.ignore_label)
    orders = {"EM ranking": [row["case"] for row in estep.rank_cases(first["scores"])],
              "cleanlab ranking": cleanlab_order(cases, noisy.get, logits.get)}
    rng = np.random.default_rng(1000 + seed)
    random_orders = [list(rng.permutation(cases)) for _ in range(RANDOM_DRAWS)]
    for budget in BUDGETS:
        count = math.ceil(budget * len(cases))
        strategies = ("EM ranking", "cleanlab ranking", "random") if gate_policy == "all" else \
            ("EM ranking", "EM ranking + audit", "cleanlab ranking", "random")
        for strategy in strategies:
            draws = random_orders if strategy in ("random", "EM ranking + audit") else [orders[strategy]]
            results = []
            for order in draws:
                if strategy == "EM ranking + audit":  # half the budget (rounded up) drawn at random
                    audited = math.ceil(count / 2)
                    top = orders["EM ranking"][:count - audited]
                    audit = set([c for c in order if c not in top][:audited])
                    reviewed = set(top) | audit
                else:
                    reviewed = set(order[:count])
                    audit = reviewed if strategy == "random" else set()
                with_em = estep_with_reviews(cases, reviewed, noisy_of=noisy.get, logits_of=logits.get,
                                             truth_of=truth_of, settings=settings,
                                             ignore_label=benchmark.ignore_label,
                                             gate_cases=reviewed if gate_policy == "all" else audit)
                review_only = {c: truth_of(c) if c in reviewed else noisy[c] for c in cases}
                results.append({"caught": len(reviewed & corrupted) / max(len(corrupted), 1),
                                "review + EM": score(with_em["labels"]), "review only": score(review_only),
                                "changes_allowed": with_em["changes_allowed"]})
            rows.append({"setting": setting, "seed": seed, "budget": budget, "cases_reviewed": count,
                         "gate_policy": gate_policy,
                         "strategy": strategy, "corrupted_cases": len(corrupted),
                         "caught": float(np.mean([r["caught"] for r in results])),
                         "changes_allowed": float(np.mean([r["changes_allowed"] for r in results])),
                         **{f"{arm}|{key}": float(np.mean([r[arm][key] for r in results]))
                            for arm in ("review + EM", "review only")
                            for key in ("dice_kept", "dice", "fraction_ignored", "fraction_wrong")}})
            print(json.dumps(rows[-1]), flush=True)
            if budget == 0:
                break  # nothing reviewed: the strategies agree
    return rows


def markdown(rows: list[dict], command: str) -> str:
    policy = rows[0].get("gate_policy", "all") if rows else "audit"
    lines = ["# Simulated reviewer: label quality of the whole training set vs review budget", "",
             f"`{command}`", "",
             "Oracle review (the clean label) of the top cases by each ranking; then the same round's E-step with the "
             "reviewed cases frozen and fitted as complete data, the precision gate estimated from "
             + ("every reviewed case" if policy == "all" else
                "the reviewed cases drawn at random only (`random`, the audit half of `EM ranking + audit`); without "
                "them changes become ignore")
             + " (`review + EM`), or no E-step "
             "(`review only`). Dice kept = ignored voxels scored as the annotation they replaced (the honest "
             "variant); Dice = ignored voxels left out (flattering). Means over seeds; random: 3 draws per seed. "
             "No network retrained: test Dice vs budget is not measured here.", "",
             "| noise | budget (cases) | strategy | corrupted caught | review + EM: Dice kept / Dice / ignored / wrong "
             "| review only: Dice kept / wrong | changes allowed | seeds |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["budget"], row["strategy"]), []).append(row)
    for (setting, budget, strategy), members in groups.items():
        def mean(key, members=members):
            return float(np.mean([m[key] for m in members]))
        lines.append(f"| {setting} | {budget:.0%} ({members[0]['cases_reviewed']}) | "
                     f"{'none' if budget == 0 else strategy} | {mean('caught'):.0%} | "
                     f"{mean('review + EM|dice_kept'):.4f} / {mean('review + EM|dice'):.4f} / "
                     f"{mean('review + EM|fraction_ignored'):.2%} / {mean('review + EM|fraction_wrong'):.2%} | "
                     f"{mean('review only|dice_kept'):.4f} / {mean('review only|fraction_wrong'):.2%} | "
                     f"{mean('changes_allowed'):.0%} | {len(members)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
