"""Where a clustering round's time goes, inline and inside the Ray actor: py-spy samples
(native frames included) of the same round in both places, summarised by function.

    python bench/profile_actor.py --points 1000000        # about 3 minutes, ~10 GB of memory

Needs ``py-spy`` (``pip install py-spy``) and permission to attach to a process
(root, or ``kernel.yama.ptrace_scope=0``). Prints the two tables; ``--out`` appends them
to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_clustering import add_round_args, round_config, synthetic_part  # noqa: E402


def record(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling ``pid`` (every thread, native frames, idle threads left out) into ``out``;
    native frames need it to pause the process at each sample (a few percent slower)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--native", "--rate", "50", "--format", "raw",
                             "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def leaf_name(frame: str) -> str:
    """``func (file.py:12)`` → ``func (file.py)``; native frames keep their library."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name


def summarise(path: Path, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Samples in all, the functions with the most samples on top of the stack (self), and
    the k2l_dist / faiss Python functions with the most samples anywhere in it (inclusive)."""
    self_counts: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_counts[leaf_name(frames[-1])] += n
        for name in {leaf_name(f) for f in frames if "k2l_dist" in f or "faiss" in f.lower()}:
            inclusive[name] += n
    return total, self_counts.most_common(top), inclusive.most_common(top)


def table(title: str, seconds: float, total: int, self_rows, incl_rows) -> list[str]:
    lines = [f"**{title}**: {seconds:.1f} s, {total} samples (50 Hz per thread; busy threads only)", "",
             "| self (top of stack) | share | | inclusive (k2l_dist, faiss) | share |", "|---|---|---|---|---|"]
    for i in range(max(len(self_rows), len(incl_rows))):
        a = self_rows[i] if i < len(self_rows) else ("", 0)
        b = incl_rows[i] if i < len(incl_rows) else ("", 0)
        share = [f"{100 * n / max(total, 1):.1f}%" for n in (a[1], b[1])]
        lines.append(f"| `{a[0]}` | {share[0]} | | `{b[0]}` | {share[1]} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_args(p)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path, help="append the tables to this markdown file")
    p.add_argument("--raw-dir", type=Path, help="keep py-spy's raw (collapsed) stacks here")
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import dataclasses

    import torch

    from k2l_dist.clustering.ray_service import RayService
    from k2l_dist.clustering.rounds import recover
    from k2l_dist.clustering.store import PointSet
    from k2l_dist.distributed import DistInfo
    from k2l_dist.distributed.threads import pin_threads

    threads = pin_threads()
    cfg = round_config(args, threads)
    part = synthetic_part(args.points, args.dim, args.K)
    out: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.raw_dir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        recover("round", PointSet.from_parts([part]), cfg)  # warm: imports, first-touch of the arrays
        spy = record(os.getpid(), Path(tmp) / "inline.txt")
        time.sleep(2.0)  # py-spy attaches
        t0 = time.perf_counter()
        recover("round", PointSet.from_parts([part]), cfg)
        inline_s = time.perf_counter() - t0
        stop(spy)
        out += table("inline (this process)", inline_s, *summarise(Path(tmp) / "inline.txt", args.top)) + [""]

        service = RayService(dataclasses.replace(cfg, shards=1), DistInfo(0, 1, 0, 1, torch.device("cpu"), threads))
        try:
            import ray

            service.recover("round", part, "round0")  # warm: the actor's imports and first round
            pid = ray.get(service.actor.ping.remote())
            spy = record(pid, Path(tmp) / "actor.txt")
            time.sleep(2.0)
            t0 = time.perf_counter()
            service.recover("round", part, "round1")
            actor_s = time.perf_counter() - t0
            inside = service.timings.get("actor_cluster_seconds", float("nan"))
            stop(spy)
        finally:
            service.close()
        out += table(f"Ray actor (what the rank waits; {inside:.1f} s of it clustering in the actor)", actor_s,
                     *summarise(Path(tmp) / "actor.txt", args.top))
    text = "\n".join(out)
    print(text)
    if args.out:
        with args.out.open("a") as handle:
            handle.write(f"\n### Clustering round profile ({args.points:,} × {args.dim}, K={args.K}, M={args.M}, "
                         f"`python bench/profile_actor.py --points {args.points}`)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
