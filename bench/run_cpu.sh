#!/usr/bin/env bash
# Every CPU benchmark of BENCHMARKS.md, one after the other (never two heavy jobs at once:
# these machines have 2 cores). Needs the MTFL data in ../shared/data for the MTFL rows
# and prepared shards: runs/q10/shards (configs/quickstart.yaml) and runs/m11/shards
# (configs/mtfl_cpu.yaml), or pass SHARDS_Q / SHARDS_M.
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 RAY_USAGE_STATS_ENABLED=0
PY=${PY:-python}
SHARDS_Q=${SHARDS_Q:-runs/q10/shards}
SHARDS_M=${SHARDS_M:-runs/m11/shards}
only=${1:-all}
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }
want step && $PY bench/bench_step.py --config configs/celeba.yaml --size 256 --pairs 16 --precision fp32 \
  --steps 3 --repeats 3 --section bench_step_cpu model.width=296
want loop && $PY bench/bench_loop.py --config configs/quickstart.yaml --shards "$SHARDS_Q" --steps 20 --repeats 3
want loop && $PY bench/bench_loop.py --config configs/mtfl_cpu.yaml --shards "$SHARDS_M" --steps 10 --repeats 3
want clustering && $PY bench/bench_clustering.py --points 1000000 --dim 256 --repeats 3 --shards 2 --sklearn
want profile && $PY bench/profile_actor.py --points 1000000 --out BENCHMARKS.md   # needs py-spy
want memory && $PY bench/bench_rank_memory.py --counts 2000 8000
want ddp && $PY bench/bench_ddp.py --config configs/quickstart.yaml --steps 30 --repeats 3
want loader && $PY bench/bench_loader.py --batch-size 32 --threads 2 --repeats 5 --breakdown
