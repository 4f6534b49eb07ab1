#!/usr/bin/env bash
# Builds .devkit/ (ignored by git): what scripts/device_check.sh installs on a lent GPU machine, whose image has
# PyTorch, pytest and the scientific stack but not nnU-Net, its readers or Dask, and cannot reach a registry.
# Run here, with the registry reachable. The device tool carries at most 64 MiB per call, so SimpleITK (a 53 MB
# wheel) travels as an xz archive of its unpacked files (28 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.devkit
PY=${PY:-.venv/bin/python}
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$KIT/" >> .git/info/exclude; }
rm -rf "$KIT" && mkdir -p "$KIT/wheels"
# versions as installed here; --no-deps: the device image already holds the rest (torch, numpy, scipy, pandas, ...)
packages="nnunetv2 batchgenerators batchgeneratorsv2 blosc2 connected-components-3d dask distributed
          dynamic_network_architectures graphviz locket ndindex nibabel numexpr partd tblib termcolor tornado yacs zict"
pins=$($PY -m pip list --format=freeze 2>/dev/null | tr 'A-Z_' 'a-z-' \
       | grep -E "^($(echo $packages | tr 'A-Z_ ' 'a-z-|'))==")
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms="$platforms --platform $p"; done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$KIT/wheels" $pins
# acvl-utils is published as a source archive only: carry the installed pure-Python package
site=$($PY -c "import acvl_utils, os; print(os.path.dirname(os.path.dirname(acvl_utils.__file__)))")
tar cf "$KIT/acvl_utils.tar" -C "$site" acvl_utils $(cd "$site" && ls -d acvl_utils-*.dist-info)
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$tmp" "simpleitk==$($PY -c 'import SimpleITK; print(SimpleITK.__version__)')"
(mkdir "$tmp/x" && cd "$tmp/x" && unzip -q "$tmp"/simpleitk-*.whl && tar cf - . | xz -9 -T0 > "$OLDPWD/$KIT/simpleitk.tar.xz")
rm -rf "$tmp"
# the plugin itself, as a wheel of the working tree (rebuild after every change you want checked)
$PY -m pip wheel -q --no-deps --no-build-isolation . -w "$KIT/wheels" 2>/dev/null \
    || $PY -m pip wheel -q --no-deps . -w "$KIT/wheels"
du -sh "$KIT" && ls "$KIT/wheels"
