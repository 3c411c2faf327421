"""Peak memory of a training rank against the dataset's size.

A rank must hold its own slice of each round's extraction and the label table, nothing
else that grows with the dataset. This trains the same short schedule (a warm-up, one
round, a few Stage-2 steps; no evaluation) on synthetic datasets of several sizes, each in
a fresh process, and reports each process's peak RSS and its growth per 1,000 images,
beside what the per-image arrays account for.

    python bench/bench_rank_memory.py --counts 2000 8000      # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULE = ["stage1.warmup_iters=20", "stage1.rounds=1", "stage1.iters_per_round=20", "stage2.iterations=5",
            "progress=false", "log_every=10"]

CHILD = """
import json, resource, sys
from k2l_dist.config import load_config
from k2l_dist.training.run import train
cfg = load_config(sys.argv[1], sys.argv[2:])
train(cfg)
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_one(config: str, count: int, run_dir: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shards = run_dir / "shards"
    # prepared in its own process: preparation holds every image's keypoint descriptors for
    # the outlier removal, which is not the training rank's memory
    prep = subprocess.run([sys.executable, "-m", "k2l_dist", "prepare", "--config", config, "--out", str(shards),
                           f"data.synthetic_count={count}", "progress=false", *overrides],
                          capture_output=True, text=True, env=env)
    if prep.returncode != 0:
        sys.exit(f"preparing {count} images failed:\n{prep.stderr[-3000:]}")
    args = [f"run_dir={run_dir}", f"data.shards={shards}", f"data.synthetic_count={count}", *SCHEDULE, *overrides]
    out = subprocess.run([sys.executable, "-c", CHILD, config, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"training with {count} images failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    points = max((r.get("round/points", 0) for r in rows), default=0)
    training = max(r.get(k, 0.0) for r in rows for k in ("stage1/peak_rss_gb", "stage2/peak_rss_gb")) * 1e9
    meta = sum(f.stat().st_size for f in shards.glob("samples*.npz"))
    return {"count": count, "peak": training, "with_eval": result["peak_rss_bytes"], "round_points": points,
            "meta_bytes": meta}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from k2l_dist.config import load_config

    cfg = load_config(ROOT / args.config, args.overrides)
    d = cfg.model.descriptor_dim
    results = []
    with tempfile.TemporaryDirectory(prefix="k2l-mem-") as tmp:
        for count in args.counts:
            results.append(run_one(str(ROOT / args.config), count, Path(tmp) / str(count), args.overrides))
            print(results[-1], flush=True)
    base = results[0]
    lines = ["| images | peak RSS while training, GB | growth per 1,000 images, MB | with the evaluation, GB | "
             "round points | extraction arrays, MB | samples meta on disk, MB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        growth = ((r["peak"] - base["peak"]) / 1e6 / ((r["count"] - base["count"]) / 1000)
                  if r is not base else float("nan"))
        # per point: descriptor and its mirror (float32), crop point, score, ids
        extraction = r["round_points"] * (2 * d * 4 + 2 * 4 + 4 + 2 * 8) / 1e6
        lines.append(f"| {r['count']:,} | {r['peak'] / 1e9:.2f} | {growth:.1f} | {r['with_eval'] / 1e9:.2f} | "
                     f"{int(r['round_points']):,} | "
                     f"{extraction:.1f} | {r['meta_bytes'] / 1e6:.1f} |")
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    text = "\n".join([
        "", "## Training-rank memory against the dataset's size", "",
        f"`python bench/bench_rank_memory.py --counts {' '.join(map(str, args.counts))}` — {stamp}; "
        f"`{args.config}` with a short schedule ({', '.join(SCHEDULE[:4])}), one process, synthetic images.",
        "The shards are prepared in a process of their own first. "
        "Peak RSS of the training process up to the end of Stage 2 (its `stage*/peak_rss_gb` log entries; the "
        "clustering runs inline in one process, so the round's clustering arrays are in it too), then with the "
        "evaluation that follows.", "", *lines, ""])
    print(text)
    with args.out.open("a") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
