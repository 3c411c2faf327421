"""Our clustering round against the paper's official round, at equal K-means iterations and restarts.

The official round is ``FAN_Model.RecoverCorrespondance`` of a checkout of the paper's code
(github dimitrismallis/KeypointsToLandmarks, fetched by the user; never shipped here). Its
``FanClass.py`` imports packages this project does not use, so the bench compiles that one
method from the checkout's source and runs it as written, with the checkout's own
``clustering.py``, except that its ``faiss.Kmeans`` takes this run's ``niter`` and
``nredo`` (the official 100 × 10 on a GPU) and runs on the CPU. Measured with the checkout
at 3b18231 (its newest commit; earlier ones' method reads attributes of a whole model). Both rounds get the same
synthetic descriptors (``bench_clustering.synthetic_part``: ``--points`` of 256 d, about 30
per image, each with a mirrored descriptor) and all of this machine's cores; they
alternate, ``--repeats`` times each, after one untimed round each.

What each round does: two-way K-means (K, then M over each image's closest point per
cluster), with the mirrored assignment. The official round seeds K with scikit-learn's
k-means++ over its points, then calls faiss once per image for each of the two passes and
for the mirrored descriptors; ours seeds inside faiss and assigns every point at once.

    python bench/bench_official_round.py --official /path/to/KeypointsToLandmarks [--niter 20 --nredo 8]
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from bench_clustering import synthetic_part  # noqa: E402
from report import machine, write_section  # noqa: E402


def official_round(checkout: Path, K: int, M: int, niter: int, nredo: int):
    """The checkout's ``RecoverCorrespondance`` as a function of (keypoints, descriptors,
    mirrored descriptors, image → (start, end)), its K-means at ``niter`` × ``nredo``."""
    import faiss
    import sklearn.cluster
    import sklearn.utils.extmath

    sys.path.insert(0, str(checkout))
    try:
        import clustering as official
    finally:
        sys.path.remove(str(checkout))

    class Kmeans(official.Kmeans):
        def __init__(self, k: int, dimension: int = 256) -> None:  # the official seed; CPU; these iterations
            self.k = k
            self.clus = faiss.Kmeans(dimension, k, niter=niter, nredo=nredo, seed=1000)

    source = (checkout / "FanClass.py").read_text()
    method = next(node for cls in ast.parse(source).body if isinstance(cls, ast.ClassDef)
                  for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "RecoverCorrespondance")
    names = {"np": np, "sklearn": sklearn,
             "clustering": types.SimpleNamespace(Kmeans=Kmeans, preprocess_features=official.preprocess_features)}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(checkout / "FanClass.py"), "exec"), names)
    owner = types.SimpleNamespace(K=K, M=M)
    return lambda *inputs: names["RecoverCorrespondance"](owner, *inputs)


def official_inputs(part: dict[str, np.ndarray]) -> tuple:
    """The round's points as the official code holds them: rows per image in one array."""
    ids = part["image_ids"]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(ids)]
    indexes = {int(ids[s]): (int(s), int(e)) for s, e in zip(starts, ends)}
    return part["points"], part["descriptors"], part["flipped_descriptors"], indexes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="a checkout of the paper's official code")
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--K", type=int, default=30)
    p.add_argument("--M", type=int, default=100)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--nredo", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--section", default="", help="BENCHMARKS.md section (default: "
                                                  "bench_official_round_<niter>x<nredo>)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()

    from k2l_dist.clustering.rounds import recover
    from k2l_dist.clustering.store import PointSet
    from k2l_dist.config import ClusterConfig
    from k2l_dist.distributed.threads import pin_threads

    threads = pin_threads()
    part = synthetic_part(args.points, 256, args.K)
    cfg = ClusterConfig(K=args.K, M=args.M, niter=args.niter, nredo=args.nredo, threads=threads)
    theirs = official_round(args.official, args.K, args.M, args.niter, args.nredo)
    inputs = official_inputs(part)
    rounds = {"ours (k2l-dist)": lambda: recover("round", PointSet.from_parts([part]), cfg),
              "official RecoverCorrespondance": lambda: theirs(*inputs)}
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for fn in rounds.values():  # untimed: first touch of memory, faiss and scikit-learn set-up
        fn()
    for _ in range(args.repeats):
        for name, fn in rounds.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)
    ours, official = (statistics.median(t) for t in times.values())
    body = "\n".join([
        f"## Clustering round vs the official round at {args.niter} iterations × {args.nredo} restarts",
        "",
        f"`python bench/bench_official_round.py --official <checkout> --points {args.points} --niter {args.niter} "
        f"--nredo {args.nredo} --repeats {args.repeats}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}; Faiss on {threads} thread(s) in both",
        f"- data: {args.points:,} synthetic descriptors × 256 d (+ mirrored), {len(inputs[3]):,} images; K={args.K}, "
        f"M={args.M}; both rounds train faiss on its default subsample (256 points per centroid)",
        "- the official round as its checkout has it, on the CPU, its K-means at these iterations and restarts "
        "(the paper's code: 100 × 10 on a GPU)",
        "",
        "| round | seconds, median (range) | vs the official |",
        "|---|---|---|",
        *[f"| {name} | {statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | "
          f"{statistics.median(t) / official:.2f} |" for name, t in times.items()],
    ])
    print(body)
    write_section(args.out, args.section or f"bench_official_round_{args.niter}x{args.nredo}", body)
    print(f"ours / official = {ours / official:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
