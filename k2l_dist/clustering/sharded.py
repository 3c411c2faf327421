"""K-means over descriptors spread across several shard holders (one round, many nodes).

A round's canonical arrays (the order of ``rounds.merge_parts``) are cut at image
boundaries into contiguous slices; each slice lives in a :class:`DescriptorShard` (in
this process, or a Ray actor on another node). The driver never holds all descriptors:

* :func:`sharded_kmeans` seeds the centroids with :func:`kmeans` (faiss, seeded
  restarts) on a seeded global sample, then runs Lloyd iterations whose per-cluster
  float64 sums come back from the shards. The sample, the seeding and the sums do not
  depend on how the rows are split, so 1, 2 or 3 shards give the same clustering (up
  to the order of float summation).
* Assignment and the per-image dedup run inside the shards, where images are whole;
  only per-cluster / per-image counts travel back until the final labels are gathered.
* :func:`sharded_pseudo_labels` / :func:`sharded_final_labels` mirror
  ``rounds.pseudo_labels`` / ``rounds.final_labels`` and return the same
  :class:`~k2l_dist.clustering.rounds.RoundLabels`.

numpy + faiss + scipy only (never torch): shards run inside torch-free actors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from scipy import sparse

from k2l_dist.clustering.flip import flip_count_matrix, flip_permutation
from k2l_dist.clustering.kmeans import ClusterStats, KMeansResult, assign, dedup_per_image, kmeans
from k2l_dist.clustering.rounds import (
    PART_KEYS,
    RoundLabels,
    cluster_size_stats,
    final_stats,
    images_kept_share,
    table_layout,
)
from k2l_dist.config import ClusterConfig

log = logging.getLogger(__name__)

_REQUIRED_KEYS = PART_KEYS[:4]
_CHUNK = 32768  # rows per faiss search in a Lloyd pass: bounds the float64 copy of a chunk
_REL_TOL = 1e-7  # Lloyd stops when the objective moves by less than this, relatively
_DEFAULT_CAP = 256  # sample points per centroid when cfg.max_points_per_centroid is 0
_PUT_BYTES = 65536  # broadcast arrays at least this large go to Ray's object store once


# --------------------------------------------------------------------------- shard


@dataclass
class _Pass:
    labels: np.ndarray  # (n,) int64, -1 where the row was inactive or dropped by the dedup
    keep: np.ndarray  # (n,) bool


class DescriptorShard:
    """One contiguous, image-aligned slice of a round's canonical arrays.

    Every method takes and returns plain numpy / Python values, so the class works
    unchanged as a Ray actor (``ray.remote(DescriptorShard)``). A pass's labels stay
    here; later calls name the pass whose survivors they work on (``mask``).
    """

    def __init__(self, arrays: dict[str, np.ndarray], threads: int | None = None, use_gpu: bool = False) -> None:
        if threads:
            faiss.omp_set_num_threads(int(threads))
        missing = [k for k in _REQUIRED_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"shard arrays lack {missing}")
        self.image_ids = np.asarray(arrays["image_ids"], np.int64).reshape(-1)
        n = self.image_ids.shape[0]
        self.points = np.asarray(arrays["points"], np.float32).reshape(n, 2)
        self.scores = np.asarray(arrays["scores"], np.float32).reshape(n)
        self.descriptors = _rows_f32(arrays["descriptors"], n, "descriptors")
        flipped = arrays.get("flipped_descriptors")
        self.flipped = None if flipped is None else _rows_f32(flipped, n, "flipped_descriptors")
        if self.flipped is not None and self.flipped.shape[1] != self.descriptors.shape[1]:
            raise ValueError("flipped_descriptors and descriptors differ in dimension")
        if n and (np.diff(self.image_ids) < 0).any():
            raise ValueError("shard image_ids must be sorted ascending (canonical order)")
        self.use_gpu = bool(use_gpu)
        self._passes: dict[str, _Pass] = {}
        self._final: str | None = None  # pass whose survivors are the shard's result
        self._usable: np.ndarray | None = None
        self._flipped_labels: np.ndarray | None = None

    # ---- layout

    def info(self) -> dict[str, Any]:
        n = int(self.image_ids.shape[0])
        return {
            "points": n,
            "images": int(np.unique(self.image_ids).size),
            "dim": int(self.descriptors.shape[1]),
            "has_flipped": self.flipped is not None,
            "first_id": int(self.image_ids[0]) if n else None,
            "last_id": int(self.image_ids[-1]) if n else None,
        }

    def count(self, mask: str | None = None) -> int:
        """Active rows: all of them, or the survivors of pass ``mask``."""
        return int(self.image_ids.shape[0]) if mask is None else int(self._passes[mask].keep.sum())

    def rows(self, indices: np.ndarray, mask: str | None = None) -> np.ndarray:
        """Descriptors of active rows ``indices`` (positions among the active rows)."""
        return self.descriptors[self._active(mask)[np.asarray(indices, np.int64)]]

    def _active(self, mask: str | None) -> np.ndarray:
        n = self.image_ids.shape[0]
        return np.arange(n) if mask is None else np.flatnonzero(self._passes[mask].keep)

    # ---- clustering

    def lloyd_stats(self, centroids: np.ndarray, mask: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-cluster float64 sums (k, d), int64 counts (k,) and the float64 objective of the active rows."""
        centroids = np.ascontiguousarray(centroids, np.float32)
        k, d = centroids.shape
        sums = np.zeros((k, d), np.float64)
        counts = np.zeros(k, np.int64)
        objective = 0.0
        active = self._active(mask)
        for start in range(0, active.size, _CHUNK):
            x = self.descriptors[active[start:start + _CHUNK]]
            labels, dist = assign(x, centroids, use_gpu=self.use_gpu)
            sums += _cluster_sums(x, labels, k)
            counts += np.bincount(labels, minlength=k)
            objective += float(dist.astype(np.float64).sum())
        return sums, counts, objective

    def assign_dedup(self, centroids: np.ndarray, pass_name: str, mask: str | None = None) -> dict[str, Any]:
        """Label the active rows with their nearest centroid; keep one point per (image, cluster).

        The pass is stored under ``pass_name``; returns its counts: ``active``, ``kept`` and
        ``sizes`` (k,) kept points per cluster.
        """
        centroids = np.ascontiguousarray(centroids, np.float32)
        n = self.image_ids.shape[0]
        active = self._active(mask)
        labels = np.full(n, -1, np.int64)
        distances = np.full(n, np.inf, np.float32)
        labels[active], distances[active] = assign(self.descriptors[active], centroids, use_gpu=self.use_gpu)
        keep = dedup_per_image(self.image_ids, labels, distances)
        labels[~keep] = -1
        self._passes[pass_name] = _Pass(labels=labels, keep=keep)
        return {"active": int(active.size), "kept": int(keep.sum()),
                "sizes": np.bincount(labels[keep], minlength=centroids.shape[0]).astype(np.int64)}

    def select(self, pass_name: str, min_points_per_image: int, sizes: dict[str, int] | None = None) -> dict[str, Any]:
        """Fix the result rows: survivors of ``pass_name`` whose image keeps >= ``min_points_per_image``.

        Returns the per-image counts the round statistics need (``image_ids``, ``before``,
        ``after``), the number of skipped images and, for every pass named in ``sizes``
        (name -> number of clusters), its label counts over the survivors.
        """
        keep = self._passes[pass_name].keep
        uniq, inv, before = np.unique(self.image_ids, return_inverse=True, return_counts=True)
        after = np.bincount(inv[keep], minlength=uniq.size).astype(np.int64)
        skipped = after < min_points_per_image
        self._final = pass_name
        self._usable = keep & ~skipped[inv]
        self._flipped_labels = None
        counts = {name: np.bincount(self._passes[name].labels[keep], minlength=k).astype(np.int64)
                  for name, k in (sizes or {}).items()}
        return {"image_ids": uniq.astype(np.int64), "before": before.astype(np.int64), "after": after,
                "skipped": int(skipped.sum()), "kept": int(keep.sum()), "usable": int(self._usable.sum()),
                "sizes": counts}

    def assign_flipped(self, centroids: np.ndarray) -> int:
        """Labels of the mirrored descriptors of the selected rows; returns how many were labelled."""
        if self.flipped is None:
            raise ValueError("this shard holds no flipped_descriptors")
        usable = self._selected()
        self._flipped_labels = assign(self.flipped[usable], centroids, use_gpu=self.use_gpu)[0]
        return int(self._flipped_labels.size)

    def flip_counts(self, K: int) -> np.ndarray:
        """This shard's part of the (K, K) flip count matrix of the selected rows."""
        if self._flipped_labels is None:
            raise ValueError("assign_flipped() has not run since the last select()")
        return flip_count_matrix(self._passes[self._final].labels[self._selected()], self._flipped_labels, K)

    def result(self, k_pass: str | None = None) -> dict[str, np.ndarray]:
        """Per-point arrays of the selected rows, in canonical order.

        ``labels``: the selected pass's labels; ``labels_k``: pass ``k_pass``'s (default: the
        same); ``flipped``: the mirrored descriptors' labels when assigned, else ``labels``.
        """
        usable = self._selected()
        labels = self._passes[self._final].labels[usable]
        labels_k = labels if k_pass is None else self._passes[k_pass].labels[usable]
        flipped = labels if self._flipped_labels is None else self._flipped_labels
        return {"image_ids": self.image_ids[usable], "points": self.points[usable], "labels": labels,
                "labels_k": labels_k, "flipped": np.asarray(flipped, np.int64)}

    def _selected(self) -> np.ndarray:
        if self._usable is None:
            raise ValueError("select() has not run on this shard")
        return self._usable


def _rows_f32(x: np.ndarray, n: int, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"{name}: expected ({n}, d), got {x.shape}")
    return x


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float64 sums of the rows of ``x`` per label, via a one-hot sparse product."""
    n = labels.shape[0]
    onehot = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ x.astype(np.float64))


# --------------------------------------------------------------------------- group


class ShardGroup:
    """Shard handles in canonical order; :meth:`run` calls one method on all of them."""

    def __init__(self, handles: Sequence[Any], call: Callable[[Sequence[Any], str, Sequence[tuple]], list]) -> None:
        if not handles:
            raise ValueError("a shard group needs at least one shard")
        self.handles = list(handles)
        self._call = call

    @classmethod
    def local(cls, shards: Sequence[DescriptorShard]) -> ShardGroup:
        return cls(shards, _call_local)

    @classmethod
    def ray(cls, actor_handles: Sequence[Any]) -> ShardGroup:
        """Actors of ``ray.remote(DescriptorShard)``: every call goes out at once, then one ``ray.get``."""
        return cls(actor_handles, _call_ray)

    def __len__(self) -> int:
        return len(self.handles)

    def run(self, method: str, *args: Any) -> list:
        """``method(*args)`` on every shard; results in shard order."""
        return self._call(self.handles, method, [args] * len(self.handles))

    def run_each(self, method: str, args_per_shard: Sequence[tuple]) -> list:
        """``method(*args_per_shard[i])`` on shard i; results in shard order."""
        if len(args_per_shard) != len(self.handles):
            raise ValueError(f"{len(args_per_shard)} argument tuples for {len(self.handles)} shards")
        return self._call(self.handles, method, list(args_per_shard))


def _call_local(handles: Sequence[Any], method: str, args: Sequence[tuple]) -> list:
    return [getattr(h, method)(*a) for h, a in zip(handles, args)]


def _call_ray(handles: Sequence[Any], method: str, args: Sequence[tuple]) -> list:
    import ray

    # one object-store copy of an array every shard gets (centroids), not one per call
    shared: dict[int, Any] = {}

    def put(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.nbytes >= _PUT_BYTES:
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]
        return value

    refs = [getattr(h, method).remote(*(put(v) for v in a)) for h, a in zip(handles, args)]
    return ray.get(refs)


def split_canonical(merged: dict[str, np.ndarray], n_shards: int) -> list[dict[str, np.ndarray]]:
    """Cut canonical per-point arrays into ``n_shards`` contiguous slices at image boundaries.

    Each cut goes to the image boundary nearest an equal share of the points, so the
    slices hold roughly equal point counts and no image spans two of them (a slice can
    be empty when there are fewer images than shards). Keys other than the per-point
    ones (``sample_ids``) are left out.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    ids = np.asarray(merged["image_ids"], np.int64).reshape(-1)
    n = ids.size
    if n and (np.diff(ids) < 0).any():
        raise ValueError("image_ids must be sorted ascending (canonical order)")
    cuts = _image_cuts(ids, n_shards) if n else np.zeros(n_shards - 1, np.int64)
    edges = np.r_[0, cuts, n].astype(np.int64)
    keys = [k for k in PART_KEYS if k in merged]
    return [{k: merged[k][a:b] for k in keys} for a, b in zip(edges[:-1], edges[1:])]


def canonical_slices(part_image_ids: Sequence[np.ndarray], n_shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Where each shard's rows come from when the points are still in the ranks' parts.

    Only the parts' image ids are needed (8 bytes a point): returns, per shard, the part
    index and row of each of its rows, in canonical order (image id, then the point's
    order within its part), cut at image boundaries into roughly equal slices.
    """
    ids = np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in part_image_ids])
    part = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(part_image_ids)])
    row = np.concatenate([np.arange(len(p), dtype=np.int64) for p in part_image_ids])
    order = np.argsort(ids, kind="stable")
    ids, part, row = ids[order], part[order], row[order]
    cuts = _image_cuts(ids, n_shards) if ids.size else np.zeros(n_shards - 1, np.int64)
    edges = np.r_[0, cuts, ids.size].astype(np.int64)
    return [(part[a:b], row[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def _image_cuts(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """``n_shards - 1`` non-decreasing cut positions, each the image start nearest an equal share."""
    n = ids.size
    bounds = np.r_[np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]), n]  # where a cut may fall
    targets = np.arange(1, n_shards) * n / n_shards
    right = np.clip(np.searchsorted(bounds, targets), 1, len(bounds) - 1)
    left = right - 1
    nearer_left = targets - bounds[left] <= bounds[right] - targets
    return np.maximum.accumulate(np.where(nearer_left, bounds[left], bounds[right]))


# --------------------------------------------------------------------------- k-means


@dataclass
class ShardedKMeans:
    centroids: np.ndarray  # (k, d) float32 after the Lloyd iterations
    objective: float  # sum of squared distances of all active points to ``centroids``
    n_points: int  # active points over all shards
    trained_on: int  # size of the global sample the seeding ran on
    lloyd_passes: int  # passes over the shards' data
    init: KMeansResult  # the seeding on the sample


def sharded_kmeans(group: ShardGroup, k: int, cfg: ClusterConfig | None = None,
                   pass_name: str | None = None) -> ShardedKMeans:
    """K-means of the active rows of every shard (all rows, or the survivors of ``pass_name``)."""
    cfg = cfg or ClusterConfig()
    k = int(k)
    counts = np.asarray(group.run("count", pass_name), np.int64)
    n = int(counts.sum())
    if n == 0:
        raise ValueError(f"no points to cluster into {k} clusters")
    sample = _fetch_rows(group, counts, _global_sample(n, k, cfg), pass_name)
    init = kmeans(sample, k, cfg)
    centroids, objective, passes = _lloyd(group, init.centroids, int(cfg.niter), pass_name)
    log.info("sharded_kmeans: k=%d n=%d shards=%d sample=%d lloyd_passes=%d objective=%.6g",
             k, n, len(group), sample.shape[0], passes, objective)
    return ShardedKMeans(centroids=centroids, objective=objective, n_points=n, trained_on=int(sample.shape[0]),
                         lloyd_passes=passes, init=init)


def _global_sample(n: int, k: int, cfg: ClusterConfig) -> np.ndarray:
    """Sorted global row indices of the seeding sample; depends on n and the seed only."""
    cap = int(cfg.max_points_per_centroid) or _DEFAULT_CAP
    size = min(n, k * cap)
    if size == n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(cfg.seed).choice(n, size=size, replace=False)).astype(np.int64)


def _fetch_rows(group: ShardGroup, counts: np.ndarray, indices: np.ndarray, mask: str | None) -> np.ndarray:
    """Rows at global ``indices`` (sorted); global index = shard offset + index among its active rows."""
    offsets = np.r_[0, np.cumsum(counts)]
    cut = np.searchsorted(indices, offsets)
    local = [(indices[cut[s]:cut[s + 1]] - offsets[s], mask) for s in range(len(counts))]
    return np.concatenate(group.run_each("rows", local), axis=0)


def _lloyd(group: ShardGroup, centroids: np.ndarray, niter: int, mask: str | None) -> tuple[np.ndarray, float, int]:
    """Up to ``niter`` Lloyd updates; returns the centroids with their own objective and the data passes."""
    prev = None
    for it in range(niter):
        sums, counts, objective = _lloyd_pass(group, centroids, mask)
        if prev is not None and abs(prev - objective) <= _REL_TOL * abs(prev):
            return centroids, objective, it + 1
        prev = objective
        centroids = _update(centroids, sums, counts)
    # the last update has not been scored yet
    return centroids, _lloyd_pass(group, centroids, mask)[2], niter + 1


def _lloyd_pass(group: ShardGroup, centroids: np.ndarray, mask: str | None) -> tuple[np.ndarray, np.ndarray, float]:
    parts = group.run("lloyd_stats", centroids, mask)
    sums = np.sum([p[0] for p in parts], axis=0, dtype=np.float64)
    counts = np.sum([p[1] for p in parts], axis=0, dtype=np.int64)
    return sums, counts, float(np.sum([p[2] for p in parts], dtype=np.float64))


def _update(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cluster means; a cluster without points keeps its centroid."""
    new = np.array(centroids, np.float64)
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    return new.astype(np.float32)


# --------------------------------------------------------------------------- rounds


def _check_shards(group: ShardGroup) -> bool:
    """Shards must be in canonical order with one dimension; returns whether they hold flipped descriptors."""
    infos = group.run("info")
    if len({i["dim"] for i in infos}) > 1:
        raise ValueError("shards hold descriptors of different dimensions")
    flipped = {i["has_flipped"] for i in infos if i["points"]}
    if len(flipped) > 1:
        raise ValueError("some shards hold flipped_descriptors and others do not")
    last = None
    for i in infos:
        if i["points"] == 0:
            continue
        if last is not None and i["first_id"] <= last:
            raise ValueError("shards are not in canonical order, or an image spans two shards")
        last = i["last_id"]
    return flipped == {True}


def _assign_dedup(group: ShardGroup, centroids: np.ndarray, pass_name: str, mask: str | None = None) -> int:
    """Runs the pass on every shard; returns the points it kept."""
    return int(sum(p["kept"] for p in group.run("assign_dedup", centroids, pass_name, mask)))


def _gather(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _kmeans_stats(res: ShardedKMeans) -> KMeansResult:
    """The sharded run as a KMeansResult: trained on the sample, inertia = the final Lloyd objective."""
    return dataclasses.replace(res.init, centroids=res.centroids, trained_on=res.trained_on,
                               n_points=res.n_points, inertia=res.objective)


def _warn_mirror_fit(cfg: ClusterConfig, has_flipped: bool) -> None:
    if cfg.mirror_together and has_flipped:
        log.warning("cluster.shards > 1 fits the centroids on the original descriptors only "
                    "(cluster.mirror_together applies to unsharded clustering)")


def sharded_pseudo_labels(group: ShardGroup, cfg: ClusterConfig, all_ids: np.ndarray) -> RoundLabels:
    """Stage-1 round over shards: the two-way K-means of ``rounds.pseudo_labels`` (Eq. 1)."""
    K, M = int(cfg.K), int(cfg.M)
    has_flipped = _check_shards(group)
    _warn_mirror_fit(cfg, has_flipped)
    km_k = sharded_kmeans(group, K, cfg)
    n_first = _assign_dedup(group, km_k.centroids, "k")
    km_m = sharded_kmeans(group, M, cfg, pass_name="k")
    _assign_dedup(group, km_m.centroids, "m", "k")
    sel = group.run("select", "m", int(getattr(cfg, "min_points_per_image", 2)), {"k": K, "m": M})
    if has_flipped:
        group.run("assign_flipped", km_m.centroids)
    res = _gather(group.run("result", "k"))

    image_ids = np.concatenate([s["image_ids"] for s in sel])
    n_skipped = int(sum(s["skipped"] for s in sel))
    stats = ClusterStats(
        n_points=km_k.n_points,
        n_images=int(image_ids.size),
        n_kept_first=n_first,
        n_kept=int(sum(s["kept"] for s in sel)),
        image_ids=image_ids,
        points_per_image_before=np.concatenate([s["before"] for s in sel]),
        points_per_image_after=np.concatenate([s["after"] for s in sel]),
        cluster_sizes_k=np.sum([s["sizes"]["k"] for s in sel], axis=0),
        cluster_sizes_m=np.sum([s["sizes"]["m"] for s in sel], axis=0),
        n_skipped_images=n_skipped,
        kmeans_k=_kmeans_stats(km_k),
        kmeans_m=_kmeans_stats(km_m),
    ).summary()
    table_ids, offsets = table_layout(res["image_ids"], all_ids)
    stats.update(cluster_size_stats(res["labels"], M))
    stats["images_kept_share"] = images_kept_share(offsets)
    stats["points_per_image_extracted"] = km_k.n_points / max(len(table_ids), 1)
    log.info("sharded_pseudo_labels: %s", stats)
    return RoundLabels(ids=table_ids, offsets=offsets, points=res["points"].astype(np.float32),
                       labels=res["labels"], flipped_labels=res["flipped"], labels_k=res["labels_k"],
                       centroids=km_m.centroids, centroids_k=km_k.centroids,
                       flip_permutation=np.arange(K, dtype=np.int64), stats=stats)


def sharded_final_labels(group: ShardGroup, cfg: ClusterConfig, all_ids: np.ndarray) -> RoundLabels:
    """Stage-2 labels over shards: ``rounds.final_labels`` (K clusters, ≤ 1 point per cluster per image)."""
    K = int(cfg.K)
    has_flipped = _check_shards(group)
    _warn_mirror_fit(cfg, has_flipped)
    km = sharded_kmeans(group, K, cfg)
    _assign_dedup(group, km.centroids, "final")
    group.run("select", "final", 0, None)  # Stage 2 keeps every survivor
    if has_flipped:
        group.run("assign_flipped", km.centroids)
    res = _gather(group.run("result"))
    labels = res["labels"]
    perm = np.arange(K, dtype=np.int64)
    if has_flipped:
        # the flipped labels are small ints: the permutation is solved once, by flip.py
        perm = flip_permutation(labels, res["flipped"], K)
    table_ids, offsets = table_layout(res["image_ids"], all_ids)
    stats = final_stats(labels, offsets, K)
    return RoundLabels(ids=table_ids, offsets=offsets, points=res["points"].astype(np.float32),
                       labels=labels, flipped_labels=perm[labels], labels_k=labels,
                       centroids=km.centroids, centroids_k=km.centroids, flip_permutation=perm, stats=stats)
