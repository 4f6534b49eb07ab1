"""``nnunetv2_em``: command-line entry point. Parses arguments and dispatches; the work is done elsewhere."""

from __future__ import annotations

import argparse
import sys

from nnunetv2_em.errors import EMInputError


def _plan(args):
    from nnunetv2_em.planning import plan_and_preprocess

    name = plan_and_preprocess(args.dataset, configurations=args.configurations, num_processes=args.np)
    print(f"{name}: planned with EMPlanner and preprocessed ({', '.join(args.configurations)}).")


def _check(args):
    import os

    from nnunetv2_em.checks import check_raw_dataset
    from nnunetv2_em.planning import dataset_name

    name = dataset_name(args.dataset)
    cases = check_raw_dataset(os.path.join(os.environ["nnUNet_raw"], name))
    print(f"{name}: {len(cases)} labelled cases, labels and geometry OK.")


def _demo(args):
    from nnunetv2_em.demo import run_demo

    run_demo(args.workdir, trainer=args.trainer, configuration=args.configuration)


def _run(args):
    from nnunetv2_em.crossfold import RunOptions, run

    options = RunOptions(dataset=args.dataset, configuration=args.configuration, folds=tuple(args.folds),
                         rounds=args.rounds, trainer=args.trainer, plans=args.plans, device=args.device,
                         warm_fraction=args.warm_fraction, unlabeled=args.unlabeled,
                         validate=not args.no_validation, keep_logits=args.keep_logits, num_processes=args.np)
    state = run(options, scheduler=args.scheduler)
    print(f"\n{len(state['rounds'])} round(s) done{' (converged)' if state['converged'] else ''}; labelsTr holds "
          f"the last round's labels, the originals are in nnUNet_raw/<dataset>/em_labels/round_00.")


def _benchmark(args):
    from nnunetv2_em.benchmark import run_benchmark
    from nnunetv2_em.benchmark_report import markdown

    command = " ".join(["nnunetv2_em", "benchmark", "--dataset", args.dataset, "--noise", args.noise, "--seed",
                        str(args.seed), "--profile", args.profile, "--out", args.out])
    results = run_benchmark(args.dataset, args.noise, seed=args.seed, profile=args.profile, out=args.out,
                            command=command)
    print(markdown(results))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_em", description=__doc__.split(":", 1)[1].strip())
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="check a raw dataset, then plan (EMPlanner) and preprocess it")
    plan.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name under $nnUNet_raw")
    plan.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    plan.add_argument("-np", type=int, default=2, help="worker processes for fingerprint and preprocessing")
    plan.set_defaults(handler=_plan)

    check = commands.add_parser("check", help="check a raw dataset (labels, label values, geometry); writes nothing")
    check.add_argument("-d", "--dataset", required=True)
    check.set_defaults(handler=_check)

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
    run.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final validation of each fold")
    run.add_argument("--keep-logits", action="store_true", help="keep the out-of-fold logits of every round")
    run.add_argument("-np", type=int, default=2, help="worker processes for planning and preprocessing")
    run.set_defaults(handler=_run)

    from nnunetv2_em.benchmark import PROFILES
    from nnunetv2_em.noise import SETTINGS

    bench = commands.add_parser("benchmark", help="EM vs vanilla nnU-Net on clean data with seeded annotation noise")
    bench.add_argument("--dataset", required=True, help="path of a raw nnU-Net dataset with trusted labels")
    bench.add_argument("--noise", required=True, choices=sorted(SETTINGS),
                       help="; ".join(f"{k}: {v.description}" for k, v in SETTINGS.items()).replace("%", "%%"))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                       help="; ".join(f"{k}: {v.description}" for k, v in PROFILES.items()).replace("%", "%%"))
    bench.add_argument("--out", required=True, help="output folder (rerunning continues where it stopped)")
    bench.set_defaults(handler=_benchmark)

    demo = commands.add_parser("demo", help="the EM loop on 30 real Hippocampus MRI cases, CPU, minutes")
    demo.add_argument("--workdir", default="em_demo", help="folder for nnUNet_raw/preprocessed/results (reused)")
    demo.add_argument("--trainer", default="EMTrainer_cpu")
    demo.add_argument("--configuration", default="2d")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except EMInputError as error:
        print(f"nnunetv2_em: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
