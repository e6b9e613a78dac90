#!/usr/bin/env bash
# Copy a finished run's report into docs/example-report/ (the example linked from the README).
#
#   benchmarks/make_example_report.sh RUN_DIR [DEST]      (DEST defaults to docs/example-report)
#
# Set REBUILD=1 to rebuild the report first (`cifarlab report RUN_DIR`, data from $CIFARLAB_DATA or
# ../shared/data). report.md links plots/*.png, which are copied beside it; report.html (self-contained, its
# images embedded: over 2 MB with the "why" galleries) is checked but not copied.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=${1:?usage: $0 RUN_DIR [DEST]}
dest=${2:-docs/example-report}
[ -f "$run_dir/config.json" ] || { echo "error: $run_dir is not a run folder (no config.json)" >&2; exit 2; }
if [ "${REBUILD:-0}" = 1 ] || [ ! -f "$run_dir/report.html" ]; then
  data=${CIFARLAB_DATA:-../shared/data}
  .venv/bin/cifarlab report "$run_dir" --data-dir "$data"
fi
rm -rf "$dest"
mkdir -p "$dest/plots"
cp "$run_dir/report.md" "$run_dir/metrics.json" "$run_dir/config.json" "$dest/"
cp "$run_dir/history.json" "$run_dir/eval_corruptions.json" "$dest/" 2>/dev/null || true
cp "$run_dir"/plots/*.png "$dest/plots/"
# No external references may slip into the committed example.
if grep -Eq 'https?://|<script|<link' "$run_dir/report.html"; then
  echo "error: $run_dir/report.html has external references" >&2
  exit 1
fi
echo "example report: $dest/report.md ($(du -sh "$dest" | cut -f1)), from $run_dir"
