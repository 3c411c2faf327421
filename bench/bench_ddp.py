"""Training step of 1 vs 2 processes on this machine: step time, images/s, DDP's share of a step.

Each process runs the real Stage-1 step (``train.steps.stage1_losses``: both heads,
detector MSE + contrastive loss, RMSprop) of a config's model on fixed in-memory pairs
(no data loader, so only compute and communication are timed), under
``torchrun --standalone``. With 2 processes the same steps are also timed inside
``DistributedDataParallel.no_sync()`` (no gradient all-reduce); the difference is DDP's
overhead. Threads per process are pinned as ``k2l train`` pins them (cores / processes).
1 and 2 processes alternate ``--repeats`` times; medians are reported.

    python bench/bench_ddp.py [--config configs/quickstart.yaml] [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures import fixed_pairs  # noqa: E402
from report import machine, write_section  # noqa: E402


def worker(config: str, steps: int, out: Path) -> None:
    import torch

    from k2l_dist import distributed
    from k2l_dist.config import load_config
    from k2l_dist.models import KeypointNet
    from k2l_dist.training.optim import rmsprop
    from k2l_dist.training.steps import stage1_losses

    cfg = load_config(ROOT / config)
    info = distributed.enable(cfg.dist, "cpu")
    torch.manual_seed(0)
    phi = KeypointNet(cfg.model)
    ddp = distributed.wrap_ddp(phi, info)
    opt = rmsprop(phi.parameters(), lr=cfg.stage1.lr)
    b, size = cfg.augment.batch_size, cfg.augment.size or cfg.data.size
    batch, table = fixed_pairs(b, size, cfg.cluster.M, torch.device("cpu"), info.rank)
    gen = torch.Generator().manual_seed(info.rank)

    def step() -> float:
        t0 = time.perf_counter()
        losses = stage1_losses(ddp, batch, table, max_points=cfg.stage1.max_points, loss_cfg=cfg.loss, generator=gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    synced = [step() for _ in range(steps)]
    local = []
    if info.world_size > 1:
        with ddp.no_sync():
            local = [step() for _ in range(steps)]
    if info.is_main:
        out.write_text(json.dumps({"synced": synced, "local": local, "threads": info.threads,
                                   "pairs_per_rank": b, "size": size}))
    distributed.shutdown()


def run(nproc: int, config: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--config", config, "--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "17179869184",
               "MALLOC_TRIM_THRESHOLD_": "17179869184"}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    if args.worker:
        worker(args.config, args.steps, args.out)
        return 0
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for nproc in (1, 2):
            runs[nproc].append(run(nproc, args.config, args.steps))
    rows = []
    base = None
    for nproc, results in runs.items():
        step = statistics.median(t for r in results for t in r["synced"])
        images = nproc * 2 * results[0]["pairs_per_rank"] / step
        base = base or images
        overhead = "—"
        if nproc > 1:
            local = statistics.median(t for r in results for t in r["local"])
            overhead = f"{100 * (step - local) / step:.1f}% ({1000 * (step - local):.0f} ms)"
        rows.append(f"| {nproc} | {results[0]['threads']} | {results[0]['pairs_per_rank']} | {1000 * step:.0f} | "
                    f"{images:.0f} | {images / base:.2f} | {overhead} |")
    body = "\n".join([
        "## Training step: 1 vs 2 processes (DDP, gloo)",
        "",
        f"`python bench/bench_ddp.py --config {args.config} --steps {args.steps} --repeats {args.repeats}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- the real Stage-1 step of `{args.config}`'s model on fixed in-memory pairs "
        f"({runs[1][0]['size']} px, 8 pseudo-labels per image), no data loading; medians over "
        f"{args.repeats} × {args.steps} steps; 1 and 2 processes alternate",
        "- DDP overhead: the synced step minus the same step under `no_sync()` (no all-reduce), as a share of the step",
        "",
        "| processes | threads / process | pairs / rank / step | step ms | images / s | vs 1 process | DDP overhead |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    write_section(args.out, "bench_ddp", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
