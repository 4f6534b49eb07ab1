"""The start-up hook: stock nnU-Net lookups find our classes, vanilla lookups are unchanged, torchvision imports."""

import os
import subprocess
import sys
import types

import pytest

from nnunetv2_em import _nnunet_hook


def _python(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def _torchvision_extension_loads_natively() -> bool:
    check = _python("import torchvision.extension as e; print(e._has_ops())", NNUNETV2_EM_DISABLE_HOOK="1")
    return check.returncode == 0 and check.stdout.strip() == "True"


def test_torchvision_imports_in_a_fresh_interpreter():
    result = _python("import torchvision, timm; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_without_the_hook_the_cpu_machine_breaks_exactly_as_documented():
    if _torchvision_extension_loads_natively():
        pytest.skip("torchvision's compiled ops load here: there is nothing to fix")
    result = _python("import torchvision", NNUNETV2_EM_DISABLE_HOOK="1")
    assert result.returncode != 0
    assert "operator torchvision::nms does not exist" in result.stderr


def test_torchvision_fix_does_nothing_where_the_extension_loads(monkeypatch):
    calls = []
    monkeypatch.setattr("torch.library.Library", lambda *args: calls.append(args))
    _nnunet_hook._define_missing_torchvision_ops(types.SimpleNamespace(_has_ops=lambda: True))
    assert calls == []


LOOKUP = """
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
cls = find({name!r})
print(cls.__module__ + '.' + cls.__name__)
"""


@pytest.mark.parametrize("name, module", [
    ("EMTrainer", "nnunetv2_em.trainers.em_trainer.EMTrainer"),
    ("EMTrainer_tiny", "nnunetv2_em.trainers.budgets.EMTrainer_tiny"),
    ("nnUNetTrainer_5epochs", "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs."
                              "nnUNetTrainer_5epochs"),
])
def test_stock_trainer_lookup_finds_plugin_and_builtin_trainers(name, module):
    result = _python(LOOKUP.format(name=name))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == module


def test_unknown_trainer_still_fails_as_in_vanilla_nnunet():
    result = _python(LOOKUP.format(name="NoSuchTrainer"))
    assert result.returncode != 0
    assert "Could not find requested nnunet trainer NoSuchTrainer" in result.stderr


def test_planner_lookup_finds_em_planner_and_leaves_default_planner_alone():
    code = """
import os, nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class as find
folder = os.path.join(nnunetv2.__path__[0], 'experiment_planning')
for name in ('EMPlanner', 'EMPlannerResEncM', 'EMPlannerResEncXL', 'ExperimentPlanner', 'nnUNetPlannerResEncM',
             'NoSuchPlanner'):
    cls = find(folder, name, current_module='nnunetv2.experiment_planning')
    print(name, None if cls is None else cls.__module__)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-6:] == [
        "EMPlanner nnunetv2_em.planners.em_planner",
        "EMPlannerResEncM nnunetv2_em.planners.em_planner",
        "EMPlannerResEncXL nnunetv2_em.planners.em_planner",
        "ExperimentPlanner nnunetv2.experiment_planning.experiment_planners.default_experiment_planner",
        "nnUNetPlannerResEncM nnunetv2.experiment_planning.experiment_planners.residual_unets."
        "residual_encoder_unet_planners",
        "NoSuchPlanner None",
    ]


def test_lookup_works_in_spawned_worker_processes(tmp_path):
    script = tmp_path / "spawned_lookup.py"
    script.write_text("""
import multiprocessing, os
def lookup(_):
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class as find
    folder = os.path.join(nnunetv2.__path__[0], 'experiment_planning')
    return find(folder, 'EMPlanner', 'nnunetv2.experiment_planning').__name__
if __name__ == '__main__':
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        print(pool.map(lookup, [0])[0])
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "EMPlanner"
