"""A Stage-1 step with the package's own allocator tuning, with the user's export, and with neither.

Each setting runs in a fresh process (glibc reads ``MALLOC_*`` at start-up), started
from a clean environment, one after the other, alternating over ``--repeats``:

* ``command``: no ``MALLOC_*`` exported, started as the command line starts (``k2l``,
  ``python -m k2l_dist``: it restarts itself with the variables set);
* ``api``: no export, a program that imports ``k2l_dist`` (``mallopt`` at import);
* ``export``: the user's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``=16 GiB;
* ``untuned``: no export and ``K2L_MALLOC_TUNING=0``: glibc's defaults.

Each child times ``--steps`` real Stage-1 steps (``stage1_losses``, backward, RMSprop)
of the config's model on fixed in-memory pairs after two untimed ones. Medians.

    python bench/bench_allocator.py --config configs/mtfl_cpu.yaml --size 128 --pairs 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

EXPORT = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
# name → (environment, started as the command line is)
SETTINGS = {"command": ({}, True), "api": ({}, False), "export": (EXPORT, False),
            "untuned": ({"K2L_MALLOC_TUNING": "0"}, False)}


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    import k2l_dist  # noqa: F401  (first, as every entry point: the tuning happens at import)
    from k2l_dist.utils.allocator import allocator_state, restart_tuned

    if args.as_command:
        restart_tuned()  # what k2l_dist.cli.main does first: this process starts again, exported
    import torch
    from fixtures import stage1_step

    from k2l_dist.config import load_config

    torch.set_num_threads(args.threads)
    _, _, step = stage1_step(load_config(ROOT / args.config, args.overrides), args.pairs, args.size)

    def timed() -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    times = [timed() for _ in range(args.steps)]
    print(json.dumps({"median_s": statistics.median(times), "allocator": allocator_state()}))


def run_setting(args, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "K2L_MALLOC_TUNING"}
    extra, as_command = SETTINGS[name]
    env.update(extra)
    cmd = [sys.executable, __file__, "--child", *(["--as-command"] if as_command else []), "--config", args.config,
           "--size", str(args.size),
           "--pairs", str(args.pairs), "--steps", str(args.steps), "--threads", str(args.threads), *args.overrides]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mtfl_cpu.yaml")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--as-command", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--section", default="bench_allocator", help="the section of BENCHMARKS.md to (re)write")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        return child(args)
    medians: dict[str, list[float]] = {name: [] for name in SETTINGS}
    states: dict[str, str] = {}
    for _ in range(args.repeats):
        for name in SETTINGS:
            got = run_setting(args, name)
            medians[name].append(got["median_s"])
            states[name] = got["allocator"]
    step = {name: statistics.median(v) for name, v in medians.items()}
    rows = [f"| {name} | `{states[name]}` | {step[name]:.3f} | {step[name] / step['export']:.2f}× | "
            f"{', '.join(f'{t:.3f}' for t in medians[name])} |" for name in SETTINGS]
    body = "\n".join([
        f"### The allocator: the package's tuning against the user's export ({Path(args.config).stem})",
        "",
        f"`python bench/bench_allocator.py --config {args.config} --size {args.size} --pairs {args.pairs} "
        f"--steps {args.steps} --repeats {args.repeats} --threads {args.threads}`"
        f" ({datetime.now(timezone.utc):%Y-%m-%d}; {machine()}). A real Stage-1 step on fixed pairs, each setting "
        "in a fresh process, settings alternating; seconds, the median of each process's median.",
        "",
        "| setting | allocator | step (s) | vs export | per process |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", args.section, body)


if __name__ == "__main__":
    main()
