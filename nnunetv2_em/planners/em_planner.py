"""``-pl EMPlanner``: nnU-Net's default planning, plus what the EM loop needs."""

import os

from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunetv2_em import checks, label_conventions, storage
from nnunetv2_em.settings import PLANS_KEY, EMSettings


class EMPlanner(ExperimentPlanner):
    """Plans exactly like ``ExperimentPlanner`` and makes the dataset EM-ready.

    * The preprocessed ``dataset.json`` (which preprocessing and training read) gets nnU-Net's ignore label
      (max label + 1) when the raw one has none, so preprocessing records annotated-voxel locations and the
      trainer can mark uncertain voxels. The raw ``dataset.json`` is left as it is. The ignore label is added after
      planning, so network topology, patch and batch size are the default planner's.
    * The plans get an ``em`` block with the loop's settings (defaults; edit the plans file to change them).

    The raw dataset is checked first (labels present, label values, image/label geometry); on bad input nothing
    is planned or written by this planner. Images in imagesTr without a label (cases the cross-fold loop will
    pseudo-label) are left out of planning, and the preprocessed dataset.json lists the labelled cases explicitly
    (nnU-Net's ``dataset`` key) so that preprocessing skips them too.
    """

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlans",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        paths = checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
        raw_folder = join(paths["nnUNet_raw"], maybe_convert_to_dataset_name(dataset_name_or_id))
        self.labelled_cases = checks.check_raw_dataset(raw_folder, allow_unlabeled=True)
        plans_file = join(paths["nnUNet_preprocessed"], maybe_convert_to_dataset_name(dataset_name_or_id),
                          plans_name + ".json")
        existing = load_json(plans_file).get(PLANS_KEY) if os.path.isfile(plans_file) else None
        # replanning keeps settings a user edited into the plans (validated here, before anything is written)
        self.em_settings = EMSettings.resolve(existing, source=plans_file)
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
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


def labelled_cases_mapping(raw_folder: str, cases: dict) -> dict:
    """nnU-Net's explicit ``dataset`` entry of dataset.json (paths relative to the raw folder) for ``cases``."""
    return {case: {"images": [os.path.relpath(image, raw_folder) for image in entry["images"]],
                   "label": os.path.relpath(entry["label"], raw_folder)}
            for case, entry in sorted(cases.items())}
