"""``-pl EMPlanner`` (and ``EMPlannerResEncM/L/XL``): nnU-Net's planning, plus what the EM loop needs."""

import inspect
import os

from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL,
    nnUNetPlannerResEncM,
    nnUNetPlannerResEncXL,
)
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunetv2_em import checks, label_conventions, storage
from nnunetv2_em.settings import PLANS_KEY, EMSettings


class EMPlanning:
    """What every EM planner adds to the nnU-Net planner after it in the MRO (the default one or a ResEnc preset),
    which otherwise plans exactly as it would:

    * The preprocessed ``dataset.json`` (which preprocessing and training read) gets nnU-Net's ignore label
      (max label + 1) when the raw one has none, so preprocessing records annotated-voxel locations and the
      trainer can mark uncertain voxels. The raw ``dataset.json`` is left as it is. The ignore label is added after
      planning, so network topology, patch and batch size are the nnU-Net planner's.
    * The plans get an ``em`` block with the loop's settings (defaults; edit the plans file to change them).

    The raw dataset is checked first (labels present, label values, image/label geometry); on bad input nothing
    is planned or written by this planner. Images in imagesTr without a label (cases the cross-fold loop will
    pseudo-label) are left out of planning, and the preprocessed dataset.json lists the labelled cases explicitly
    (nnU-Net's ``dataset`` key) so that preprocessing skips them too.
    """

    def __init__(self, dataset_name_or_id, *args, **kwargs):
        planner_init = super().__init__
        arguments = inspect.signature(planner_init).bind(dataset_name_or_id, *args, **kwargs)
        arguments.apply_defaults()  # the nnU-Net planner's own defaults: plans name, GPU memory target
        paths = checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
        raw_folder = join(paths["nnUNet_raw"], maybe_convert_to_dataset_name(dataset_name_or_id))
        self.labelled_cases = checks.check_raw_dataset(raw_folder, allow_unlabeled=True)
        plans_file = join(paths["nnUNet_preprocessed"], maybe_convert_to_dataset_name(dataset_name_or_id),
                          arguments.arguments["plans_name"] + ".json")
        existing = load_json(plans_file).get(PLANS_KEY) if os.path.isfile(plans_file) else None
        # replanning keeps settings a user edited into the plans (validated here, before anything is written)
        self.em_settings = EMSettings.resolve(existing, source=plans_file)
        planner_init(*arguments.args, **arguments.kwargs)
        self.dataset = {case: self.dataset[case] for case in self.labelled_cases}

    def save_plans(self, plans):
        plans[PLANS_KEY] = self.em_settings.to_plans_block()
        super().save_plans(plans)

    def plan_experiment(self):
        plans = super().plan_experiment()
        preprocessed_json = join(os.environ["nnUNet_preprocessed"], self.dataset_name, "dataset.json")
        dataset_json = label_conventions.with_ignore_label(load_json(preprocessed_json))
        if len(self.labelled_cases) < len(get_filenames_of_train_images_and_targets(self.raw_dataset_folder,
                                                                                      load_json(preprocessed_json))):
            # images without labels wait in imagesTr for pseudo-labels: preprocessing must skip them
            dataset_json["dataset"] = labelled_cases_mapping(self.raw_dataset_folder, self.labelled_cases)
        storage.write_json(preprocessed_json, dataset_json)
        return plans


class EMPlanner(EMPlanning, ExperimentPlanner):
    """``-pl EMPlanner``: nnU-Net's classic default planner (plans ``nnUNetPlans``), EM-ready."""


class EMPlannerResEncM(EMPlanning, nnUNetPlannerResEncM):
    """``-pl EMPlannerResEncM``: nnU-Net's recommended ResEnc M preset (plans ``nnUNetResEncUNetMPlans``, 9-11 GB
    of GPU memory), EM-ready."""


class EMPlannerResEncL(EMPlanning, nnUNetPlannerResEncL):
    """``-pl EMPlannerResEncL``: the ResEnc L preset (plans ``nnUNetResEncUNetLPlans``, 24 GB), EM-ready."""


class EMPlannerResEncXL(EMPlanning, nnUNetPlannerResEncXL):
    """``-pl EMPlannerResEncXL``: the ResEnc XL preset (plans ``nnUNetResEncUNetXLPlans``, 40 GB), EM-ready."""


EM_PLANNERS = {cls.__name__: cls for cls in (EMPlanner, EMPlannerResEncM, EMPlannerResEncL, EMPlannerResEncXL)}


def labelled_cases_mapping(raw_folder: str, cases: dict) -> dict:
    """nnU-Net's explicit ``dataset`` entry of dataset.json (paths relative to the raw folder) for ``cases``."""
    return {case: {"images": [os.path.relpath(image, raw_folder) for image in entry["images"]],
                   "label": os.path.relpath(entry["label"], raw_folder)}
            for case, entry in sorted(cases.items())}
