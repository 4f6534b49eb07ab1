"""Every on-disk path of a cross-fold run (``nnunetv2_em run``) and of an ``EMTrainer`` fold, in one place.

Label versions (``em_labels/``) are laid out by ``storage.DatasetLabelVersions``; this module names the rest::

    nnUNet_results/<Dataset>/em_run__<Trainer>__<Plans>__<configuration>/
        run.json                         the options of the run (a rerun must use the same)
        state.json                       per-round summaries, converged flag
        summary.json|md, plots/          the run so far: table and PNG plots per round
        round_NN/nnUNet_results/         the round's fold trainings, in nnU-Net's layout (usable with its tools)
        round_NN/logits/                 out-of-fold logits (deleted when the round completes, unless kept)
        round_NN/fit.json                temperature, T, likelihood, network-vs-annotation Dice, refusal
        round_NN/out_of_fold.json        which fold judged which case
        round_NN/cases/<case>.json       per-case scores (its presence: the case is done)
        round_NN/uncertainty/<case>.npz  1 - posterior of the proposed label, uint8 (x 255), preprocessed array
        round_NN/embeddings/<case>.npy   encoder embeddings of the unlabeled cases
        round_NN/unlabeled_ranking.csv|json   which unlabeled cases to annotate next (rank_unlabeled strategies)
        round_NN/cases.csv|json          ranked by review score;  round_NN/summary.json
        round_NN/logs/                   child-process logs and prediction specs
    nnUNet_preprocessed/<Dataset>/em_unlabeled/<data_identifier>/   unlabeled cases, preprocessed once

An ``EMTrainer`` fold (``TrainerLayout``) keeps its E-steps inside nnU-Net's output folder of the fold::

    nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>/fold_<f>/em/
        state.json, originals.json       resumable state; checksums of the originals it reads
        round_NN/labelsTr/, dataset.json the round's labels in raw geometry
        round_NN/cases.csv|json, summary.json, uncertainty/<case>.npz
        logits_cache/                    the E-step's logits while it runs
    nnUNet_preprocessed/<Dataset>/em_training_labels/<Trainer>__<Plans>__<configuration>/fold_<f>/, exchange/
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RUN_PREFIX = "em_run__"
UNLABELED_FOLDER = "em_unlabeled"


def run_name(trainer: str, plans: str, configuration: str) -> str:
    """The run's name: its folder in nnUNet_results/<Dataset> and its version folder in em_labels/."""
    return f"{RUN_PREFIX}{trainer}__{plans}__{configuration}"


def run_folder(results_root: str, dataset_name: str, name: str) -> str:
    """The folder of the run called ``name`` (see ``run_name``)."""
    return os.path.join(results_root, dataset_name, name)


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run; picklable, so Dask tasks carry it."""

    results_root: str  # nnUNet_results
    dataset_name: str
    trainer: str
    plans: str
    configuration: str

    @property
    def name(self) -> str:
        return run_name(self.trainer, self.plans, self.configuration)

    @property
    def folder(self) -> str:
        return run_folder(self.results_root, self.dataset_name, self.name)

    def file(self, name: str) -> str:
        """``run.json``, ``state.json``, ``summary.json``, ``summary.md``, ``plots``."""
        return os.path.join(self.folder, name)

    def round_folder(self, round_index: int) -> str:
        return os.path.join(self.folder, f"round_{round_index:02d}")

    def round_file(self, round_index: int, name: str) -> str:
        """``fit.json``, ``out_of_fold.json``, ``cases.json``, ``cases.csv``, ``summary.json``."""
        return os.path.join(self.round_folder(round_index), name)

    def rounds_started(self) -> list[int]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(int(name.split("_")[1]) for name in os.listdir(self.folder) if name.startswith("round_"))

    def round_results(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "nnUNet_results")

    def model_folder(self, round_index: int) -> str:
        return os.path.join(self.round_results(round_index), self.dataset_name,
                            f"{self.trainer}__{self.plans}__{self.configuration}")

    def fold_folder(self, round_index: int, fold: int) -> str:
        return os.path.join(self.model_folder(round_index), f"fold_{fold}")

    def logits_folder(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "logits")

    def logits_file(self, round_index: int, case: str) -> str:
        return os.path.join(self.logits_folder(round_index), f"{case}.npy")

    def mirrored_logits_folder(self, round_index: int) -> str:
        """Second opinions (``em.second_opinion: mirror``): out-of-fold logits of the mirrored images."""
        return os.path.join(self.round_folder(round_index), "logits_mirrored")

    def mirrored_logits_file(self, round_index: int, case: str) -> str:
        return os.path.join(self.mirrored_logits_folder(round_index), f"{case}.npy")

    def case_file(self, round_index: int, case: str) -> str:
        return os.path.join(self.round_folder(round_index), "cases", f"{case}.json")

    def uncertainty_file(self, round_index: int, case: str) -> str:
        """The proposal's uncertainty (what ``nnunetv2_em review export`` shows the reviewer)."""
        return os.path.join(self.round_folder(round_index), "uncertainty", f"{case}.npz")

    def embeddings_folder(self, round_index: int) -> str:
        """Encoder embeddings of the unlabeled cases (``<case>.npy``), for ``unlabeled_ranking.csv``."""
        return os.path.join(self.round_folder(round_index), "embeddings")

    def logs_folder(self, round_index: int) -> str:
        return os.path.join(self.round_folder(round_index), "logs")


def trainer_output_name(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's name of a trainer's output folder in nnUNet_results/<Dataset>."""
    return f"{trainer}__{plans}__{configuration}"


@dataclass(frozen=True)
class TrainerLayout:
    """Paths of one ``EMTrainer`` fold; ``fold_folder`` is nnU-Net's output folder of the fold."""

    fold_folder: str

    @classmethod
    def of(cls, results_root: str, dataset_name: str, trainer: str, plans: str, configuration: str,
           fold) -> TrainerLayout:
        return cls(os.path.join(results_root, dataset_name, trainer_output_name(trainer, plans, configuration),
                                f"fold_{fold}"))

    @property
    def em_folder(self) -> str:
        return os.path.join(self.fold_folder, "em")

    @property
    def state_file(self) -> str:
        return os.path.join(self.em_folder, "state.json")

    @property
    def originals_file(self) -> str:
        return os.path.join(self.em_folder, "originals.json")

    @property
    def logits_cache(self) -> str:
        return os.path.join(self.em_folder, "logits_cache")

    def round_folder(self, round_index: int) -> str:
        return os.path.join(self.em_folder, f"round_{round_index:02d}")

    def uncertainty_file(self, round_index: int, case: str) -> str:
        return os.path.join(self.round_folder(round_index), "uncertainty", f"{case}.npz")

    def finished_rounds(self) -> list[int]:
        """Rounds whose ranked case list was written (the last file of a round)."""
        if not os.path.isdir(self.em_folder):
            return []
        return sorted(int(name.split("_")[1]) for name in os.listdir(self.em_folder) if name.startswith("round_")
                      and os.path.isfile(os.path.join(self.em_folder, name, "cases.json")))


def _training_labels_root(preprocessed_dataset: str, output_name: str) -> str:
    return os.path.join(preprocessed_dataset, "em_training_labels", output_name)


def training_labels_folder(preprocessed_dataset: str, output_name: str, fold) -> str:
    """An ``EMTrainer`` fold's private view of the preprocessed data (``storage.TrainingLabelFolder``)."""
    return os.path.join(_training_labels_root(preprocessed_dataset, output_name), f"fold_{fold}")


def exchange_folder(preprocessed_dataset: str, output_name: str) -> str:
    """Where the folds of one ``EMTrainer`` configuration hand each other refinements (``storage.FoldExchange``)."""
    return os.path.join(_training_labels_root(preprocessed_dataset, output_name), "exchange")


RATERS_FOLDER = "em_raters"


def unlabeled_folder(preprocessed_dataset: str, data_identifier: str) -> str:
    """Preprocessed unlabeled cases (``<case>.b2nd``, ``<case>_mask.b2nd``, ``<case>.pkl``) of one configuration."""
    return os.path.join(preprocessed_dataset, UNLABELED_FOLDER, data_identifier)


def rater_segmentation_path(preprocessed_dataset: str, data_identifier: str, rater: str, case: str) -> str:
    """A rater's label of a case preprocessed for one configuration (``nnunetv2_em run`` on a multi-rater dataset)."""
    return os.path.join(preprocessed_dataset, RATERS_FOLDER, data_identifier, rater, f"{case}_seg.b2nd")
