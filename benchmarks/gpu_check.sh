#!/usr/bin/env bash
# Everything issue 12 asks of a GPU, in one run that fits a 15-minute GPU loan (~7 min on an H200):
#
#   DATA=data OUT=out benchmarks/gpu_check.sh          # DATA: a folder holding cifar10-jpeg.tar.gz (or the official archive)
#   STEPS="fast suite" benchmarks/gpu_check.sh         # a subset of: startup fast air94 warm eager autotune
#                                                      # reference profile suite tests
#   ARCHIVE=$OUT/gpu-out.tgz OUT=/tmp/gpu-out benchmarks/gpu_check.sh   # on the device tool (its $OUT expanded
#                                                      # first): everything in one file, as it brings back few files
#
# Steps (default: all but `eager`, measured in session 12, and `tests`):
#   startup    benchmarks/startup.py twice: import torch, the CUDA context, the first cuBLAS and cuDNN calls, the exit
#              (what comes before and after a run's own clock)
#   fast       5 seeds, air94: 3 seeds, as the recipes are (the step a CUDA graph), each in a fresh process
#   warm       benchmarks/warm_runs.py: air94 4 runs, fast 5 runs, each recipe's runs in one process, timed as
#              airbench94 times its runs (the first pays cuDNN's timing and kernel loading; the others are the
#              like-for-like figure against airbench94's 0.20 s per epoch and 1.95 s)
#   eager      one seed of each with cuda_graph=false (what the graph buys)
#   autotune   fast (1 seed each) without cuDNN's timing of new shapes (~0.8-1.3 s per image size of a ~3 s run),
#              without the 3/4-size first epoch (one image size: one timing), and without both
#   reference  one seed, its step replayed (op by op it took 1.5 s per epoch)
#   profile    benchmarks/gpu_profile.py on fast and air94: per-epoch and first-step times, torch.profiler tables
#   suite      the whole test suite, the `gpu` tests included, one line per test (a cut-off run still says what
#              passed); `tests` runs the `gpu` tests alone
# The timing steps come first, with the GPU to themselves.
# Writes into $OUT (default gpu-out/): env.txt, gpu_fast.json/.txt, gpu_air94.json/.txt, eager_*.json, eager.txt,
# suite.txt; the run folders (checkpoints: megabytes each) go to $RUNS (default /tmp/cifarlab-gpu-runs), not into
# $OUT, which the device tool copies back. It runs from the checkout without installing it (PYTHONPATH=src);
# WHEELS=DIR (default .whl when it exists, WHEELS= for none; benchmarks/gpu_wheels.sh fills it) first installs
# pytest, simplejpeg and the serve stack from a folder of wheels: the lent GPU machines have no internet and none of them. Each step has
# its own time limit, cut to what is left of DEADLINE (default 540 s from the start), so one that hangs cannot eat
# the others' time; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUT=${OUT:-gpu-out}
STEPS=${STEPS:-startup fast air94 warm autotune reference profile suite}
DEADLINE=${DEADLINE:-540}
PY=${PY:-python}
RUNS=${RUNS:-/tmp/cifarlab-gpu-runs}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
[ -e "$DATA" ] || { echo "error: DATA=$DATA does not exist (a folder with cifar10-jpeg.tar.gz)" >&2; exit 2; }
WHEELS=${WHEELS-$([ -d .whl ] && echo .whl)}  # benchmarks/gpu_wheels.sh fills .whl; WHEELS= installs nothing
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
  local left=$((DEADLINE - SECONDS - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -le 0 ] && { echo "$name: skipped, no time left"; return; }
  local t0=$SECONDS
  timeout "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.txt" 2>&1  # bash: COMMAND may be a function below
  echo "$name: exit $? after $((SECONDS - t0)) s ($OUT/$name.txt)"
  tail -n 3 "$OUT/$name.txt"
}

# The first decode of the JPEG archive is not part of any timed run: warm the decoded-data cache.
step data 120 $PY -m cifarlab.cli data info --data-dir "$DATA"
tta() {  # tta RECIPE SEEDS JSON [--set ...]: time-to-accuracy runs, each a fresh process
  local recipe=$1 seeds=$2 json=$3
  shift 3
  $PY benchmarks/time_to_accuracy.py --recipe "$recipe" --seeds "$seeds" --data-dir "$DATA" --runs-dir "$RUNS" \
    --json "$OUT/$json" "$@"
}
eager() {
  tta fast 1 eager_fast.json --set cuda_graph=false && tta air94 1 eager_air94.json --set cuda_graph=false
}
warm() {
  $PY benchmarks/warm_runs.py --recipe air94 --runs 4 --data-dir "$DATA" --json "$OUT/warm_air94.json" &&
    $PY benchmarks/warm_runs.py --recipe fast --runs 5 --data-dir "$DATA" --json "$OUT/warm_fast.json"
}
autotune() {  # one seed each: the time is the question (accuracy over 5 seeds if one of them is worth adopting)
  tta fast 1 autotune_off.json --set cudnn_benchmark=false
  tta fast 1 autotune_fullsize.json --set train_scales=
  tta fast 1 autotune_off_fullsize.json --set cudnn_benchmark=false --set train_scales=
}
reference() {  # the pinned Keras recipe (Adam, dropout, a validation split) replayed (op by op: 1.5 s per epoch)
  tta reference 1 gpu_reference.json
}
profile() {  # per-epoch times with the GPU drained (air94's steady epochs against airbench94's 0.20 s), profiles
  $PY benchmarks/gpu_profile.py --recipe fast --data-dir "$DATA" && $PY benchmarks/gpu_profile.py --recipe air94 --data-dir "$DATA"
}
startup() {  # twice: the first after the data step's process, the second with every file cached
  $PY benchmarks/startup.py --json "$OUT/startup_1.json" && $PY benchmarks/startup.py --json "$OUT/startup_2.json"
}
export -f tta eager warm autotune reference profile startup
export PY DATA RUNS OUT
for s in $STEPS; do
  case $s in
    startup) step startup 60 startup ;;
    fast) step gpu_fast 150 tta fast 5 gpu_fast.json ;;
    air94) step gpu_air94 150 tta air94 3 gpu_air94.json ;;
    warm) step warm 100 warm ;;
    eager) step eager 120 eager ;;
    autotune) step autotune 60 autotune ;;
    reference) step reference 60 reference ;;
    profile) step profile 100 profile ;;
    tests) step gpu_tests 240 $PY -m pytest -v -m gpu tests/test_gpu.py -p no:cacheprovider ;;
    suite) step suite 420 $PY -m pytest -v -n "${WORKERS:-12}" -p no:cacheprovider --durations=20 ;;
    *) echo "unknown step $s (startup fast air94 warm eager autotune reference profile suite tests)" >&2 ;;
  esac
done
if [ -n "${ARCHIVE:-}" ]; then
  tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "all outputs in $ARCHIVE"
fi
