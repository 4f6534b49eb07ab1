"""Small EMTrainer variants, picked with ``-tr`` like nnU-Net's own ``nnUNetTrainer_Xepochs``."""

import torch

from nnunetv2_em.trainers.em_trainer import EMTrainer


class EMTrainer_tiny(EMTrainer):
    """Smoke-test budget: 2 rounds x 1 epoch x 5 iterations, batch <= 2, E-step without mirroring.

    Runs in a few minutes on a 2-core CPU; it checks the machinery, it does not train a useful model.
    """

    em_overrides = {"rounds": 2, "epochs_per_round": 1, "mirroring": False}
    max_batch_size = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 2
