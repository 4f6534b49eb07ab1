"""What a cross-fold run is: the options that define it, and the resolved facts its tasks share."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from nnunetv2_em import storage
from nnunetv2_em.layout import RunLayout, rater_segmentation_path, unlabeled_folder
from nnunetv2_em.settings import EMSettings


@dataclass(frozen=True)
class RunOptions:
    dataset: str
    configuration: str = "3d_fullres"
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rounds: int | None = None  # default: the plans' em.rounds
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    device: str = "cuda"
    warm_fraction: float = 0.5  # budget of rounds >= 2, relative to the trainer's, started from the last weights
    unlabeled: str | None = None  # folder of extra images (<case>_0000<ending>) to pseudo-label
    validate: bool = True  # nnU-Net's final validation of each fold (needed by its find_best_configuration)
    keep_logits: bool = False
    num_processes: int = 2  # planning / preprocessing workers
    seed: int | None = None  # every fold training repeatable with this seed (nnunetv2_em.seeding)

    def identity(self) -> dict:
        """What a rerun must repeat to continue this run (the rest may change between invocations)."""
        identity = {key: value for key, value in dataclasses.asdict(self).items()
                    if key in ("configuration", "folds", "trainer", "plans", "warm_fraction", "unlabeled")}
        if self.seed is not None:  # absent when unseeded, so runs started before seeds existed still continue
            identity["seed"] = self.seed
        return identity


@dataclass(frozen=True)
class RunContext:
    """Resolved paths and nnU-Net facts shared by the driver and the tasks (picklable)."""

    dataset_name: str
    raw: str
    preprocessed: str
    data_identifier: str
    file_ending: str
    layout: RunLayout
    options: RunOptions
    settings: dict  # EMSettings.to_plans_block()
    constraints: tuple = ()  # (case, CaseConstraints in raw voxels) of em_weak_labels.json
    raters: tuple = ()  # a multi-rater dataset: ((rater, ((case, raw label file), ...)), ...) in em_raters.json order

    @property
    def em(self) -> EMSettings:
        return EMSettings.resolve(self.settings, source="run")

    def versions(self) -> storage.DatasetLabelVersions:
        return storage.DatasetLabelVersions(self.raw, self.preprocessed, self.data_identifier, self.file_ending,
                                            run=self.layout.name)

    def reviewed_labels(self) -> storage.ReviewedLabels:
        return storage.ReviewedLabels(self.raw, self.preprocessed, self.file_ending)

    def case_constraints(self, case: str):
        """The case's weak / partial labels (``CaseConstraints``, raw voxels), or None."""
        return dict(self.constraints).get(case)

    def rater_names(self) -> tuple[str, ...]:
        return tuple(rater for rater, _ in self.raters)

    def rater_files(self, case: str) -> dict[str, str]:
        """``{rater: raw label file}`` of the raters who annotated ``case``."""
        return {rater: dict(files)[case] for rater, files in self.raters if case in dict(files)}

    def rater_segmentation(self, rater: str, case: str) -> str:
        return rater_segmentation_path(self.preprocessed, self.data_identifier, rater, case)

    def unlabeled_folder(self) -> str:
        return unlabeled_folder(self.preprocessed, self.data_identifier)

    def plans_file(self) -> str:
        return os.path.join(self.preprocessed, self.options.plans + ".json")
