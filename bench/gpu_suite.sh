#!/usr/bin/env bash
# The GPU suite (BENCHMARKS.md, "GPU suite"): the GPU extras, then bench/gpu_suite.py, whose
# parts stop starting after BUDGET_S seconds (default 480: the whole suite within 8 minutes
# of a lent device). Writes one JSON file: OUT (default gpu_suite.json).
#
#   bash bench/gpu_suite.sh                       # extras from the package index (EXTRA=cu13 or cu12)
#   WHEELS=.whl bash bench/gpu_suite.sh           # a machine with no network: wheels carried there
#   bash bench/gpu_suite.sh --parts step,sync     # extra arguments go to bench/gpu_suite.py
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-gpu_suite.json}
if [ -n "${WHEELS:-}" ]; then
  # offline: the carried wheels (faiss-gpu, DALI, webdataset, ...) beside the machine's own torch
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/k2l-site \
    "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/k2l-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  # faiss-cpu and faiss-gpu write the same module: never both
  "$PY" -m pip uninstall -q -y faiss-cpu 2>/dev/null || true
  "$PY" -m pip install -q -e ".[${EXTRA:-cu13}]"
fi
exec "$PY" bench/gpu_suite.py --out "$OUT" --budget-s "${BUDGET_S:-480}" "$@"
