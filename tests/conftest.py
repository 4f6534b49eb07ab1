"""Shared fixtures: real Hippocampus cases (the committed demo subset) laid out as nnU-Net datasets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from nnunetv2_em.demo import DEMO_DATA

# The device the end-to-end tests train and predict on: the CPU here and in CI; NNUNETV2_EM_TEST_DEVICE=cuda runs
# the same tests on a GPU with nnU-Net's defaults there (torch.compile on unless nnUNet_compile says otherwise), see
# scripts/device_check.sh.
TEST_DEVICE = os.environ.get("NNUNETV2_EM_TEST_DEVICE", "cpu")
# small worker pools: on 2 cores nnU-Net's default of 8 processes makes validation 5-9x slower
NNUNET_TEST_ENV = {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "2",
                   "nnUNet_compile": "f" if TEST_DEVICE == "cpu" else os.environ.get("nnUNet_compile", "t")}


def make_raw_dataset(root: str, dataset_id: int, cases: list[str], name: str = "Hippo") -> str:
    """Copy real demo cases into ``root/DatasetXXX_name`` (nnU-Net raw layout); returns the dataset folder."""
    folder = os.path.join(root, f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    for case in cases:
        shutil.copy(os.path.join(DEMO_DATA, "imagesTr", f"{case}_0000.nii.gz"), os.path.join(folder, "imagesTr"))
        shutil.copy(os.path.join(DEMO_DATA, "labelsTr", f"{case}.nii.gz"), os.path.join(folder, "labelsTr"))
    with open(os.path.join(DEMO_DATA, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    dataset_json["numTraining"] = len(cases)
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(dataset_json, handle, indent=2)
    return folder


def demo_cases(count: int) -> list[str]:
    return sorted(name[:-len(".nii.gz")] for name in os.listdir(os.path.join(DEMO_DATA, "labelsTr")))[:count]


def tree_snapshot(root: str) -> dict[str, str]:
    """Every file under ``root`` (symlinks as their target) with its SHA-256: equal snapshots = nothing changed."""
    snapshot = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path):
                snapshot[relative] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as handle:
                    snapshot[relative] = hashlib.sha256(handle.read()).hexdigest()
    for folder, dirs, _ in os.walk(root):
        for name in dirs:
            snapshot.setdefault(os.path.relpath(os.path.join(folder, name), root) + "/", "dir")
    return snapshot


class NnUNetWorkspace:
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results under one folder, and a runner for the stock CLIs."""

    def __init__(self, root: str):
        self.root = root
        self.raw = os.path.join(root, "raw")
        self.preprocessed = os.path.join(root, "preprocessed")
        self.results = os.path.join(root, "results")
        for folder in (self.raw, self.preprocessed, self.results):
            os.makedirs(folder, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **NNUNET_TEST_ENV, "nnUNet_raw": self.raw, "nnUNet_preprocessed": self.preprocessed,
                "nnUNet_results": self.results}

    def run(self, *command: str, check: bool = True, env: dict | None = None, timeout: float | None = None):
        """Run a console script of this environment (the stock nnU-Net CLIs included) in a fresh process.

        A command that outlasts ``timeout`` (default NNUNETV2_EM_TEST_COMMAND_TIMEOUT, else 1800 s) fails the test
        with the output it had written, so that a hang shows where it stopped.
        """
        timeout = timeout or float(os.environ.get("NNUNETV2_EM_TEST_COMMAND_TIMEOUT", 1800))
        executable = os.path.join(os.path.dirname(sys.executable), command[0])
        try:
            result = subprocess.run([executable, *command[1:]], env=env or self.env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            raise AssertionError(f"{' '.join(command)} did not finish in {timeout:.0f} s:\n"
                                 f"{_text(expired.stdout)[-4000:]}\n{_text(expired.stderr)[-4000:]}") from None
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                                 f"{result.stderr[-4000:]}")
        return result


# the em settings that make the E-step refine even with an untrained network, so every step of a round runs
REFINE_ALWAYS = {"min_model_dice": 0.0, "mirroring": False, "max_ignored_share": 1.0,
                 "changes_without_verified_cases": True}


def update_em_plans(workspace: NnUNetWorkspace, dataset: str, settings: dict, plans: str = "nnUNetPlans") -> None:
    """Change the ``em`` block of a planned dataset's plans file."""
    plans_file = os.path.join(workspace.preprocessed, dataset, f"{plans}.json")
    with open(plans_file) as handle:
        content = json.load(handle)
    content["em"].update(settings)
    with open(plans_file, "w") as handle:
        json.dump(content, handle)


def _text(output: bytes | str | None) -> str:
    # subprocess hands back the output captured before a timeout as bytes even with text=True
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


@pytest.fixture
def workspace(tmp_path) -> NnUNetWorkspace:
    return NnUNetWorkspace(str(tmp_path))


@pytest.fixture
def nnunet_env(workspace, monkeypatch) -> NnUNetWorkspace:
    """The workspace's nnU-Net variables set in this process (for in-process API calls)."""
    for key, value in workspace.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    return workspace
