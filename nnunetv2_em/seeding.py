"""Seeded, repeatable nnU-Net trainings: what a comparison of arms that differ only by their labels needs.

Two trainings of the same trainer on the same data with the same seed give identical weights on CPU (tested in
``tests/test_seeded_training.py``). What is fixed, and why each is needed:

- python's ``random``, numpy's global generator and torch's generators: network initialisation, nnU-Net's patch
  sampling (``np.random`` in its data loader) and batchgeneratorsv2's augmentations (numpy and torch);
- data augmentation runs in the training process (``nnUNet_n_proc_DA=0``): nnU-Net's ``NonDetMultiThreadedAugmenter``
  gives its workers no seeds and hands out batches in whatever order they finish, so no seed can fix it;
- torch's deterministic kernels (``use_deterministic_algorithms``), which matter on GPUs.

Not covered: a training resumed from a checkpoint (nnU-Net does not store the generators' states, so the resumed
part draws other numbers), and GPU kernels without a deterministic implementation (torch warns about them).
"""

from __future__ import annotations

import os
import random


def seed_training(seed: int) -> None:
    """Fix everything random in an nnU-Net training that runs in this process; call before building the trainer."""
    import numpy as np
    import torch

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    os.environ["nnUNet_n_proc_DA"] = "0"  # read by nnU-Net when it builds its data loaders
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    torch.use_deterministic_algorithms(True, warn_only=True)
