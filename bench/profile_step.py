"""Where a training step's time goes: torch.profiler over Φ's Stage-1 step, summarised.

One warm-up step, then ``--steps`` profiled steps of the real Stage-1 step (forward,
losses, backward, RMSprop) on fixed in-memory pairs; the table lists the operators with
the most self CPU time, and the model's FLOPs per image (torch's flop counter) give the
achieved GFLOP/s.

    python bench/profile_step.py --config configs/celeba.yaml --size 256 --pairs 16 model.width=296
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from fixtures import stage1_step  # noqa: E402
from report import machine, write_section  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/celeba.yaml")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--official", type=Path, help="a checkout of the paper's official code: its FAN's forward + "
                                                 "backward + RMSprop profiled too, operator by operator")
    p.add_argument("--section", default="profile_step")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from k2l_dist.config import load_config
    from k2l_dist.distributed.threads import pin_threads
    from k2l_dist.models import count_parameters

    threads = pin_threads()
    cfg = load_config(ROOT / args.config, args.overrides)
    phi, batch, step = stage1_step(cfg, args.pairs, args.size)

    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        phi(batch["view0"][:1])
    gflop_image = flops.get_total_flops() / 1e9
    seconds, ours = _profiled(step, args.steps)
    keys = sorted(ours, key=lambda k: -ours[k][0])[:args.rows]
    header = ["| operator | self CPU ms per step | share | calls per step |", "|---|---|---|---|"]
    total = sum(v[0] for v in ours.values())
    rows = [f"| `{k}` | {ours[k][0] / 1e3 / args.steps:.0f} | {100 * ours[k][0] / total:.1f}% "
            f"| {ours[k][1] // args.steps} |" for k in keys]
    if args.official:  # the same images through the official FAN, the operators side by side
        from bench_step import official_limit

        images = torch.cat([batch["view0"], batch["view1"]])
        official = official_limit(args.official, cfg, images.device, images)["limit"]
        theirs_seconds, theirs = _profiled(lambda: official("fp32"), args.steps)
        keys = sorted(set(ours) | set(theirs), key=lambda k: -max(ours.get(k, (0, 0))[0], theirs.get(k, (0, 0))[0]))
        header = [f"| operator | ours, self CPU ms per step ({seconds:.1f} s a step) | official FAN's "
                  f"({theirs_seconds:.1f} s a step) | ours − official, ms | calls: ours / official |",
                  "|---|---|---|---|---|"]
        rows = [f"| `{k}` | {ours.get(k, (0, 0))[0] / 1e3 / args.steps:.0f} | "
                f"{theirs.get(k, (0, 0))[0] / 1e3 / args.steps:.0f} | "
                f"{(ours.get(k, (0, 0))[0] - theirs.get(k, (0, 0))[0]) / 1e3 / args.steps:+.0f} | "
                f"{ours.get(k, (0, 0))[1] // args.steps} / {theirs.get(k, (0, 0))[1] // args.steps} |"
                for k in keys[:args.rows]]
    images = 2 * args.pairs
    achieved = 3 * gflop_image * images / seconds  # forward + backward ≈ 3 × forward
    body = "\n".join([
        f"## Profile of a Stage-1 step: {cfg.model.width} channels, {args.size} px",
        "",
        f"`python bench/profile_step.py --config {args.config} --size {args.size} --pairs {args.pairs} "
        f"{' '.join(args.overrides)}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- Φ {count_parameters(phi) / 1e6:.2f} M parameters (width {cfg.model.width}, depth {cfg.model.depth}, "
        f"GroupNorm groups {cfg.model.groups}), {gflop_image:.1f} GFLOP per image forward, {images} images per "
        f"step (forward + backward ≈ 3 × forward), {threads} threads",
        f"- {args.steps} profiled step(s) under torch.profiler: {seconds:.1f} s per step, "
        f"{achieved:.0f} GFLOP/s achieved",
        "",
        *header,
        *rows,
    ])
    print(body)
    if args.out.name:
        write_section(args.out, args.section, body)
    return 0


def _profiled(step, steps: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """Seconds per step and, per operator, (self CPU µs, calls) over ``steps`` profiled steps
    after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - t0) / steps
    return seconds, {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}


if __name__ == "__main__":
    sys.exit(main())
