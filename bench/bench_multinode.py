"""A config trained as two nodes on this machine against one node with two processes.

Two nodes: two torchrun agents (``--nnodes 2``, c10d rendezvous on 127.0.0.1), each
pinned to its own core with ``taskset``, each started in its own folder with node-local
shards (``data.shards=shards data.local_shards=true``: every node prepares its own copy)
and one shared ``run_dir``. One node: ``torchrun --standalone --nproc_per_node=2`` as
the README runs it (rank 0 prepares the shards). The same config and seed; wall time of
the whole command (preparation and evaluation included) and the metrics of each run.
Run one at a time, alone on the machine.

    python bench/bench_multinode.py [--config configs/quickstart.yaml] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MALLOC_MMAP_THRESHOLD_": "17179869184",
       "MALLOC_TRIM_THRESHOLD_": "17179869184"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_node(config: Path, work: Path, overrides: list[str]) -> tuple[float, dict]:
    run_dir = work / "standalone"
    t0 = time.perf_counter()
    with open(work / "standalone.log", "w") as log:
        code = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "k2l_dist.cli", "train",
                               str(config), f"run_dir={run_dir}", "progress=false", *overrides],
                              cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if code:
        raise SystemExit(f"the one-node run failed ({code}): see {work / 'standalone.log'}")
    return seconds, json.loads((run_dir / "metrics.json").read_text())


def two_nodes(config: Path, work: Path, overrides: list[str]) -> tuple[float, dict]:
    run_dir, port = work / "two", free_port()
    cores = sorted(os.sched_getaffinity(0))
    procs, logs = [], []
    t0 = time.perf_counter()
    for node in (0, 1):
        folder = work / f"node{node}"
        folder.mkdir(exist_ok=True)
        logs.append(open(folder / "out.log", "w"))  # noqa: SIM115 - closed below
        cmd = ["taskset", "-c", str(cores[node % len(cores)]), *TORCHRUN, "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=b{port}",
               f"--rdzv-conf=is_host={int(node == 0)}", "-m", "k2l_dist.cli", "train", str(config),
               f"run_dir={run_dir}", "data.shards=shards", "data.local_shards=true", "progress=false", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=folder, env=ENV, stdout=logs[-1], stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - t0
    for log in logs:
        log.close()
    if any(codes):
        raise SystemExit(f"the two-node run failed ({codes}): see {work}/node*/out.log")
    return seconds, json.loads((run_dir / "metrics.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    p.add_argument("--work", type=Path, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="k2l-multinode-"))
    work.mkdir(parents=True, exist_ok=True)
    config = args.config.resolve()
    one_s, one = one_node(config, work, args.overrides)
    two_s, two = two_nodes(config, work, args.overrides)
    keys = ["forward_nme", "backward_nme", "stage1_forward_nme", "mean_shape_nme", "train_seconds"]
    rows = [f"| {name} | {s / 60:.1f} min | {s / one_s:.2f} | "
            + " | ".join(f"{m.get(k, float('nan')):.4g}" for k in keys) + " |"
            for name, s, m in (("one node, 2 processes (torchrun --standalone)", one_s, one),
                               ("two nodes, 1 process each (two torchrun agents)", two_s, two))]
    same = all(one.get(k) == two.get(k) for k in keys[:3])
    body = "\n".join([
        "## Two nodes on one machine vs one node",
        "",
        f"`python bench/bench_multinode.py --config {os.path.relpath(config, ROOT)}"
        f"{' ' + ' '.join(args.overrides) if args.overrides else ''}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        "- two nodes: two torchrun agents (c10d at 127.0.0.1), each pinned to one core, in its own folder, "
        "preparing its own node-local shards (`data.local_shards=true`), one shared `run_dir`; clustering "
        "`inline` (several nodes and no `RAY_ADDRESS`)",
        "- one node: `torchrun --standalone --nproc_per_node=2` as the README runs it (rank 0 prepares; "
        "clustering in the Ray actor)",
        "- wall time of the whole command: preparation, training, evaluation. Target: two nodes ≤ 1.3× one node, "
        "forward NME ≤ 0.6× the mean shape",
        "",
        "| run | wall | vs one node | forward NME | backward NME | Stage-1 forward | mean shape | train s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The same seed and one clustering algorithm for every service and layout: "
        + ("both runs end with the same metrics, to the last digit." if same else
           "the metrics differ between the runs (see the table)."),
    ])
    print(body)
    write_section(args.out, "bench_multinode", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
