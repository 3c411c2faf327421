"""Every GPU measurement of BENCHMARKS.md in one run of at most ``--budget-s`` (480 s), one JSON file.

Parts, in this order (``--parts`` picks some); each records its own seconds, and one
that fails records its error and the suite goes on:

* ``step``: the real Stage-1 step (``stage1_losses``, backward, RMSprop) of ``--config``'s
  model on fixed pairs for {fp32, bf16} × {eager, compiled (inductor)} × {contiguous,
  channels_last}: ms per step, images per second per GPU, and achieved TFLOP/s (the
  step's FLOPs counted once by ``torch.utils.flop_counter``);
* ``clustering``: one two-way round (K=30, M=100) over ``--points`` synthetic 256-d
  descriptors with Faiss on the GPU, and whether Faiss saw a GPU;
* ``dali``: DALI's GPU pipeline (decode, two augmented views) in images per second;
* ``sync``: one Stage-1 step under ``torch.cuda.set_sync_debug_mode("warn")``: the host
  syncs it makes, by source line;
* ``train``: ``k2l train configs/quickstart.yaml compile=inductor precision=bf16`` for
  ``--train-s`` seconds: whether it ran, and its logged images per second.

    bash bench/gpu_suite.sh            # installs the GPU extras, then this script
    python bench/gpu_suite.py --out gpu_suite.json [--parts step,sync]

The file holds the machine, the arguments and one entry per part; BENCHMARKS.md ("GPU
suite") says how to read it. Never part of CI: it needs a CUDA device.
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
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

PARTS = ("step", "clustering", "dali", "sync", "train")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_suite.json"), help="the JSON file written")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=480.0, help="parts not started by then are skipped")
    p.add_argument("--config", default="configs/celeba.yaml", help="the step's model")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--pairs", type=int, default=16, help="pairs per step and GPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--points", type=int, default=1_600_000, help="descriptors of the clustering round")
    p.add_argument("--images", type=int, default=2000, help="synthetic images of the DALI part")
    p.add_argument("--train-s", type=float, default=120.0, help="seconds of the k2l train part")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def run_parts(args: argparse.Namespace, parts: dict[str, Callable[[argparse.Namespace], dict]],
              clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Each asked-for part's result with its ``seconds``; ``error`` (and its traceback's
    end) for one that raised; ``skipped`` for one not started within ``--budget-s``."""
    began, out = clock(), {}
    args.deadline = began + args.budget_s  # a long part (the compiled steps) stops starting variants then
    for name in args.parts:
        if clock() - began > args.budget_s:
            out[name] = {"skipped": f"the suite's budget of {args.budget_s:g} s was spent"}
            continue
        t0 = clock()
        try:
            out[name] = dict(parts[name](args))
        except Exception as err:  # noqa: BLE001 - one broken part must not cost the others' numbers
            out[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        out[name]["seconds"] = round(clock() - t0, 1)
        print(f"{name}: {json.dumps(out[name])[:400]}", flush=True)
    return out


def write_json(path: Path, result: dict) -> None:
    """Written whole or not at all (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the parts


def _timed_steps(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``steps`` calls after 3 untimed ones (kernels, autotuning, compiling)."""
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _stage1(cfg, args, memory_format: str, backend: str) -> Callable[[str], None]:
    """The real Stage-1 step of ``cfg``'s Φ in ``memory_format``, compiled by ``backend`` if named."""
    import torch
    from fixtures import stage1_step

    return stage1_step(cfg, args.pairs, args.size, torch.device(args.device), memory_format, backend)[2]


def step_part(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from k2l_dist.config import load_config

    cfg = load_config(ROOT / args.config, [])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        _stage1(cfg, args, "contiguous", "")("fp32")
    flops = counter.get_total_flops()
    rows = []
    for backend in ("", "inductor"):
        for memory_format in ("contiguous", "channels_last"):
            step = _stage1(cfg, args, memory_format, backend)
            for precision in ("fp32", "bf16"):
                row = {"precision": precision, "compile": backend or "eager", "memory_format": memory_format}
                if time.monotonic() > getattr(args, "deadline", float("inf")):
                    rows.append({**row, "skipped": "the suite's budget was spent"})
                    continue
                seconds = _timed_steps(lambda: step(precision), args.steps, sync)
                rows.append({**row, "ms": round(1000 * seconds, 2), "images_per_s": round(2 * args.pairs / seconds, 1),
                             "tflops": float(f"{flops / seconds / 1e12:.3g}")})
    return {"config": args.config, "size": args.size, "pairs": args.pairs, "flops_per_step": flops, "rows": rows}


def clustering_part(args: argparse.Namespace) -> dict:
    import faiss
    from bench_clustering import synthetic_part

    from k2l_dist.clustering.rounds import recover
    from k2l_dist.clustering.store import PointSet
    from k2l_dist.config import ClusterConfig

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    part = synthetic_part(args.points, 256, 30)
    cfg = ClusterConfig(K=30, M=100, niter=20, use_gpu=gpus > 0)
    times = []
    for _ in range(3):  # the first pays for the GPU's resources: reported, not in the median
        t0 = time.perf_counter()
        recover("round", PointSet.from_parts([part]), cfg)
        times.append(time.perf_counter() - t0)
    return {"faiss_gpus": gpus, "points": args.points, "first_s": round(times[0], 2),
            "round_s": round(statistics.median(times[1:]), 2)}


def dali_part(args: argparse.Namespace) -> dict:
    from bench_loader import time_epochs, write_synthetic

    from k2l_dist.augment.pipeline import build_loader
    from k2l_dist.config import AugmentConfig

    with tempfile.TemporaryDirectory(prefix="k2l-gpu-suite-") as tmp:
        shards = write_synthetic(Path(tmp) / "shards", args.images, 256, per_shard=250)
        cfg = AugmentConfig(batch_size=32, num_threads=4)
        loader = build_loader(shards, cfg, device=args.device, cache_dir=Path(tmp) / "cache")
        times, n = time_epochs(lambda: loader, 3)
    return {"images_per_epoch": n, "images_per_s": round(n / statistics.median(times), 1)}


def sync_part(args: argparse.Namespace) -> dict:
    import torch

    from k2l_dist.config import load_config

    cfg = load_config(ROOT / args.config, [])
    step = _stage1(cfg, args, "contiguous", "")
    step("fp32")  # the first step's one-off work (allocations) is not what a run repeats
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step("fp32")
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message))
    return {"host_syncs": sum(where.values()), "by_line": dict(where.most_common())}


def train_part(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="k2l-gpu-suite-") as tmp:
        cmd = [sys.executable, "-m", "k2l_dist.cli", "train", str(ROOT / "configs" / "quickstart.yaml"),
               f"run_dir={tmp}/run", "compile=inductor", "precision=bf16", f"device={args.device}", "progress=false"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.train_s)
            code, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
        except subprocess.TimeoutExpired as err:  # its output comes as bytes, whatever text= said
            code = "ran past --train-s (expected)"
            tail = ((err.stdout or b"") + (err.stderr or b"")).decode(errors="replace")[-1500:]
        rates = []
        log = Path(tmp) / "run" / "log.jsonl"
        if log.is_file():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            rates = [r["stage1/images_per_second"] for r in rows if "stage1/images_per_second" in r]
    return {"exit": code, "stage1_images_per_s": rates[-5:], "output_tail": tail}


PART_FUNCTIONS = {"step": step_part, "clustering": clustering_part, "dali": dali_part, "sync": sync_part,
                  "train": train_part}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from report import machine

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = {"started": started, "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    result["parts"] = run_parts(args, PART_FUNCTIONS)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if not any("error" in r for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
