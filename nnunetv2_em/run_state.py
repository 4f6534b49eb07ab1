"""Resumable state of an EM run, one JSON file written atomically after every completed step."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2_em import storage
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.settings import EMSettings

STATE_VERSION = 1


@dataclass
class TrainerRunState:
    """What an ``EMTrainer`` run has completed: the E-steps (with their summaries) and whether it converged."""

    path: str
    settings: dict
    training_cases: list[str]
    rounds: list[dict] = field(default_factory=list)
    converged: bool = False

    @property
    def completed_rounds(self) -> int:
        return len(self.rounds)

    @classmethod
    def new(cls, path: str, settings: EMSettings, training_cases) -> TrainerRunState:
        return cls(path, settings.to_plans_block(), sorted(training_cases))

    @classmethod
    def load_or_new(cls, path: str, settings: EMSettings, training_cases) -> TrainerRunState:
        if not os.path.isfile(path):
            return cls.new(path, settings, training_cases)
        data = load_json(path)
        return cls(path, data["settings"], data["training_cases"], data["rounds"], data["converged"])

    def check_compatible(self, settings: EMSettings, training_cases) -> None:
        if self.settings != settings.to_plans_block():
            raise EMInputError(f"{self.path}: the EM settings changed since this run started ({self.settings} -> "
                               f"{settings.to_plans_block()}). Fix: restore the plans' em block, or start a fresh "
                               f"training without --c.")
        if self.training_cases != sorted(training_cases):
            raise EMInputError(f"{self.path}: the fold's training cases changed since this run started "
                               f"(splits_final.json). Fix: restore the split, or start a fresh training without --c.")

    def complete_round(self, summary: dict, *, converged: bool) -> None:
        index = summary["round"]
        self.rounds = [r for r in self.rounds if r["round"] < index] + [summary]
        self.converged = converged
        self.save()

    def save(self) -> None:
        storage.write_json(self.path, {
            "version": STATE_VERSION,
            "settings": self.settings,
            "training_cases": self.training_cases,
            "rounds": self.rounds,
            "converged": self.converged,
        })
