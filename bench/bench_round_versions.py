"""One clustering round of this checkout against another checkout's, alternating, and whether their labels agree.

Each round runs in a process of its own (the two versions are the same package), on the
synthetic part of ``bench_clustering.py`` (``--points`` descriptors of 256 d, about 30 per
image, with mirrored descriptors), two-way K-means K=30 then M=100 (niter 20, 8 restarts)
as the config's defaults, with all this machine's cores: one untimed round, then
``--repeats`` timed ones per process; the processes alternate ``--alternations`` times.
Every array of the round's labels (points, K and M labels, mirrored labels, centroids,
flip permutation) is compared between the versions.

    git worktree add /tmp/before <commit>
    python bench/bench_round_versions.py --other /tmp/before [--points 1000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

# Run inside a process whose sys.path starts at one checkout: that version's round.
_ROUND = """
import json, statistics, sys, time
root, out, points, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [root, root + "/bench"]
import numpy as np
from bench_clustering import synthetic_part
from k2l_dist.clustering.rounds import recover
from k2l_dist.config import ClusterConfig
from k2l_dist.distributed.threads import pin_threads
try:
    from k2l_dist.clustering.store import PointSet
    def points_of(part): return PointSet.from_parts([part])
except ImportError:  # versions before the PointSet: one merged dict
    from k2l_dist.clustering.rounds import merge_parts
    def points_of(part): return merge_parts([part])
threads = pin_threads()
part = synthetic_part(points, 256, 30)
cfg = ClusterConfig(K=30, M=100, niter=20, threads=threads)
recover("round", points_of(part), cfg)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    labels = recover("round", points_of(part), cfg)
    times.append(time.perf_counter() - t0)
np.savez(out, **{k: v for k, v in vars(labels).items() if isinstance(v, np.ndarray)})
print(json.dumps({"times": times, "threads": threads, "nredo": cfg.nredo}))
"""


def one_round(root: Path, out: Path, points: int, repeats: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _ROUND, str(root), str(out), str(points), str(repeats)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the round of {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_arrays(a: Path, b: Path) -> dict[str, bool]:
    with np.load(a) as x, np.load(b) as y:
        return {k: bool(np.array_equal(x[k], y[k])) for k in sorted(set(x.files) | set(y.files))
                if k in x.files and k in y.files}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--alternations", type=int, default=2)
    p.add_argument("--section", default="bench_round_versions")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    other_rev = subprocess.run(["git", "-C", str(args.other), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True).stdout.strip() or str(args.other)
    this_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    times: dict[str, list[float]] = {other_rev: [], this_rev: []}
    with tempfile.TemporaryDirectory(prefix="k2l-rounds-") as tmp:
        saved = {}
        for _ in range(args.alternations):
            for rev, root in ((other_rev, args.other), (this_rev, ROOT)):
                saved[rev] = Path(tmp) / f"{rev}.npz"
                got = one_round(root, saved[rev], args.points, args.repeats)
                times[rev] += got["times"]
                print(rev, [round(t, 2) for t in got["times"]], flush=True)
        same = same_arrays(saved[other_rev], saved[this_rev])
    base = statistics.median(times[other_rev])
    rows = [f"| {rev} | {statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | {statistics.median(t) / base:.2f} |"
            for rev, t in times.items()]
    body = "\n".join([
        "## Clustering round: this version against an earlier one",
        "",
        f"`python bench/bench_round_versions.py --other <worktree at {other_rev}> --points {args.points}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- round: {args.points:,} synthetic descriptors × 256 d (+ mirrored), two-way K-means K=30 then M=100, "
        f"niter 20, 8 seeded restarts, per-image dedup, mirrored assignment; inline, all cores; each version in its "
        f"own process, {args.alternations} alternations × {args.repeats} timed rounds after an untimed one",
        f"- labels: {'every array identical' if all(same.values()) else 'DIFFER: ' + json.dumps(same)} "
        f"({', '.join(same)})",
        "",
        "| version | round seconds, median (range) | vs the earlier |",
        "|---|---|---|",
        *rows,
    ])
    print(body)
    write_section(args.out, args.section, body)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
