#!/usr/bin/env bash
# Wheels for a GPU machine without internet (run here, where PyPI is reachable), for benchmarks/gpu_check.sh:
#
#   benchmarks/gpu_wheels.sh [DIR]          # DIR defaults to .whl (git-ignored); then carry it with the data:
#   WHEELS=.whl DATA=data benchmarks/gpu_check.sh
#
# The lent GPU machines have torch, numpy, scikit-learn, matplotlib, Pillow, safetensors, PyYAML and tqdm, not
# pytest (the `gpu` tests and the suite need it), simplejpeg (a speed-up only: Pillow decodes the same pixels) or
# the serve stack (its tests skip without it). Binary wheels are fetched for CPython 3.10-3.13, since the machine's
# Python is not known in advance; pip on that machine picks its own. ~10 MB. Nothing that depends on torch is
# fetched (captum, onnxruntime: their tests skip there), so no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
PURE=(pytest pluggy iniconfig packaging pygments pytest-xdist execnet exceptiongroup tomli)
pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$DIR" "${PURE[@]}"
PLATFORM=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
for v in 3.10 3.11 3.12 3.13; do
  # simplejpeg alone: its numpy is there already (fetching it would add 16 MB per Python)
  pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$v" "${PLATFORM[@]}" \
    --no-deps -d "$DIR" simplejpeg
  pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$v" "${PLATFORM[@]}" \
    -d "$DIR" fastapi uvicorn python-multipart httpx
done
echo "$(ls "$DIR" | wc -l) wheels in $DIR ($(du -sh "$DIR" | cut -f1))"
