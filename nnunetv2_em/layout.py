"""Every on-disk path of a cross-fold run (``nnunetv2_em run``), in one place.

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


def unlabeled_folder(preprocessed_dataset: str, data_identifier: str) -> str:
    """Preprocessed unlabeled cases (``<case>.b2nd``, ``<case>_mask.b2nd``, ``<case>.pkl``) of one configuration."""
    return os.path.join(preprocessed_dataset, UNLABELED_FOLDER, data_identifier)
