#!/usr/bin/env bash
# Everything issue 12 asks of a GPU, in one run that fits a 15-minute GPU loan (~8-10 min on an H200):
#
#   DATA=data OUT=out benchmarks/gpu_check.sh          # DATA: a folder holding cifar10-jpeg.tar.gz (or the official archive)
#   STEPS="tests fast" benchmarks/gpu_check.sh         # a subset: tests fast air94 suite (default: all four)
#
# Writes into $OUT (default gpu-out/): env.txt, gpu_tests.txt, gpu_fast.json/.txt (5 seeds), gpu_air94.json/.txt
# (3 seeds), suite.txt; the run folders (checkpoints: megabytes each) go to $RUNS (default /tmp/cifarlab-gpu-runs),
# not into $OUT, which the device tool copies back. It runs from the checkout without installing it (PYTHONPATH=src);
# WHEELS=DIR (default .whl when it exists; benchmarks/gpu_wheels.sh fills it) first installs pytest, simplejpeg and
# the serve stack from a folder of wheels: the lent GPU machines have no internet and none of them. Each step has
# its own time limit, so one that hangs cannot eat the others' time; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUT=${OUT:-gpu-out}
STEPS=${STEPS:-tests fast air94 suite}
PY=${PY:-python}
RUNS=${RUNS:-/tmp/cifarlab-gpu-runs}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
[ -e "$DATA" ] || { echo "error: DATA=$DATA does not exist (a folder with cifar10-jpeg.tar.gz)" >&2; exit 2; }
WHEELS=${WHEELS:-$([ -d .whl ] && echo .whl)}  # benchmarks/gpu_wheels.sh fills .whl
if [ -n "$WHEELS" ]; then
  # Three installs, so that a group that cannot install (another Python) does not stop the others.
  {
    $PY -m pip install --no-index --find-links "$WHEELS" pytest pytest-xdist || echo "pytest: not installed"
    $PY -m pip install --no-index --find-links "$WHEELS" simplejpeg || echo "simplejpeg: not installed (Pillow decodes)"
    $PY -m pip install --no-index --find-links "$WHEELS" fastapi uvicorn python-multipart httpx ||
      echo "serve stack: not installed (its tests skip)"
  } >"$OUT/pip.txt" 2>&1
  grep 'not installed' "$OUT/pip.txt" || echo "wheels from $WHEELS installed ($OUT/pip.txt)"
fi
$PY -c 'import pytest' 2>/dev/null || echo "pytest is missing: the tests and suite steps will fail (benchmarks/gpu_wheels.sh, then WHEELS=.whl)"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s ($OUT/$name.txt)"
  tail -n 3 "$OUT/$name.txt"
}

# The first decode of the JPEG archive is not part of any timed run: warm the decoded-data cache.
step data 120 $PY -m cifarlab.cli data info --data-dir "$DATA"
for s in $STEPS; do
  case $s in
    tests) step gpu_tests 240 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider ;;
    fast) step gpu_fast 240 $PY benchmarks/time_to_accuracy.py --recipe fast --seeds 5 --data-dir "$DATA" \
      --runs-dir "$RUNS" --json "$OUT/gpu_fast.json" ;;
    air94) step gpu_air94 240 $PY benchmarks/time_to_accuracy.py --recipe air94 --seeds 3 --data-dir "$DATA" \
      --runs-dir "$RUNS" --json "$OUT/gpu_air94.json" ;;
    suite) step suite 420 $PY -m pytest -q -n "${WORKERS:-8}" -p no:cacheprovider ;;
    *) echo "unknown step $s (tests fast air94 suite)" >&2 ;;
  esac
done
