"""The package as a user gets it from ``pip install nnunetv2-em``: the built wheel, no extras.

The wheel is built from this checkout and installed without dependencies into a fresh venv that borrows this
environment's packages (so nothing is downloaded) with MONAI, cleanlab and pytest (the extras) hidden. Its own
console script and ``.pth`` hook then run every command's smoke path: ``--help``, ``check``, ``plan`` (nnU-Net's
planning and preprocessing through the plugin's planner), ``status``, ``restore``, ``merge``, and with tiny
trainings ``run``, ``review export`` / ``import``, ``rank-unlabeled`` and ``predict-tags``.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import NNUNET_TEST_ENV, demo_cases, make_raw_dataset

import nnunetv2_em
from nnunetv2_em.demo import DEMO_DATA

pytestmark = pytest.mark.slow

SOURCE = pathlib.Path(nnunetv2_em.__file__).parent
REPOSITORY = SOURCE.parent
EXTRAS = ("monai", "cleanlab", "pytest")  # only in the test/benchmark extras
# import name -> the runtime requirement (pyproject's dependencies) that provides it
PROVIDED_BY = {"numpy": "numpy", "scipy": "scipy", "SimpleITK": "simpleitk", "blosc2": "blosc2", "torch": "torch",
               "nnunetv2": "nnunetv2", "batchgenerators": "batchgenerators", "acvl_utils": "acvl-utils",
               "distributed": "distributed", "dask": "distributed", "yaml": "distributed",
               "dask_jobqueue": "dask-jobqueue", "matplotlib": "matplotlib", "tqdm": "tqdm",
               "dynamic_network_architectures": "nnunetv2"}
HIDE_EXTRAS = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {extras!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (an extra, not installed)")
        return None
sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPOSITORY)],
                   check=True, capture_output=True, text=True, timeout=600)
    (built,) = out.glob("nnunetv2_em-*.whl")
    return built


@pytest.fixture(scope="module")
def plain_install(wheel, tmp_path_factory) -> pathlib.Path:
    """A venv holding only the wheel; this environment's site-packages come after it, the extras hidden."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       check=True, capture_output=True, text=True).stdout.strip())
    # a plain path line: this environment's packages are importable, its .pth files (our editable install) are not
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "zz_hide_extras.py").write_text(HIDE_EXTRAS.format(extras=EXTRAS))
    (site / "zz_hide_extras.pth").write_text("import zz_hide_extras\n")
    return venv


def _source_modules() -> set[str]:
    return {str(path.relative_to(REPOSITORY)) for path in SOURCE.rglob("*.py")}


def test_the_wheel_holds_every_module_the_hook_and_the_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _source_modules() <= names
    assert "nnunetv2_em_hook.pth" in names
    demo = {str(p.relative_to(REPOSITORY)) for p in (SOURCE / "demo_data").rglob("*") if p.is_file()}
    assert demo and demo <= names


def test_every_third_party_import_of_the_product_is_a_runtime_requirement(wheel):
    metadata = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    requirements = {line.split(":", 1)[1].strip().split(";")[0].split("<")[0].split(">")[0].split("=")[0]
                    .split("!")[0].strip().lower()
                    for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert not requirements & set(EXTRAS)
    for path in SOURCE.rglob("*.py"):
        if "benchmark" in path.relative_to(SOURCE).parts:
            continue  # the benchmark's own extra (cleanlab) is imported inside it only
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "nnunetv2_em":
                    continue
                assert top in PROVIDED_BY, f"{path}: imports {top}, which no runtime requirement provides"
                assert PROVIDED_BY[top] in requirements, f"{path}: {top} needs {PROVIDED_BY[top]} in dependencies"


class PlainCLI:
    """The plain install's console script (and python) in an nnU-Net workspace of its own."""

    def __init__(self, venv: pathlib.Path, root: pathlib.Path):
        self.venv, self.root = venv, root
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "PYTHON"))},
                    **NNUNET_TEST_ENV, "nnUNet_raw": str(root / "raw"),
                    "nnUNet_preprocessed": str(root / "preprocessed"), "nnUNet_results": str(root / "results")}
        for folder in ("raw", "preprocessed", "results"):
            (root / folder).mkdir(parents=True, exist_ok=True)

    def __call__(self, *arguments, check=True, program="nnunetv2_em"):
        result = subprocess.run([str(self.venv / "bin" / program), *arguments], env=self.env, capture_output=True,
                                text=True, timeout=900)
        assert not check or result.returncode == 0, f"{arguments}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result


def test_the_plain_install_runs_the_commands_that_need_no_training(plain_install, tmp_path):
    run = PlainCLI(plain_install, tmp_path / "nnunet")
    root, env = run.root, run.env
    where = subprocess.run([str(plain_install / "bin" / "python"), "-c",
                            "import nnunetv2_em, importlib.util as u; print(nnunetv2_em.__file__); "
                            "print(u.find_spec('monai'))"], env=env, capture_output=True, text=True)
    assert str(plain_install) in where.stdout.splitlines()[0], where.stdout + where.stderr  # the wheel, not the tree
    assert "No module named 'monai'" in where.stderr
    for command in ("plan", "check", "run", "status", "restore", "merge", "fuse", "rank-unlabeled", "predict-tags",
                    "benchmark", "demo"):
        assert "usage:" in run(command, "--help").stdout
    for command in ("export", "import"):
        assert "usage:" in run("review", command, "--help").stdout

    cases = demo_cases(8)
    make_raw_dataset(str(root / "raw"), 971, cases[:4])
    make_raw_dataset(str(root / "raw"), 972, cases[4:])
    assert run("check", "-d", "971").returncode == 0
    run("plan", "-d", "971", "-c", "2d", "-np", "1")
    plans = json.loads((root / "preprocessed" / "Dataset971_Hippo" / "nnUNetPlans.json").read_text())
    assert "em" in plans and plans["experiment_planner_used"] == "EMPlanner"
    assert "never replaced by nnunetv2_em" in run("status", "-d", "971").stdout
    restored = run("restore", "-d", "971", "--round", "0", check=False)  # nothing kept: one line, the fix
    assert restored.returncode == 2 and "never replaced by nnunetv2_em" in restored.stderr
    run("merge", "-d", "971", "972", "-o", "Dataset973_Merged")
    merged = root / "raw" / "Dataset973_Merged"
    assert len(list((merged / "labelsTr").iterdir())) == 8 and (merged / "dataset.json").is_file()
    bad = run("check", "-d", "999", check=False)  # and the one-line error, not a traceback
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "Fix:" in bad.stderr
    assert not list((root / "raw").glob("Dataset999*"))


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_plain_install_runs_a_round_reviews_it_ranks_restores_and_loads_models(plain_install, tmp_path):
    """Each command's smoke path that needs a trained model: ``run`` (2 folds x 1 round, tiny), ``review export`` /
    ``import`` (edit effort through the runtime surface metrics, no MONAI), ``rank-unlabeled`` from the round's
    model, ``restore`` to the originals, and ``predict-tags`` loading that model (and refusing it: no tag head)."""
    run = PlainCLI(plain_install, tmp_path / "nnunet")
    cases = demo_cases(10)
    labelled, new = cases[:8], cases[8:]
    folder = pathlib.Path(make_raw_dataset(str(run.root / "raw"), 974, labelled))
    originals = {case: _sha(folder / "labelsTr" / f"{case}.nii.gz") for case in labelled}
    run("plan", "-d", "974", "-c", "2d", "-np", "1")
    plans_file = run.root / "preprocessed" / "Dataset974_Hippo" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["em"].update({"min_model_dice": 0.0, "mirroring": False, "max_ignored_share": 1.0,
                        "changes_without_verified_cases": True})
    plans_file.write_text(json.dumps(plans))
    run("run", "-d", "974", "-c", "2d", "--folds", "0", "1", "--rounds", "1", "--trainer", "VanillaTrainer_tiny",
        "--device", "cpu", "--no-validation", "--seed", "0")
    active = json.loads((folder / "em_labels" / "active.json").read_text())
    assert active["round"] == 1
    assert "round 1" in run("status", "-d", "974").stdout.lower()

    review = tmp_path / "review"
    run("review", "export", "-d", "974", "--top", "1", "-o", str(review))
    export = json.loads((review / "export.json").read_text())
    (case,) = export["cases"]
    with open(review / "review.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[0].update(status="accepted", reviewer="ana", minutes="2")
    with open(review / "review.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run("review", "import", str(review))
    imported = json.loads((review / "imported.json").read_text())["imported"][case]
    assert imported["effort"]["voxels_edited"] == 0 and "surface_dice_1" in imported["effort"]
    assert _sha(folder / "labelsTr" / f"{case}.nii.gz") == _sha(review / case / "proposal.nii.gz")

    images = tmp_path / "new_images"
    images.mkdir()
    for name in new:
        shutil.copy(pathlib.Path(DEMO_DATA) / "imagesTr" / f"{name}_0000.nii.gz", images)
    model = (run.root / "results" / "Dataset974_Hippo" / "em_run__VanillaTrainer_tiny__nnUNetPlans__2d" / "round_01"
             / "nnUNet_results" / "Dataset974_Hippo" / "VanillaTrainer_tiny__nnUNetPlans__2d")
    ranking = tmp_path / "to_label.csv"
    run("rank-unlabeled", "-d", "974", "--model", str(model), "--folds", "0", "1", "--images", str(images),
        "-o", str(ranking))
    ranked = json.loads(ranking.with_suffix(".json").read_text())["cases"]
    assert sorted(row["case"] for row in ranked) == sorted(new)

    run("restore", "-d", "974", "--round", "0")
    assert {c: _sha(folder / "labelsTr" / f"{c}.nii.gz") for c in labelled} == originals

    # predict-tags loads the round's model in the plain install and refuses it: a plain network has no tag head
    # (its full path, with a MultiTaskTrainer model, is tests/test_multitask_e2e.py)
    refused = run("predict-tags", "-i", str(images), "-o", str(tmp_path / "tags"), "--folds", "0", "--model",
                  str(model), check=False)
    assert refused.returncode == 2 and "has no tag head. Fix: train with -tr MultiTaskTrainer" in refused.stderr
    assert not (tmp_path / "tags").exists()
