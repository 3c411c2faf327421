"""One clustering round inline vs through the Ray actor, on synthetic descriptors.

``--points`` descriptors (default 1,000,000) of dimension ``--dim`` grouped about 30 per
image, drawn around K prototypes with noise, each with a mirrored descriptor. Timed: the
whole round as a training rank sees it — inline: two-way K-means + mirrored assignment
in this process; actor: ``ray.put`` of the extraction, submit, clustering in the actor
(which reads the descriptors in place from the object store), and reading the labels
back (Ray itself started before timing). With ``--shards 2`` the actor also runs the
round over 2 shard holders. Medians of ``--repeats``; labels are compared with the
inline ones (one algorithm: they must be equal) and, with ``--labels FILE``, with the
labels saved there by an earlier run (``--save-labels FILE``), e.g. of another version.
The actor's peak memory is reported against the round's descriptor bytes.

    python bench/bench_clustering.py [--points 1000000] [--dim 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402


def synthetic_part(points: int, dim: int, K: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(20, 41, points // 30 + 1)
    counts = counts[: np.searchsorted(np.cumsum(counts), points) + 1]
    counts[-1] -= counts.sum() - points
    ids = np.repeat(np.arange(len(counts)), counts)
    protos = rng.standard_normal((K, dim), dtype=np.float32)
    which = rng.integers(0, K, points)

    def noisy() -> np.ndarray:
        x = protos[which] + 0.6 * rng.standard_normal((points, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return {"image_ids": ids.astype(np.int64), "points": rng.uniform(0, 128, (points, 2)).astype(np.float32),
            "scores": rng.uniform(0, 1, points).astype(np.float32), "descriptors": noisy(),
            "flipped_descriptors": noisy(), "sample_ids": np.arange(len(counts), dtype=np.int64)}


def dedup_by_image_loop(image_ids: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """The usual way: one numpy sort per image (the reference point of the targets)."""
    keep = np.zeros(len(labels), bool)
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(labels)]):
        order = s + np.lexsort((distances[s:e], labels[s:e]))
        lab = labels[order]
        first = np.r_[True, lab[1:] != lab[:-1]] & (lab >= 0)
        keep[order[first]] = True
    return keep


def dedup_rows(images: int, M: int, repeats: int) -> tuple[list[float], list[float], int, bool]:
    from k2l_dist.clustering.kmeans import dedup_per_image

    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(images), rng.integers(20, 41, images))
    labels = rng.integers(0, M, len(ids))
    dist = rng.random(len(ids)).astype(np.float32)
    ours, loop, same = [], [], True
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = dedup_per_image(ids, labels, dist)
        t1 = time.perf_counter()
        b = dedup_by_image_loop(ids, labels, dist)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        loop.append(t2 - t1)
        same &= bool(np.array_equal(a, b))
    return ours, loop, len(ids), same


def sklearn_rows(x: np.ndarray, k: int, niter: int, threads: int) -> list[tuple[str, float, float]]:
    """One K-means of every point of ``x`` into k clusters, niter Lloyd iterations, random
    seeding: faiss (this project's wrapper) and scikit-learn; objective over all points."""
    from k2l_dist.clustering.kmeans import assign, kmeans
    from k2l_dist.config import ClusterConfig

    rows = []
    t0 = time.perf_counter()
    res = kmeans(x, k, ClusterConfig(niter=niter, nredo=1, init="random", max_points_per_centroid=0, threads=threads))
    rows.append(("faiss (k2l_dist.clustering.kmeans)", time.perf_counter() - t0,
                 float(assign(x, res.centroids)[1].astype(np.float64).sum())))
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError:
        return rows
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        km = KMeans(k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=0).fit(x)
        rows.append(("scikit-learn KMeans (lloyd)", time.perf_counter() - t0,
                     float(assign(x, km.cluster_centers_.astype(np.float32))[1].astype(np.float64).sum())))
    return rows


def compare_saved(labels, path: Path) -> str:
    """A sentence: whether the round's arrays equal those saved in ``path`` by an earlier run."""
    with np.load(path, allow_pickle=False) as saved:
        differ = [k for k, v in labels.arrays().items() if k not in saved.files or not np.array_equal(saved[k], v)]
    return (f"Labels against `{path.name}` (saved by another run on the same data): "
            + ("every array equal (ids, offsets, points, labels, flipped labels, K labels, centroids)." if not differ
               else f"**differ** in {', '.join(differ)}."))


def add_round_args(p: argparse.ArgumentParser) -> None:
    """The synthetic round's size and K-means settings (shared with profile_actor.py)."""
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--K", type=int, default=30)
    p.add_argument("--M", type=int, default=100)
    p.add_argument("--niter", type=int, default=20)


def round_config(args: argparse.Namespace, threads: int):
    """The round's ClusterConfig, with an object store large enough for its arrays."""
    from k2l_dist.config import ClusterConfig

    return ClusterConfig(K=args.K, M=args.M, niter=args.niter, threads=threads,
                         object_store_gb=max(2.0, 4.5 * args.points * args.dim * 4 / 1e9))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_args(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per path first")
    p.add_argument("--shards", type=int, default=2, help="also time the actor over this many shard actors (0: skip)")
    p.add_argument("--dedup-images", type=int, default=100_000, help="images of the deduplication benchmark (0: skip)")
    p.add_argument("--sklearn", action="store_true",
                   help="also one K-means (M clusters, all points, --niter iterations) with faiss vs scikit-learn")
    p.add_argument("--save-labels", type=Path, help="write the inline round's labels here (.npz)")
    p.add_argument("--labels", type=Path, help="compare the inline round's labels with these (--save-labels)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from k2l_dist.clustering.ray_service import RayService
    from k2l_dist.clustering.rounds import recover
    from k2l_dist.clustering.store import PointSet
    from k2l_dist.distributed import DistInfo
    from k2l_dist.distributed.threads import pin_threads

    threads = pin_threads()
    cfg = round_config(args, threads)
    part = synthetic_part(args.points, args.dim, args.K)
    size_gb = sum(a.nbytes for a in part.values()) / 1e9
    descriptor_gb = sum(part[k].nbytes for k in ("descriptors", "flipped_descriptors")) / 1e9

    def timed(fn, settle=lambda: None) -> tuple[list[float], object]:
        """``--repeats`` timed rounds after ``--warmup`` untimed ones (a run's first round
        also pays for the process's first touch of its memory; later rounds reuse it);
        ``settle()`` runs untimed after each round."""
        times, out = [], None
        for _ in range(args.warmup):
            fn()
            settle()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            settle()
        return times, out

    from k2l_dist.clustering.kmeans import assign

    def objective(labels) -> str:
        """K-pass objective of the round's K centroids over every descriptor (comparable across paths)."""
        return f"{assign(part['descriptors'], labels.centroids_k)[1].astype(np.float64).sum():.6g}"

    inline_t, inline = timed(lambda: recover("round", PointSet.from_parts([part]), cfg))
    saved = compare_saved(inline, args.labels) if args.labels else ""
    if args.save_labels:
        np.savez(args.save_labels, **inline.arrays())
    rows = [("inline (this process)", inline_t, "—", objective(inline), "—", "—")]
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), threads)
    rss_peak_gb, held, private, shared = {}, {}, {}, {}

    def objects_freed(limit_s: float = 60.0) -> None:
        """Until the round's objects have left the object store (reference counting frees them
        a moment after the round): minutes of training separate two rounds of a real run."""
        from k2l_dist.clustering.actor import object_store_used_bytes

        deadline = time.monotonic() + limit_s
        while object_store_used_bytes() > 0.1 * size_gb * 1e9 and time.monotonic() < deadline:
            time.sleep(0.2)

    for shards in [1] + ([args.shards] if args.shards > 1 else []):
        service = RayService(dataclasses.replace(cfg, shards=shards), info)
        inside: list[dict] = []
        try:
            key = iter(range(10**6))

            def once():
                out = service.recover("round", part, f"round{next(key)}")
                inside.append(service.timings)
                return out
            t, labels = timed(once, settle=objects_freed)
            rss = max(x.get("actor_peak_rss_bytes", float("nan")) for x in inside)
            inside = inside[args.warmup:]  # the parts of the timed rounds
        finally:
            service.close()
        same = ("all arrays equal" if all(np.array_equal(v, inline.arrays()[k]) for k, v in labels.arrays().items())
                else f"{100 * (labels.labels == inline.labels).mean():.2f}% of labels"
                if labels.labels.shape == inline.labels.shape else f"other survivors ({len(labels.labels):,} points)")
        held[shards] = statistics.median(x.get("object_store_used_bytes", float("nan")) for x in inside) / 1e9
        private[shards] = max(x.get("actor_private_peak_bytes", float("nan")) for x in inside) / 1e9
        shared[shards] = max(x.get("actor_shared_resident_bytes", float("nan")) for x in inside) / 1e9
        put = statistics.median(x["submit_seconds"] for x in inside)
        work = statistics.median(x.get("actor_cluster_seconds", float("nan")) for x in inside)
        rss_peak_gb[shards] = rss / 1e9
        rows.append((f"Ray actor, {shards} shard{'s' if shards > 1 else ''}", t, same, objective(labels),
                     f"{put:.1f}", f"{work:.1f}"))
    base = statistics.median(inline_t)
    lines = [f"| {name} | {statistics.median(t):.1f} ({min(t):.1f}–{max(t):.1f}) | {statistics.median(t) / base:.2f} | "
             f"{put} | {work} | {same} | {obj} |" for name, t, same, obj, put, work in rows]
    extra: list[str] = []
    if 1 in rss_peak_gb:
        extra += ["", "### Clustering actor memory", "",
                  f"Peak RSS of the clustering actor (one holder): **{rss_peak_gb[1]:.2f} GB = "
                  f"{rss_peak_gb[1] / descriptor_gb:.2f}× the round's descriptor bytes** ({descriptor_gb:.2f} GB: "
                  f"{args.points:,} descriptors of {args.dim} d and their mirrored ones; with ids, positions and "
                  f"scores the round is {size_gb:.2f} GB), i.e. {rss_peak_gb[1] / (args.points / 1e6):.2f} GB per "
                  "million points, the process's own baseline included. It reads the descriptors in place from the "
                  "object store, whose pages count in its RSS once touched, and stay counted after their objects are "
                  f"freed: {shared[1]:.2f} GB of object-store pages were resident in it after the last round. Its own "
                  f"(anonymous) memory peaked at **{private[1]:.2f} GB = {private[1] / descriptor_gb:.2f}×** the "
                  f"descriptor bytes. The object stores held {held[1]:.2f} GB during a round (every object alive "
                  "then, as Ray reports it)."]
    if saved:
        extra += ["", saved]
    if args.dedup_images:
        ours, loop, n, same = dedup_rows(args.dedup_images, args.M, args.repeats)
        o, lo = statistics.median(ours), statistics.median(loop)
        extra += ["", "### Per-image deduplication", "",
                  f"{args.dedup_images:,} images, {n:,} points (20–40 per image), labels in [0, {args.M}), random "
                  f"distances; median of {args.repeats}; same keep mask: {same}. Targets: ≥ 10× the loop, ≤ 2% of "
                  "the inline round.", "",
                  "| dedup | seconds | vs the loop | share of the inline round |", "|---|---|---|---|",
                  f"| one sort on (image, cluster, distance) packed in 64 bits (`dedup_per_image`) | {o:.3f} | "
                  f"{lo / o:.1f}× faster | {100 * o / base:.1f}% |",
                  f"| a numpy sort per image | {lo:.3f} | 1.0 | {100 * lo / base:.1f}% |"]
    if args.sklearn:
        sk = sklearn_rows(part["descriptors"], args.M, args.niter, threads)
        ref = sk[0][1]
        extra += ["", "### One K-means over every point: faiss vs scikit-learn", "",
                  f"{args.points:,} × {args.dim} → {args.M} clusters, {args.niter} Lloyd iterations on all points "
                  f"(no subsample), random seeding, one run each, {threads} threads. Target: faiss ≥ 4× faster, "
                  "objectives within 1%.", "",
                  "| library | seconds | vs faiss | objective (sum of squared distances, all points) |",
                  "|---|---|---|---|",
                  *[f"| {name} | {sec:.1f} | {sec / ref:.2f} | {obj:.6g} ({100 * (obj / sk[0][2] - 1):+.2f}%) |"
                    for name, sec, obj in sk]]
        if len(sk) == 1:
            extra += ["", "scikit-learn is not installed here (`pip install -e '.[bench]'`): no comparison."]
    body = "\n".join([
        "## Clustering round: inline vs the Ray actor",
        "",
        f"`python bench/bench_clustering.py --points {args.points} --dim {args.dim} --repeats {args.repeats} "
        f"--warmup {args.warmup} "
        f"--shards {args.shards}{' --sklearn' if args.sklearn else ''}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- data: {args.points:,} descriptors × {args.dim}-d float32 (+ their mirrored descriptors), "
        f"{len(part['sample_ids']):,} images (20–40 points each), {args.K} noisy prototypes; "
        f"{size_gb:.2f} GB per round",
        f"- round: two-way K-means K={args.K} then M={args.M} (niter {args.niter}, {cfg.nredo} seeded restarts, faiss "
        f"subsample {cfg.max_points_per_centroid}/centroid for the seeding), per-image dedup, mirrored assignment; "
        f"Faiss on {threads} threads everywhere",
        "- actor time = what a rank waits: `ray.put` + submit + clustering in the actor + reading the labels "
        "from the object store (Ray started before timing); 'put' and 'in the actor' are medians of its parts; "
        f"each path first runs {args.warmup} untimed round(s), as a training run's later rounds reuse the memory "
        "its first round touched; between two rounds (untimed) the bench waits until the last round's objects "
        "have left the object store, as they have after the training steps between two rounds of a run",
        "",
        "| path | seconds, median (min–max) | vs inline | put s | in the actor s | labels equal to inline "
        "| K-pass objective, all points |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        "One algorithm for every layout: the sharded round fits the same faiss sample and assigns every point "
        "where its descriptors are, so its labels equal the inline ones. Its holders share this machine's cores.",
        *extra,
    ])
    print(body)
    write_section(args.out, "bench_clustering", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
