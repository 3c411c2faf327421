"""Correspondence recovery by clustering (paper Sec. 3.3, Eq. 1; Sec. 3.6; Sec. 3.7).

Every K-means in the project goes through :func:`kmeans_rows` (faiss), which reads only
the rows faiss trains on. On top of it:

* :func:`dedup_per_image` keeps, per (image, cluster), only the point closest to the
  centroid -- the paper's replacement for a per-image Hungarian assignment.
* :func:`cluster_points` = K-means + assignment + dedup (the Stage-2 "last K-means
  with K clusters", Sec. 3.6).
* :func:`two_way_points` = the modified two-way K-means of Sec. 3.3: K clusters to cap
  every image at K points, then M >> K clusters on the survivors.
* :func:`assign_flipped` = cluster labels of the descriptors taken on the flipped image
  (Sec. 3.7).

Both work on a :class:`~k2l_dist.clustering.store.PointSet`, whose descriptors may stay
in the ranks' parts or on other nodes; :func:`cluster_dedup` and :func:`two_way_cluster`
are the same on plain arrays. numpy + Faiss, torch-free: it runs in the clustering actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k2l_dist.clustering.nearest import as_f32, assign, flat_index, gpu_count
from k2l_dist.clustering.store import PointSet
from k2l_dist.config import ClusterConfig
from k2l_dist.utils.backends import import_faiss

faiss = import_faiss()

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    trained_on: int  # points faiss actually trained on (after its subsampling)
    n_points: int  # points handed to kmeans()
    inertia: float  # final faiss objective: sum of squared distances on the training sample
    on_gpu: bool
    max_points_per_centroid: int  # the cap that was passed to faiss


@dataclass
class ClusterStats:
    """Bookkeeping of one two-way clustering; arrays are per unique image / per cluster."""

    n_points: int
    n_images: int
    n_kept_first: int  # after the K pass + dedup
    n_kept: int  # after the M pass + dedup (final)
    image_ids: np.ndarray  # (n_images,) sorted unique ids the per-image arrays refer to
    points_per_image_before: np.ndarray  # (n_images,) int64
    points_per_image_after: np.ndarray  # (n_images,) int64, final keep
    cluster_sizes_k: np.ndarray  # (K,) final kept points per K cluster
    cluster_sizes_m: np.ndarray  # (M,) final kept points per M cluster
    n_skipped_images: int  # images with < min_points_per_image kept points
    kmeans_k: KMeansResult | None = None
    kmeans_m: KMeansResult | None = None

    def summary(self) -> dict[str, Any]:
        """Scalars only: what goes to the log / TensorBoard."""
        out: dict[str, Any] = {
            "points": self.n_points,
            "images": self.n_images,
            "kept_first_pass": self.n_kept_first,
            "kept": self.n_kept,
            "points_per_image_before": float(self.points_per_image_before.mean()) if self.n_images else 0.0,
            "points_per_image_after": float(self.points_per_image_after.mean()) if self.n_images else 0.0,
            "skipped_images": self.n_skipped_images,
            "empty_k_clusters": int((self.cluster_sizes_k == 0).sum()),
            "empty_m_clusters": int((self.cluster_sizes_m == 0).sum()),
        }
        for name, res in (("k", self.kmeans_k), ("m", self.kmeans_m)):
            if res is not None:
                out[f"trained_on_{name}"] = res.trained_on
                out[f"inertia_{name}"] = res.inertia
        return out


@dataclass
class ClusterDedupResult:
    keep: np.ndarray  # (n,) bool
    labels: np.ndarray  # (n,) int64, -1 where dropped
    distances: np.ndarray  # (n,) float32 squared L2 to the assigned centroid (all points)
    kmeans: KMeansResult


@dataclass
class TwoWayResult:
    keep: np.ndarray  # (n,) bool: survived both passes
    labels_k: np.ndarray  # (n,) int64 K-pass label, -1 where not kept
    labels_m: np.ndarray  # (n,) int64 M-pass label, -1 where not kept
    centroids_k: np.ndarray  # (K, d) float32
    centroids_m: np.ndarray  # (M, d) float32
    keep_first: np.ndarray  # (n,) bool: survived the K pass
    usable: np.ndarray  # (n,) bool: keep and its image has >= min_points_per_image kept points
    skipped_images: np.ndarray  # ids of images that sit out the round (int64)
    stats: ClusterStats = field(repr=False)


# --------------------------------------------------------------------------- faiss


_INIT_METHODS = {
    "random": "ClusteringInitMethod_RANDOM",
    "kmeans++": "ClusteringInitMethod_KMEANS_PLUS_PLUS",
    "afkmc2": "ClusteringInitMethod_AFK_MC2",
}


def _init_method(name: str) -> int | None:
    """faiss enum value for ``name``; None = leave faiss' default (random) alone."""
    if name not in _INIT_METHODS:
        raise ValueError(f"unknown K-means init {name!r} ({' | '.join(_INIT_METHODS)})")
    value = getattr(faiss, _INIT_METHODS[name], None)
    if value is None:
        if name != "random":
            log.warning("kmeans: this faiss has no %s seeding; using random", name)
        return None
    return int(value)


_OBJECTIVE_POINTS = 100_000  # points on which restarts are compared


def faiss_subsample(n: int, size: int, seed: int) -> np.ndarray:
    """The rows faiss itself trains on when handed ``n`` > ``size`` points with this seed
    (``Clustering::train``: the first ``size`` entries of ``rand_perm(n, seed)``), in its order."""
    if n >= 2**31:
        raise ValueError(f"{n} points: more than faiss' standard subsampling indexes")
    perm = np.empty(n, np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, int(seed))
    return perm[:size].astype(np.int64)


def kmeans(x: np.ndarray, k: int, cfg: ClusterConfig | None = None) -> KMeansResult:
    """faiss K-means of ``x`` (n, d) into ``k`` clusters; deterministic for a given ``cfg.seed``."""
    x = as_f32(x, "x")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    return kmeans_rows(lambda idx: x[idx], x.shape[0], x.shape[1], k, cfg)


def kmeans_rows(rows: Callable[[np.ndarray], np.ndarray], n: int, d: int, k: int,
                cfg: ClusterConfig | None = None) -> KMeansResult:
    """faiss K-means of ``n`` points of dimension ``d`` that ``rows(indices)`` reads.

    Only what faiss uses is ever read: with n > k * ``cfg.max_points_per_centroid``
    faiss trains on a seeded random subsample of that many points, which is drawn here
    exactly as faiss would draw it (:func:`faiss_subsample`) and handed over alone, so
    the points can stay in the ranks' parts and faiss scans no more than its sample.
    The number of points trained on is returned as ``trained_on`` and logged, because
    with the default cap (256) a K=10 pass over 200k descriptors trains on 2560 of them.
    Restarts are ours, not faiss' nredo: faiss reuses one k-means++ seeding for every
    redo, so its nredo cannot escape a bad seeding. Each restart gets its own seed (and
    sample) and the restarts are compared on the same points (up to 100k of them).
    """
    cfg = cfg or ClusterConfig()
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        raise ValueError(f"no points to cluster into {k} clusters")
    if n < k:
        return _fewer_points_than_clusters(as_f32(rows(np.arange(n)), "x"), k)
    # 0 = no cap; faiss stores the cap as a C int, so clip to what an int holds
    cap = int(cfg.max_points_per_centroid) if cfg.max_points_per_centroid > 0 else 0
    faiss_cap = cap if cap > 0 else max(1, min(2**31 - 1, -(-n // k)))
    trained_on = min(n, k * faiss_cap)

    init = cfg.init
    init_method = _init_method(init)
    ngpu = 0
    if cfg.use_gpu:
        ngpu = gpu_count()
        if ngpu == 0:
            log.warning("kmeans: use_gpu=True but faiss sees no GPU; clustering on CPU")
    params: dict[str, Any] = dict(niter=int(cfg.niter), nredo=1, max_points_per_centroid=faiss_cap,
                                  verbose=bool(getattr(cfg, "verbose", False)))
    if init_method is not None:
        params["init_method"] = init_method
    rng = np.random.default_rng(cfg.seed)
    everything = as_f32(rows(np.arange(n)), "x") if n <= max(trained_on, _OBJECTIVE_POINTS) else None
    probe = everything if n <= _OBJECTIVE_POINTS else as_f32(
        rows(rng.choice(n, _OBJECTIVE_POINTS, replace=False)), "x")
    best = None
    for restart in range(max(1, int(cfg.nredo))):
        params["seed"] = int(cfg.seed) + 7919 * restart
        sample = everything if n <= trained_on else as_f32(
            rows(faiss_subsample(n, trained_on, params["seed"])), "x")
        km = faiss.Kmeans(d, k, **params)
        km.index = flat_index(d, ngpu > 0)  # GPUs through the cached resources
        km.train(sample)
        cand = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)
        objective = float(assign(probe, cand, use_gpu=ngpu > 0)[1].sum())
        if best is None or objective < best[0]:
            best = (objective, cand)
    inertia, centroids = best
    log.info(
        "kmeans: k=%d d=%d n=%d trained_on=%d (max_points_per_centroid=%s) niter=%d nredo=%d "
        "init=%s gpu=%d inertia=%.4g",
        k, d, n, trained_on, cap or "none", cfg.niter, cfg.nredo, init, ngpu, inertia,
    )
    return KMeansResult(
        centroids=centroids,
        trained_on=trained_on,
        n_points=n,
        inertia=inertia,
        on_gpu=ngpu > 0,
        max_points_per_centroid=cap,
    )


def _fewer_points_than_clusters(x: np.ndarray, k: int) -> KMeansResult:
    """Each point its own centroid, the other clusters parked far away and left empty.

    A tiny or starved round (one image, most detections lost) must not stop a multi-day
    run; the label space keeps its k clusters so every table and head keeps its shape.
    """
    n, d = x.shape
    log.warning("kmeans: only %d points for %d clusters: %d cluster(s) stay empty", n, k, k - n)
    far = np.float32(1e3 * (1.0 + float(np.abs(x).max())))
    parked = x[:1] + far * (1.0 + np.arange(k - n, dtype=np.float32))[:, None]
    return KMeansResult(centroids=np.ascontiguousarray(np.concatenate([x, parked]), np.float32), trained_on=n,
                        n_points=n, inertia=0.0, on_gpu=False, max_points_per_centroid=0)


def assign_flipped(desc_flipped: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> np.ndarray:
    """Cluster of each point's flipped-image descriptor (Sec. 3.7): labels (n,) int64.

    Row i of ``desc_flipped`` must be the descriptor read from the horizontally flipped
    image at point i's mirrored location (the caller extracts it). No dedup: the label
    is a second assignment of an already kept point, not a new point.
    """
    return assign(desc_flipped, centroids, use_gpu=use_gpu)[0]


# --------------------------------------------------------------------------- dedup


def dedup_per_image(image_ids: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Keep mask (n,) bool: per (image, cluster) only the point closest to the centroid.

    Points with a negative label (already dropped) are never kept; NaN distances rank
    last and negative ones (rounding in the squared distances) count as 0. Ties in
    distance go to the lower input index (stable sort), so the result depends on
    nothing but the inputs.
    """
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    distances = np.asarray(distances, dtype=np.float32).reshape(-1)
    n = labels.shape[0]
    if image_ids.shape[0] != n or distances.shape[0] != n:
        raise ValueError(f"length mismatch: image_ids {image_ids.shape}, labels {labels.shape}, "
                         f"distances {distances.shape}")
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    dist = np.where(np.isnan(distances), np.float32(np.inf), np.where(distances > 0, distances, np.float32(0)))
    if (image_ids[1:] >= image_ids[:-1]).all():  # a merged round is sorted by image: no unique() needed
        image = np.zeros(n, np.int64)
        np.cumsum(image_ids[1:] != image_ids[:-1], out=image[1:])
    else:
        image = np.unique(image_ids, return_inverse=True)[1].reshape(-1)
    group = image * (int(labels.max()) + 2) + (labels + 1)  # (image, cluster), -1 labels included
    if group.max() < 2**32:
        # One sort on (group, distance) packed in 64 bits: the bits of a non-negative
        # float32 order as the floats do. A stable sort keeps ties in input order.
        key = (group.astype(np.uint64) << np.uint64(32)) | dist.view(np.uint32).astype(np.uint64)
        order = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((dist, group))
    sorted_group = group[order]
    first = np.ones(n, dtype=bool)
    np.not_equal(sorted_group[1:], sorted_group[:-1], out=first[1:])
    keep[order[first]] = True
    keep &= labels >= 0
    return keep


def cluster_dedup(
    desc: np.ndarray,
    image_ids: np.ndarray,
    k: int,
    cfg: ClusterConfig | None = None,
    mask: np.ndarray | None = None,
    fit_also: np.ndarray | None = None,
) -> ClusterDedupResult:
    """:func:`cluster_points` on plain arrays: ``fit_also`` (n, d) are more descriptors, row
    for row (the mirrored image's), that the centroids are fitted on but never labelled."""
    return cluster_points(_array_points(desc, image_ids, fit_also), k, cfg, mask, mirror=fit_also is not None)


def _array_points(desc: np.ndarray, image_ids: np.ndarray, fit_also: np.ndarray | None) -> PointSet:
    desc = as_f32(desc, "desc")
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    if image_ids.shape[0] != desc.shape[0]:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries for {desc.shape[0]} descriptors")
    return PointSet.from_arrays(image_ids, desc, None if fit_also is None else as_f32(fit_also, "fit_also"))


def _selected_rows(points: PointSet, idx: np.ndarray, mirror: bool) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """The points ``idx`` (and, with ``mirror``, their mirrored descriptors after them) as
    the rows K-means reads: (read rows by position, number of rows)."""
    def read(pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, np.int64)
        if not mirror:
            return points.rows(idx[pos])
        out = np.empty((len(pos), points.dim), np.float32)
        mirrored = pos >= len(idx)
        out[~mirrored] = points.rows(idx[pos[~mirrored]])
        out[mirrored] = points.rows(idx[pos[mirrored] - len(idx)], mirrored=True)
        return out
    return read, len(idx) * (2 if mirror else 1)


def cluster_points(points: PointSet, k: int, cfg: ClusterConfig | None = None, mask: np.ndarray | None = None,
                   mirror: bool = False) -> ClusterDedupResult:
    """K-means to ``k`` on the points in ``mask``, assign those points, keep one per (image, cluster).

    Points outside ``mask`` get label -1 and are not kept. This is the Stage-2 "last
    K-means with K clusters" (Sec. 3.6) and each pass of :func:`two_way_points`.
    ``mirror``: the centroids are fitted on the points' mirrored descriptors too (the
    paper's code does); only the originals are labelled and deduplicated.
    """
    cfg = cfg or ClusterConfig()
    idx = np.arange(points.n) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
    read, n_rows = _selected_rows(points, idx, mirror)
    res = kmeans_rows(read, n_rows, points.dim, k, cfg)
    labels, distances = points.assign(res.centroids, mask)
    keep = dedup_per_image(points.image_ids, labels, distances)
    labels[~keep] = -1
    return ClusterDedupResult(keep=keep, labels=labels, distances=distances, kmeans=res)


def two_way_cluster(
    desc: np.ndarray,
    image_ids: np.ndarray,
    K: int | None = None,
    M: int | None = None,
    cfg: ClusterConfig | None = None,
    fit_also: np.ndarray | None = None,
) -> TwoWayResult:
    """:func:`two_way_points` on plain arrays (``fit_also``: see :func:`cluster_dedup`)."""
    return two_way_points(_array_points(desc, image_ids, fit_also), K, M, cfg, mirror=fit_also is not None)


def two_way_points(points: PointSet, K: int | None = None, M: int | None = None, cfg: ClusterConfig | None = None,
                   mirror: bool = False) -> TwoWayResult:
    """The modified two-way K-means of Sec. 3.3 (Eq. 1).

    1. K-means of all points to K clusters; per image keep only the point closest to
       each centroid, so an image keeps at most K points (fewer when occluded).
    2. K-means of the survivors to M (>> K) clusters; again at most one point per
       (image, cluster). Both passes' labels are returned for the final survivors.

    Images left with fewer than ``cfg.min_points_per_image`` points (no same-image
    negative pair possible) are reported in ``skipped_images`` and excluded from
    ``usable``; their points stay in ``keep`` so the caller can still see them.
    ``K`` / ``M`` default to ``cfg.K`` / ``cfg.M``; ``mirror``: see :func:`cluster_points`.
    """
    cfg = cfg or ClusterConfig()
    K = int(cfg.K if K is None else K)
    M = int(cfg.M if M is None else M)
    image_ids = points.image_ids
    n = points.n

    first = cluster_points(points, K, cfg, mirror=mirror)
    n_first = int(first.keep.sum())
    second = cluster_points(points, M, cfg, mask=first.keep, mirror=mirror)

    keep = first.keep & second.keep
    labels_k = np.where(keep, first.labels, -1)
    labels_m = np.where(keep, second.labels, -1)

    uniq, inv = np.unique(image_ids, return_inverse=True)
    before = np.bincount(inv, minlength=uniq.size).astype(np.int64)
    after = np.bincount(inv[keep], minlength=uniq.size).astype(np.int64)
    skipped = (after < getattr(cfg, "min_points_per_image", 2)) & (before > 0)
    usable = keep & ~skipped[inv]

    stats = ClusterStats(
        n_points=n,
        n_images=int(uniq.size),
        n_kept_first=n_first,
        n_kept=int(keep.sum()),
        image_ids=uniq.astype(np.int64),
        points_per_image_before=before,
        points_per_image_after=after,
        cluster_sizes_k=np.bincount(labels_k[keep], minlength=K).astype(np.int64),
        cluster_sizes_m=np.bincount(labels_m[keep], minlength=M).astype(np.int64),
        n_skipped_images=int(skipped.sum()),
        kmeans_k=first.kmeans,
        kmeans_m=second.kmeans,
    )
    log.info("two_way_cluster: %s", stats.summary())
    return TwoWayResult(
        keep=keep,
        labels_k=labels_k,
        labels_m=labels_m,
        centroids_k=first.kmeans.centroids,
        centroids_m=second.kmeans.centroids,
        keep_first=first.keep,
        usable=usable,
        skipped_images=uniq[skipped].astype(np.int64),
        stats=stats,
    )
