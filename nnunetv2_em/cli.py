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
