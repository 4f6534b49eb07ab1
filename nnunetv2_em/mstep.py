"""One M-step training (one fold of one round) of the cross-fold loop, run as its own process.

``python -m nnunetv2_em.mstep`` builds the trainer exactly as ``nnUNetv2_train`` does (nnU-Net's
``get_trainer_from_args`` and ``maybe_load_checkpoint``), then optionally starts from the previous round's weights with
a shorter budget (warm start). Outputs go to ``$nnUNet_results`` in nnU-Net's layout; a ``em_mstep_done.json`` in the
fold folder marks completion. Killed and started again, it continues from nnU-Net's last checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os

DONE_MARKER = "em_mstep_done.json"


def load_full_weights(trainer, checkpoint_file: str) -> None:
    """All network weights, segmentation heads included (nnU-Net's ``-pretrained_weights`` skips the heads and
    loads without ``map_location``)."""
    import torch
    from torch._dynamo import OptimizedModule

    weights = torch.load(checkpoint_file, map_location=trainer.device, weights_only=False)["network_weights"]
    network = trainer.network._orig_mod if isinstance(trainer.network, OptimizedModule) else trainer.network
    network.load_state_dict(weights)


def train_fold(dataset: str, configuration: str, fold: int | str, trainer_name: str, plans: str, device: str, *,
               init_checkpoint: str | None = None, epoch_fraction: float = 1.0, validate: bool = True,
               seed: int | None = None) -> str:
    """Train one fold; with ``seed``, repeatably (``nnunetv2_em.seeding``: same seed, data and labels -> same
    weights), unless the training resumes from a checkpoint of a killed run."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from nnunetv2_em import storage
    from nnunetv2_em.sampling import patch_sampling
    from nnunetv2_em.seeding import seed_training
    from nnunetv2_em.settings import PLANS_KEY, EMSettings

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    if seed is not None:
        seed_training(seed)
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans, continue_training=True,
                                    device=torch.device(device))
    if epoch_fraction != 1.0:
        trainer.num_epochs = max(1, math.ceil(trainer.num_epochs * epoch_fraction))
    resumable = any(os.path.isfile(os.path.join(trainer.output_folder, name))
                    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"))
    if resumable:
        maybe_load_checkpoint(trainer, True, False)
    elif init_checkpoint:
        trainer.initialize()
        load_full_weights(trainer, init_checkpoint)
    settings = EMSettings.resolve(trainer.plans_manager.plans.get(PLANS_KEY), source=f"{plans}.json")
    with patch_sampling(settings.patch_sampling):  # the plans' em.patch_sampling, as EMTrainer honours it
        trainer.run_training()
    if validate:
        trainer.perform_actual_validation(False)
    storage.write_json(os.path.join(trainer.output_folder, DONE_MARKER),
                       {"fold": fold, "epochs": trainer.num_epochs, "warm_start": init_checkpoint, "seed": seed,
                        "repeatable": seed is not None and not resumable})
    return trainer.output_folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold", help="fold number, or 'all' (train on every case)")
    parser.add_argument("--trainer", required=True)
    parser.add_argument("--plans", default="nnUNetPlans")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--init-checkpoint")
    parser.add_argument("--epoch-fraction", type=float, default=1.0)
    parser.add_argument("--no-validation", action="store_true")
    parser.add_argument("--seed", type=int, help="train repeatably with this seed (see nnunetv2_em.seeding)")
    args = parser.parse_args(argv)
    fold = args.fold if args.fold == "all" else int(args.fold)
    train_fold(args.dataset, args.configuration, fold, args.trainer, args.plans, args.device,
               init_checkpoint=args.init_checkpoint, epoch_fraction=args.epoch_fraction,
               validate=not args.no_validation, seed=args.seed)


if __name__ == "__main__":
    main()
