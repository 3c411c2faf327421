"""Correspondence recovery by clustering (paper Sec. 3.3, Eq. 1; Sec. 3.6; Sec. 3.7).

Every K-means in the project goes through :func:`kmeans` (faiss). On top of it:

* :func:`dedup_per_image` keeps, per (image, cluster), only the point closest to the
  centroid -- the paper's replacement for a per-image Hungarian assignment.
* :func:`cluster_dedup` = K-means + assignment + dedup (the Stage-2 "last K-means
  with K clusters", Sec. 3.6).
* :func:`two_way_cluster` = the modified two-way K-means of Sec. 3.3: K clusters to cap
  every image at K points, then M >> K clusters on the survivors.
* :func:`assign_flipped` = cluster labels of the descriptors taken on the flipped image
  (Sec. 3.7).

Everything is plain numpy in/out, torch-free: it runs inside the Ray clustering actor too.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from k2l_dist.config import ClusterConfig

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


def _gpu_count() -> int:
    # faiss-cpu has no get_num_gpus on some builds; treat that as zero GPUs
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


GPU_TEMP_MEMORY = 1 << 30  # Faiss scratch memory per GPU (its default grows with the card)


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> tuple:
    """One StandardGpuResources per visible GPU, created once per process (creating them
    allocates scratch memory and CUDA handles: too slow to repeat every search)."""
    resources = []
    for _ in range(_gpu_count()):
        res = faiss.StandardGpuResources()
        res.setTempMemory(GPU_TEMP_MEMORY)
        resources.append(res)
    return tuple(resources)


def _flat_index(d: int, use_gpu: bool):
    """An exact L2 index: on every visible GPU (cached resources) when asked and possible."""
    index = faiss.IndexFlatL2(d)
    resources = _gpu_resources() if use_gpu and _gpu_count() > 0 else ()
    if resources:
        index = faiss.index_cpu_to_gpu_multiple_py(list(resources), index)
    return index


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


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) array, got shape {x.shape}")
    return x


_OBJECTIVE_POINTS = 100_000  # points on which restarts are compared


def kmeans(x: np.ndarray, k: int, cfg: ClusterConfig | None = None) -> KMeansResult:
    """faiss K-means of ``x`` (n, d) into ``k`` clusters; deterministic for a given ``cfg.seed``.

    faiss trains on a seeded random subsample of ``k * cfg.max_points_per_centroid``
    points when n is larger; the number it really used is returned as ``trained_on``
    and logged, because with the default cap (256) a K=10 pass over 200k descriptors
    trains on only 2560 of them.
    """
    cfg = cfg or ClusterConfig()
    x = _as_f32(x, "x")
    n, d = x.shape
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        raise ValueError(f"no points to cluster into {k} clusters")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    if n < k:
        return _fewer_points_than_clusters(x, k)
    # 0 = no cap; faiss stores the cap as a C int, so clip to what an int holds
    cap = int(cfg.max_points_per_centroid) if cfg.max_points_per_centroid > 0 else 0
    faiss_cap = cap if cap > 0 else max(1, min(2**31 - 1, -(-n // k)))
    trained_on = min(n, k * faiss_cap)

    init = cfg.init
    init_method = _init_method(init)
    ngpu = 0
    if cfg.use_gpu:
        ngpu = _gpu_count()
        if ngpu == 0:
            log.warning("kmeans: use_gpu=True but faiss sees no GPU; clustering on CPU")
    params: dict[str, Any] = dict(
        niter=int(cfg.niter),
        nredo=int(cfg.nredo),
        seed=int(cfg.seed),
        max_points_per_centroid=faiss_cap,
        verbose=bool(getattr(cfg, "verbose", False)),
    )
    if init_method is not None:
        params["init_method"] = init_method
    # Restarts are ours, not faiss' nredo: faiss reuses one k-means++ seeding for every
    # redo, so its nredo cannot escape a bad seeding. Each restart gets its own seed and
    # the restarts are compared on the same points (up to _OBJECTIVE_POINTS of them).
    params["nredo"] = 1
    rng = np.random.default_rng(cfg.seed)
    probe = x if n <= _OBJECTIVE_POINTS else x[rng.choice(n, _OBJECTIVE_POINTS, replace=False)]
    best = None
    for restart in range(max(1, int(cfg.nredo))):
        params["seed"] = int(cfg.seed) + 7919 * restart
        km = faiss.Kmeans(d, k, **params)
        km.index = _flat_index(d, ngpu > 0)  # GPUs through the cached resources
        km.train(x)
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


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x``: ``(labels (n,) int64, sq_distances (n,) float32)``."""
    x = _as_f32(x, "x")
    centroids = _as_f32(centroids, "centroids")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"dimension mismatch: x has d={x.shape[1]}, centroids d={centroids.shape[1]}")
    if x.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = _flat_index(centroids.shape[1], use_gpu)
    index.add(centroids)
    dist, lab = index.search(x, 1)
    return lab[:, 0].astype(np.int64), dist[:, 0].astype(np.float32)


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
    """K-means to ``k`` on ``desc[mask]``, assign those points, keep one per (image, cluster).

    Points outside ``mask`` get label -1 and are not kept. This is the Stage-2 "last
    K-means with K clusters" (Sec. 3.6) and each pass of :func:`two_way_cluster`.
    ``fit_also`` (n, d): more descriptors, row for row (the mirrored image's), that the
    centroids are fitted on together with ``desc[mask]`` but that are never labelled.
    """
    cfg = cfg or ClusterConfig()
    desc = _as_f32(desc, "desc")
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    n = desc.shape[0]
    if image_ids.shape[0] != n:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries for {n} descriptors")
    idx = np.arange(n) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
    sub = desc[idx]
    res = kmeans(sub if fit_also is None else np.concatenate([sub, _as_f32(fit_also, "fit_also")[idx]]), k, cfg)
    lab_sub, dist_sub = assign(sub, res.centroids, use_gpu=cfg.use_gpu)
    labels = np.full(n, -1, dtype=np.int64)
    distances = np.full(n, np.inf, dtype=np.float32)
    labels[idx] = lab_sub
    distances[idx] = dist_sub
    keep = dedup_per_image(image_ids, labels, distances)
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
    """The modified two-way K-means of Sec. 3.3 (Eq. 1).

    1. K-means of all points to K clusters; per image keep only the point closest to
       each centroid, so an image keeps at most K points (fewer when occluded).
    2. K-means of the survivors to M (>> K) clusters; again at most one point per
       (image, cluster). Both passes' labels are returned for the final survivors.

    Images left with fewer than ``cfg.min_points_per_image`` points (no same-image
    negative pair possible) are reported in ``skipped_images`` and excluded from
    ``usable``; their points stay in ``keep`` so the caller can still see them.
    ``K`` / ``M`` default to ``cfg.K`` / ``cfg.M``; ``fit_also``: see :func:`cluster_dedup`.
    """
    cfg = cfg or ClusterConfig()
    K = int(cfg.K if K is None else K)
    M = int(cfg.M if M is None else M)
    desc = _as_f32(desc, "desc")
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    n = desc.shape[0]
    if image_ids.shape[0] != n:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries for {n} descriptors")

    first = cluster_dedup(desc, image_ids, K, cfg, fit_also=fit_also)
    n_first = int(first.keep.sum())
    second = cluster_dedup(desc, image_ids, M, cfg, mask=first.keep, fit_also=fit_also)

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
