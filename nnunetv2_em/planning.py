"""``nnunetv2_em plan``: check the raw dataset, then nnU-Net's fingerprint, EMPlanner and preprocessing."""

from __future__ import annotations

import os

from nnunetv2_em import checks
from nnunetv2_em.errors import EMInputError


def dataset_name(dataset: str | int) -> str:
    """nnU-Net's DatasetXXX_Name for an id or name, or an error saying where it was looked for."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
    try:
        return maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    except RuntimeError:
        raise EMInputError(f"dataset {dataset} not found in nnUNet_raw={os.environ['nnUNet_raw']} (nor in "
                           f"nnUNet_preprocessed/nnUNet_results). Fix: check the id, or place the dataset at "
                           f"$nnUNet_raw/DatasetXXX_Name.") from None


def plan_and_preprocess(dataset: str | int, *, configurations=("3d_fullres",), num_processes: int = 2) -> str:
    """Same result as ``nnUNetv2_plan_and_preprocess -d D -pl EMPlanner -c ...``, but the raw dataset is checked
    before nnU-Net writes anything (the stock command extracts the fingerprint before any planner runs)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    from nnunetv2_em.planners.em_planner import EMPlanner

    name = dataset_name(dataset)
    dataset_id = int(name[len("Dataset"):len("Dataset") + 3])
    checks.check_raw_dataset(os.path.join(os.environ["nnUNet_raw"], name))
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=False, clean=True,
                                verbose=False)
    _, plans_identifier = plan_experiment_dataset(dataset_id, EMPlanner)
    preprocess_dataset(dataset_id, plans_identifier, configurations, [num_processes] * len(configurations))
    return name
