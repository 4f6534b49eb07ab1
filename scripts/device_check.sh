#!/usr/bin/env bash
# The plugin on a GPU: the end-to-end tests (real nnU-Net trainings and predictions through the stock CLIs) with
# NNUNETV2_EM_TEST_DEVICE=cuda, i.e. `-device cuda` and nnU-Net's default torch.compile there. CI has no GPU and
# never runs this. On the lent GPU machine (the device tool), after scripts/make_devkit.sh here:
#   run(command="bash scripts/device_check.sh", carry=[".devkit"], timeout_s=590)
# Installs .devkit/ into the image's Python, then runs the tests under a time limit (TEST_SECONDS); the log and
# the per-test durations land in $OUT.
# Seen on an H200 (2026-11-29, torch 2.11.0+cu130 in the image, install 13 s): nnUNetv2_plan_and_preprocess with
# EMPlanner 29 s; `nnUNetv2_train ... -tr MultiTaskTrainer_tiny -device cuda` compiled, trained both epochs (58 s
# for the first, compile included; 0.12 s for the second; tag loss logged) and was validating when a 90 s command
# limit stopped it. An earlier run of the same test failed at a step whose output was lost. With compile on, each
# training and each prediction first compiles (about a minute), hence COMMAND_SECONDS' default of 300.
# 2026-11-30, COMPILE=f TEST_SECONDS=540 COMMAND_SECONDS=240: tests/test_em_trainer_e2e.py 12 passed on cuda in
# 457 s (setup 13 s); test_crossfold_e2e.py was in its first test when the 540 s ran out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
started=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .devkit/wheels/*.whl 2>&1 | tail -3
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
tar xJf .devkit/simpleitk.tar.xz -C "$site" && tar xf .devkit/acvl_utils.tar -C "$site" || exit 1
python3 - <<'PY' || exit 1
import torch, SimpleITK, nnunetv2, nnunetv2_em, distributed
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class  # noqa: F401
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| SimpleITK", SimpleITK.__version__,
      "| nnunetv2_em from", nnunetv2_em.__file__)
PY
echo "setup: $(( $(date +%s) - started )) s"
# Each command a test runs fails it after COMMAND_SECONDS with the output it had written (a hang shows where it
# stopped); each file is its own pytest run, so its failures are reported before the time limit ends the next.
# COMPILE=f skips torch.compile (about a minute per training and prediction) to fit more tests into a short lease.
export NNUNETV2_EM_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 NNUNETV2_EM_TEST_COMMAND_TIMEOUT=${COMMAND_SECONDS:-300} \
       nnUNet_compile=${COMPILE:-t}
echo "nnUNet_compile=$nnUNet_compile"
files=${TESTS:-tests/test_em_trainer_e2e.py tests/test_crossfold_e2e.py tests/test_review_e2e.py \
       tests/test_weak_labels_e2e.py tests/test_soft_targets.py tests/test_multitask_e2e.py}
deadline=$(( started + ${TEST_SECONDS:-540} ))
for file in $files; do
    left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 30 ] || { echo "not run (time): $file"; continue; }
    log="$OUT/$(basename "$file" .py).log"
    timeout "$left" python3 -m pytest -x -rfE --tb=short -p no:cacheprovider --durations=5 "$file" > "$log" 2>&1
    echo "== $file: rc $? after $(( $(date +%s) - started )) s"
    grep -E "^(FAILED|ERROR)|did not finish|Error:|error:| (passed|failed)" "$log" | cut -c1-300 | tail -12
done
echo "total: $(( $(date +%s) - started )) s"
