"""``nnunetv2_em``: command-line entry point. Parses arguments and dispatches; the work is done elsewhere."""

from __future__ import annotations

import argparse
import errno
import sys

from nnunetv2_em.errors import EMInputError


def _plan(args):
    from nnunetv2_em.planning import plan_and_preprocess

    name = plan_and_preprocess(args.dataset, configurations=args.configurations, num_processes=args.np,
                               planner=args.planner)
    print(f"{name}: planned with {args.planner} and preprocessed ({', '.join(args.configurations)}).")


def _check(args):
    import os

    from nnunetv2_em.checks import check_raw_dataset, load_dataset_json
    from nnunetv2_em.multi_rater import load_raters
    from nnunetv2_em.planning import dataset_name
    from nnunetv2_em.storage import non_label_files

    name = dataset_name(args.dataset)
    raw = os.path.join(os.environ["nnUNet_raw"], name)
    cases = check_raw_dataset(raw)
    print(f"{name}: {len(cases)} labelled cases, labels and geometry OK.")
    rater_set = load_raters(raw, load_dataset_json(f"{raw}/dataset.json"), cases)
    if rater_set is not None:
        coverage = rater_set.coverage()
        print(f"{len(rater_set.raters)} raters ({', '.join(rater_set.raters)}) on {len(coverage)} cases, "
              f"{sum(n > 1 for n in coverage.values())} of them with several raters; their labels and geometry OK.")
    others = non_label_files(os.path.join(raw, "labelsTr"), load_dataset_json(f"{raw}/dataset.json")["file_ending"])
    if others:
        print(f"labelsTr also holds {len(others)} other file(s) or folder(s): {', '.join(others[:10])}"
              f"{' ...' if len(others) > 10 else ''} (nnU-Net ignores them; every switch of label versions keeps "
              f"them as they are)")


def _demo(args):
    from nnunetv2_em.demo import run_demo

    run_demo(args.workdir, trainer=args.trainer, configuration=args.configuration)


def _run(args):
    from nnunetv2_em.crossfold import RunOptions, run
    from nnunetv2_em.storage import version_name

    options = RunOptions(dataset=args.dataset, configuration=args.configuration, folds=tuple(args.folds),
                         rounds=args.rounds, trainer=args.trainer, plans=args.plans, device=args.device,
                         warm_fraction=args.warm_fraction, unlabeled=args.unlabeled,
                         validate=not args.no_validation, keep_logits=args.keep_logits, num_processes=args.np,
                         seed=args.seed)
    jobs = None
    if args.cluster and args.scheduler:
        raise EMInputError("--scheduler and --cluster both given. Fix: pass one (--cluster starts its own "
                           "scheduler and submits the worker jobs).")
    if args.cluster:
        from nnunetv2_em.cluster import JobOptions

        jobs = JobOptions(kind=args.cluster, jobs=args.jobs or len(options.folds), queue=args.queue,
                          account=args.account, walltime=args.walltime, memory=args.job_memory,
                          cores=args.job_cores, gpus=args.gpus_per_job, extra_directives=tuple(args.job_extra),
                          config_file=args.cluster_config, log_directory=args.job_logs)
    state = run(options, scheduler=args.scheduler, jobs=jobs)
    active = state["active"]
    print(f"\n{len(state['rounds'])} round(s) done{' (converged)' if state['converged'] else ''}; labelsTr holds "
          f"{version_name(active['run'], active['round'])}; the originals are in "
          f"nnUNet_raw/<dataset>/em_labels/round_00 (`nnunetv2_em status` / `restore`).")


def _predict_tags(args):
    from nnunetv2_em.tag_prediction import predict_tags

    predict_tags(args.model, args.input, args.output, folds=tuple(args.folds), device=args.device,
                 saliency=args.saliency)


def _dataset_folders(dataset: str) -> tuple[str, str, str]:
    import os

    from nnunetv2_em.planning import dataset_name

    name = dataset_name(dataset)
    return (os.path.join(os.environ["nnUNet_raw"], name), os.path.join(os.environ["nnUNet_preprocessed"], name),
            os.environ.get("nnUNet_results"))


def _status(args):
    import json

    from nnunetv2_em.reports import format_status
    from nnunetv2_em.storage import dataset_status

    raw, preprocessed, results = _dataset_folders(args.dataset)
    status = dataset_status(raw, preprocessed, results)
    print(json.dumps(status, indent=2) if args.json else format_status(status))


def _restore(args):
    from nnunetv2_em import checks
    from nnunetv2_em.storage import dataset_lock, restore, version_name

    raw, preprocessed, _ = _dataset_folders(args.dataset)
    checks.load_dataset_json(f"{raw}/dataset.json")
    with dataset_lock(raw, preprocessed):
        try:
            result = restore(raw, preprocessed, round_index=args.round, run=args.run)
        except ValueError as error:
            raise EMInputError(f"{error}. Fix: `nnunetv2_em status -d {args.dataset}` lists the versions "
                               f"kept.") from None
    if result["completed"]:
        done = result["completed"]
        print(f"completed an interrupted switch to {version_name(done['run'], done['round'])}")
    if result["gt_repaired"]:
        print(f"gt_segmentations: {len(result['gt_repaired'])} file(s) held labels other than the originals (nnU-Net's "
              f"planner copies labelsTr there); the originals are back")
    labels = result["labelsTr"]
    if labels["matches_active"] is None:
        print(f"labelsTr: {labels['files']} label files, never replaced by nnunetv2_em (no em_labels/): nothing to "
              f"restore.")
        return
    active = result["active"]
    done = ("preprocessed segmentations, dataset.json and splits were switched with it; " if result["activated"]
            else "")
    print(f"labelsTr holds {version_name(active['run'], active['round'])} (checksums match its manifest); {done}"
          f"gt_segmentations hold the originals.")


def _merge(args):
    from nnunetv2_em.merge import merge_datasets, parse_mapping, summary_line

    result = merge_datasets(args.datasets, args.output, mapping=parse_mapping(args.map), link=args.link,
                            prefix=args.prefix)
    print(summary_line(result, args.output))


def _fuse(args):
    from nnunetv2_em.fusion import fuse_dataset

    counts = fuse_dataset(args.dataset, args.output, method=args.method, link=args.link)
    several = sum(n > 1 for n in counts.values())
    print(f"{args.output}: {len(counts)} cases, {sum(n > 0 for n in counts.values())} fused by {args.method} "
          f"({several} from several raters); train it with the stock commands.")


def _budget(text: str) -> float:
    value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a share of the cases, e.g. 5% or 0.05")
    return value


def _review_export(args):
    from nnunetv2_em.review import export_review

    record = export_review(args.dataset, args.out, run=args.run, round_index=args.round, top=args.top,
                           budget=args.budget, cases=args.cases, audit=args.audit, seed=args.seed,
                           trainer=args.trainer, fold=args.fold, configuration=args.configuration, plans=args.plans,
                           rank_by=args.rank_by)
    where = record["run"] if record["source"] == "run" else f"{record['run']} fold {record['fold']}"
    print(f"exported {len(record['cases'])} case(s) of round {record['round']} of {where} to {args.out}: "
          f"open <case>/<case>.itksnap (ITK-SNAP) or <case>/load_in_slicer.py (3D Slicer), save reviewed"
          f"{record['file_ending']} next to the proposal, fill in review.csv, then `nnunetv2_em review import "
          f"{args.out}`.")


def _review_import(args):
    from nnunetv2_em.review import import_review
    from nnunetv2_em.storage import version_name

    summary = import_review(args.folder, reviewer=args.reviewer)
    if not summary["imported"]:
        print(f"nothing to import: no reviewed label and no 'accepted' status in {args.folder} "
              f"({len(summary['skipped'])} case(s) pending)")
        return
    version = summary["version"]
    where = (f"labelsTr holds {version_name(version['run'], version['round'])}" if version else
             "labelsTr keeps the original annotations; the reviewed labels wait in em_labels/em_review/store")
    print(f"imported {len(summary['imported'])} reviewed label(s) ({', '.join(summary['imported'])}); "
          f"{summary['total_effort']['voxels_edited']} voxels edited, {summary['total_minutes']:g} minutes; "
          f"{where}. The next round (nnunetv2_em run, or EMTrainer) trains on them and never changes them.")


def _rank_unlabeled(args):
    from nnunetv2_em.rank_unlabeled import rank_unlabeled

    if args.embeddings == "ssl" and not args.ssl_model:
        raise EMInputError("--embeddings ssl: needs --ssl-model (a folder trained with -tr MaskedPretrainTrainer). "
                           "Fix: pass it, or use --embeddings nnunet.")
    result = rank_unlabeled(args.dataset, args.model, args.out, folds=args.folds, images=args.images,
                            strategies=args.strategy, seed=args.seed, device=args.device,
                            ssl_model=args.ssl_model if args.embeddings == "ssl" else None, ssl_fold=args.ssl_fold)
    print(f"ranked {len(result['cases'])} unlabeled case(s) by {', '.join(result['strategies'])}: {args.out}")


def _benchmark(args):
    from nnunetv2_em.benchmark import suite
    from nnunetv2_em.benchmark.report import markdown

    command = " ".join(["nnunetv2_em", "benchmark", "--dataset", args.dataset, "--noise", *args.noise, "--seeds",
                        *map(str, args.seeds), "--seed", str(args.seed), "--profile", args.profile, "--out", args.out,
                        *(["--label-quality-only"] if args.label_quality_only else []),
                        *(["--verified", str(args.verified)] if args.verified else [])])
    if args.report_only:
        summary = suite.report_finished(args.out, args.noise, seeds=args.seeds, profile=args.profile,
                                        corruption_seed=args.seed, label_quality_only=args.label_quality_only,
                                        command=command)
    else:
        summary = suite.run_suite(args.dataset, args.noise, seeds=args.seeds, corruption_seed=args.seed,
                                  profile=args.profile, out=args.out, label_quality_only=args.label_quality_only,
                                  verified_cases=args.verified, command=command)
    print(markdown(summary))


def _add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="check a raw dataset, then plan (EMPlanner or a ResEnc preset) and "
                               "preprocess it")
    plan.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name under $nnUNet_raw")
    plan.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    plan.add_argument("-np", type=int, default=2, help="worker processes for fingerprint and preprocessing")
    plan.add_argument("-pl", "--planner", default="EMPlanner",
                      choices=["EMPlanner", "EMPlannerResEncM", "EMPlannerResEncL", "EMPlannerResEncXL"],
                      help="EMPlanner (nnU-Net's classic plans, nnUNetPlans) or nnU-Net's recommended residual-encoder "
                           "presets (plans nnUNetResEncUNet{M,L,XL}Plans; train with -p that name)")
    plan.set_defaults(handler=_plan)


def _add_check(commands) -> None:
    check = commands.add_parser("check", help="check a raw dataset (labels, label values, geometry); writes nothing")
    check.add_argument("-d", "--dataset", required=True)
    check.set_defaults(handler=_check)


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="cross-validated EM over a whole dataset (out-of-fold E-steps, on Dask)")
    run.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name under $nnUNet_raw")
    run.add_argument("-c", "--configuration", default="3d_fullres")
    run.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                     help="folds to train; without splits_final.json the run creates one split per fold")
    run.add_argument("--rounds", type=int, help="EM rounds (default: the plans' em.rounds)")
    run.add_argument("--trainer", default="nnUNetTrainer", help="plain nnU-Net trainer for the M-step "
                     "(VanillaTrainer_cpu on a CPU)")
    run.add_argument("--plans", default="nnUNetPlans")
    run.add_argument("--device", default="cuda", choices=["cuda", "cpu", "mps"])
    run.add_argument("--warm-fraction", type=float, default=0.5,
                     help="training budget of rounds >= 2, which start from the previous round's weights")
    run.add_argument("--unlabeled", help="folder of extra images (<case>_0000<ending>) to pseudo-label and train on")
    run.add_argument("--scheduler", help="address of an existing Dask scheduler (default: embedded LocalCluster)")
    jobs = run.add_argument_group("worker jobs on a batch system (dask-jobqueue; site defaults in "
                                  "~/.config/dask/jobqueue.yaml or --cluster-config)")
    jobs.add_argument("--cluster", choices=["slurm", "pbs", "sge"], help="run the workers as batch jobs, one "
                      "worker and one device per job; ended jobs are submitted again")
    jobs.add_argument("--jobs", type=int, help="worker jobs kept alive (default: one per fold)")
    jobs.add_argument("--queue", help="SLURM partition / PBS or SGE queue")
    jobs.add_argument("--account", help="account to charge")
    jobs.add_argument("--walltime", help="per job, e.g. 24:00:00")
    jobs.add_argument("--job-memory", help="per job, e.g. 64GB")
    jobs.add_argument("--job-cores", type=int, help="cores per job")
    jobs.add_argument("--gpus-per-job", type=int, default=0, help="SLURM --gres=gpu:N")
    jobs.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                      help="one more job directive, e.g. --job-extra=--constraint=a100 (repeatable)")
    jobs.add_argument("--cluster-config", help="YAML in dask-jobqueue's format (jobqueue: {slurm: {...}})")
    jobs.add_argument("--job-logs", help="folder of the jobs' logs (default: the run folder's cluster_logs/)")
    run.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final validation of each fold")
    run.add_argument("--keep-logits", action="store_true", help="keep the out-of-fold logits of every round")
    run.add_argument("-np", type=int, default=2, help="worker processes for planning and preprocessing")
    run.add_argument("--seed", type=int, help="train every fold repeatably with this seed (augmentation then runs "
                     "in the training process; see nnunetv2_em/seeding.py)")
    run.set_defaults(handler=_run)


def _add_status(commands) -> None:
    status = commands.add_parser("status", help="which label version labelsTr holds, kept versions, runs, checksums, "
                                 "anything unfinished; writes nothing")
    status.add_argument("-d", "--dataset", required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)


def _add_restore(commands) -> None:
    restore = commands.add_parser("restore", help="put a kept label version back into labelsTr (atomically), or "
                                  "complete an interrupted switch")
    restore.add_argument("-d", "--dataset", required=True)
    restore.add_argument("--round", type=int, help="0 = the original annotations; without it: only complete an "
                         "interrupted switch and re-check the active version")
    restore.add_argument("--run", help="run whose round to restore (default: the active run, or the only one)")
    restore.set_defaults(handler=_restore)


def _add_merge(commands) -> None:
    merge = commands.add_parser("merge", help="one nnU-Net dataset from several that annotate different structures "
                                "(labels remapped, annotated classes per case in em_weak_labels.json)")
    merge.add_argument("-d", "--datasets", required=True, nargs="+", help="two or more dataset ids or names")
    merge.add_argument("-o", "--output", required=True, help="new DatasetXXX_Name under $nnUNet_raw")
    merge.add_argument("--map", nargs="+", metavar="SOURCE:NAME=TARGET",
                       help="rename a source's label in the merged table, e.g. 951:Hippo=Anterior")
    merge.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    merge.add_argument("--prefix", action="store_true", help="prefix case ids with their source dataset's name")
    merge.set_defaults(handler=_merge)


def _add_fuse(commands) -> None:
    fuse = commands.add_parser("fuse", help="a new dataset whose labels fuse each case's raters (em_raters/): "
                               "majority vote, STAPLE or the first rater")
    fuse.add_argument("-d", "--dataset", required=True, help="dataset id or name with em_raters.json")
    fuse.add_argument("-o", "--output", required=True, help="new DatasetXXX_Name under $nnUNet_raw")
    fuse.add_argument("--method", default="staple", choices=["majority", "staple", "first"])
    fuse.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    fuse.set_defaults(handler=_fuse)


def _add_review(commands) -> None:
    review = commands.add_parser("review", help="the human review loop: export the top cases of a round for "
                                 "ITK-SNAP / 3D Slicer, import the reviewed labels (frozen, trusted)")
    review_commands = review.add_subparsers(dest="review_command", required=True)
    export = review_commands.add_parser("export", help="a folder per case: image, proposal, original, uncertainty, "
                                        "changes, ITK-SNAP workspace, 3D Slicer loader; one review.csv")
    export.add_argument("-d", "--dataset", required=True)
    export.add_argument("-o", "--out", required=True, help="new folder to write")
    export.add_argument("--run", help="the run (default: the active run, or the only one)")
    export.add_argument("--trainer", help="export a round of this EMTrainer's fold instead of a run's (with -c, "
                        "--fold, --plans)")
    export.add_argument("--fold", type=int, default=0, help="the EMTrainer fold (with --trainer). Default: 0")
    export.add_argument("-c", "--configuration", help="the EMTrainer's configuration (with --trainer)")
    export.add_argument("--plans", default="nnUNetPlans", help="the EMTrainer's plans (with --trainer)")
    export.add_argument("--round", type=int, help="the round (default: the run's last)")
    chosen = export.add_mutually_exclusive_group()
    chosen.add_argument("--top", type=int, help="the N cases with the highest review score")
    chosen.add_argument("--budget", type=_budget, help="that share of the round's labelled cases, e.g. 5%%")
    chosen.add_argument("--cases", nargs="+", help="these cases")
    export.add_argument("--audit", type=int, default=0, metavar="N",
                        help="also N cases drawn at random: the only reviewed cases the precision gate of later "
                             "rounds estimates from (ranked cases are no sample of the dataset). Default: 0")
    export.add_argument("--seed", type=int, default=0, help="seed of the audit draw (with the round number)")
    export.add_argument("--rank-by", default="review_score",
                        help="what --top and --budget take the highest of: the E-step's review score, or (a dataset "
                             "with em_raters.json) how much the case's raters disagree. Default: review_score")
    export.set_defaults(handler=_review_export)
    imported = review_commands.add_parser("import", help="check the returned labels, keep them as reviewed labels "
                                          "and activate a label version with them")
    imported.add_argument("folder", help="the exported folder, with reviewed labels in it")
    imported.add_argument("--reviewer", help="name recorded where review.csv has none")
    imported.set_defaults(handler=_review_import)


def _add_rank_unlabeled(commands) -> None:
    from nnunetv2_em.rank_unlabeled import STRATEGIES

    rank = commands.add_parser("rank-unlabeled", help="which unlabeled images to annotate next: EXAMINE on the "
                               "model's encoder embeddings, entropy, k-center, random, foreground-aware random")
    rank.add_argument("-d", "--dataset", required=True)
    rank.add_argument("--model", help="trained segmentation model folder (holds fold_<f>/), as nnUNetv2_predict -m; "
                      "needed for entropy and fg-random, and for the nnunet embeddings")
    rank.add_argument("--embeddings", choices=("nnunet", "ssl"), default="nnunet",
                      help="case embeddings from the segmentation model's encoder (nnunet) or from a self-supervised "
                           "one (ssl: masked-image pretraining, -tr MaskedPretrainTrainer; give --ssl-model)")
    rank.add_argument("--ssl-model", help="model folder of nnUNetv2_train ... -tr MaskedPretrainTrainer")
    rank.add_argument("--ssl-fold", default="all", type=lambda v: v if v == "all" else int(v))
    rank.add_argument("--folds", type=int, nargs="+", default=[0], help="folds to ensemble (embeddings: the first)")
    rank.add_argument("--images", help="a folder of unlabeled images <case>_0000<ending> besides imagesTr's")
    rank.add_argument("--strategy", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    rank.add_argument("--seed", type=int, default=0, help="seed of the random strategies")
    rank.add_argument("--device", default="cpu")
    rank.add_argument("-o", "--out", required=True, help="CSV to write (a JSON and the embeddings beside it)")
    rank.set_defaults(handler=_rank_unlabeled)


def _add_predict_tags(commands) -> None:
    tags = commands.add_parser("predict-tags", help="segmentations, presence-tag probabilities and Grad-CAM saliency "
                               "maps of a model trained with -tr MultiTaskTrainer")
    tags.add_argument("-i", "--input", required=True, help="folder of images <case>_0000<ending>")
    tags.add_argument("-o", "--output", required=True)
    tags.add_argument("--model", required=True, help="trained model folder (holds fold_<f>/), as nnUNetv2_predict -m")
    tags.add_argument("--folds", nargs="+", default=[0], type=lambda v: v if v == "all" else int(v),
                      help="folds to ensemble (or all)")
    tags.add_argument("--saliency", action="store_true", help="also write <case>_saliency_<class> maps")
    tags.add_argument("--device", default="cpu")
    tags.set_defaults(handler=_predict_tags)


def _add_benchmark(commands) -> None:
    from nnunetv2_em.benchmark.harness import PROFILES
    from nnunetv2_em.benchmark.noise import SETTINGS

    bench = commands.add_parser("benchmark", help="EM vs vanilla nnU-Net and a cleanlab peer on clean data with "
                                "seeded annotation noise: noise settings x training seeds, resumable")
    bench.add_argument("--dataset", required=True, help="path of a raw nnU-Net dataset with trusted labels")
    bench.add_argument("--noise", required=True, nargs="+", choices=sorted(SETTINGS), metavar="SETTING",
                       help="one or more of: " + "; ".join(f"{k}: {v.description}"
                                                           for k, v in SETTINGS.items()).replace("%", "%%"))
    bench.add_argument("--seeds", type=int, nargs="+", default=[0],
                       help="training seeds, each a full replicate (every training of every arm uses it; the split "
                            "and corruption stay fixed). Default: 0")
    bench.add_argument("--seed", type=int, default=0, help="split and corruption seed, the same for every replicate")
    bench.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                       help="; ".join(f"{k}: {v.description}" for k, v in PROFILES.items()).replace("%", "%%"))
    bench.add_argument("--label-quality-only", action="store_true",
                       help="only the EM run and cleanlab's filtering: training-label quality, no final trainings")
    bench.add_argument("--verified", type=int, default=0, metavar="N",
                       help="tell the EM arm that N training cases the noise left untouched were checked "
                            "(em_verified_cases.json): they are never changed and gate each round by the estimated "
                            "precision of its changes. Default: 0 (the model-Dice gate)")
    bench.add_argument("--report-only", action="store_true",
                       help="write the report from the replicates already finished (nothing is trained)")
    bench.add_argument("--out", required=True, help="output folder (rerunning continues where it stopped)")
    bench.set_defaults(handler=_benchmark)


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="the EM loop on 30 real Hippocampus MRI cases, CPU, minutes")
    demo.add_argument("--workdir", default="em_demo", help="folder for nnUNet_raw/preprocessed/results (reused)")
    demo.add_argument("--trainer", default="EMTrainer_cpu")
    demo.add_argument("--configuration", default="2d")
    demo.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_em", description=__doc__.split(":", 1)[1].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_plan, _add_check, _add_run, _add_status, _add_restore, _add_merge, _add_fuse, _add_review,
                _add_rank_unlabeled, _add_predict_tags, _add_benchmark, _add_demo):  # the order of --help
        add(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except EMInputError as error:
        print(f"nnunetv2_em: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"nnunetv2_em: error: {error.strerror}{where}. Every write is atomic, so the active labels are one "
              f"complete version (`nnunetv2_em status -d {getattr(args, 'dataset', '...')}`). Fix: free space or "
              f"grant write access, then rerun the same command (it continues where it stopped).", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
