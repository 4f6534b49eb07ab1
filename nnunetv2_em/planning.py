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


def plan_and_preprocess(dataset: str | int, *, configurations=("3d_fullres",), num_processes: int = 2,
                        planner: str = "EMPlanner") -> str:
    """Same result as ``nnUNetv2_plan_and_preprocess -d D -pl <planner> -c ...`` (``EMPlanner`` or one of the ResEnc
    presets ``EMPlannerResEncM/L/XL``), but the raw dataset is checked
    before nnU-Net writes anything (the stock command extracts the fingerprint before any planner runs), and images
    in imagesTr without a label are left out (nnU-Net's own commands fail on them)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import storage
    from nnunetv2_em.planners.em_planner import EM_PLANNERS

    if planner not in EM_PLANNERS:
        raise EMInputError(f"-pl {planner}: not an EM planner. Fix: one of {', '.join(EM_PLANNERS)}.")
    name = dataset_name(dataset)
    dataset_id = int(name[len("Dataset"):len("Dataset") + 3])
    raw_folder = os.path.join(os.environ["nnUNet_raw"], name)
    labelled = checks.check_raw_dataset(raw_folder, allow_unlabeled=True)
    fingerprint_extractor = DatasetFingerprintExtractor(dataset_id, num_processes, verbose=False)
    fingerprint_extractor.dataset = {case: fingerprint_extractor.dataset[case] for case in labelled}
    fingerprint_extractor.run(overwrite_existing=True)
    _, plans_identifier = plan_experiment_dataset(dataset_id, EM_PLANNERS[planner])
    preprocessed = os.path.join(os.environ["nnUNet_preprocessed"], name)
    plans_manager = PlansManager(os.path.join(preprocessed, plans_identifier + ".json"))
    for configuration in configurations:
        configuration_manager = plans_manager.get_configuration(configuration)
        configuration_manager.preprocessor_class(verbose=False).run(dataset_id, configuration, plans_identifier,
                                                                    num_processes)
    # nnU-Net's validation reference, as preprocess_dataset copies it (labelled cases only)
    file_ending = checks.load_dataset_json(os.path.join(preprocessed, "dataset.json"))["file_ending"]
    os.makedirs(os.path.join(preprocessed, "gt_segmentations"), exist_ok=True)
    for case, entry in labelled.items():
        storage.copy_file(entry["label"], os.path.join(preprocessed, "gt_segmentations", case + file_ending))
    return name
