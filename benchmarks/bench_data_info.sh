#!/usr/bin/env bash
# Time `cifarlab data info` on the shared CIFAR-10 copy once its decoded arrays are cached.
#
#   benchmarks/bench_data_info.sh [DATA_DIR] [RUNS]      # defaults: ../shared/data, 5
#
# The first (untimed) run fills the cache if needed: decoding 60,000 JPEGs takes ~30 s. The shared folder is
# read-only, so the cache goes to $CIFARLAB_CACHE or ~/.cache/cifarlab. Then RUNS timed runs of the whole
# command (Python start, imports, MD5 of the archive, cache load, class counts, pixel statistics);
# prints each wall time and the median. Target: < 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
RUNS=${2:-5}
CIFARLAB=${CIFARLAB:-.venv/bin/cifarlab}

echo "warm-up (fills the cache on first use): $CIFARLAB data info --data-dir $DATA_DIR" >&2
start=$(date +%s.%N)
"$CIFARLAB" data info --data-dir "$DATA_DIR" >/dev/null
echo "warm-up took $(echo "$(date +%s.%N) - $start" | bc) s" >&2

times=()
for i in $(seq "$RUNS"); do
  start=$(date +%s.%N)
  "$CIFARLAB" data info --data-dir "$DATA_DIR" >/dev/null 2>&1
  t=$(echo "$(date +%s.%N) - $start" | bc)
  times+=("$t")
  printf 'run %d: %.2f s\n' "$i" "$t"
done
median=$(printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
printf 'cifarlab data info (cached), median of %d: %.2f s\n' "$RUNS" "$median"
