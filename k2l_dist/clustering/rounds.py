"""One round of correspondence recovery, from rank extractions to pseudo-labels.

Ranks extract disjoint slices of the dataset; a :class:`~k2l_dist.clustering.store.PointSet`
puts their points in one canonical order (image id, then the point's order within its
image), so the result never depends on the world size or on which rank arrived first.
On it:

* :func:`pseudo_labels` — a Stage-1 round (Sec. 3.3): the modified two-way K-means,
  M-cluster labels for the usable points and, for the flip correspondence (Sec. 3.7),
  the M-cluster of each point's mirrored descriptor;
* :func:`final_labels` — Stage 2 (Sec. 3.6-3.7): a last K-means to K with ≤ 1 point per
  cluster per image, and the K↔K flip permutation.

Both return :class:`RoundLabels`, already laid out like a label table (sorted ids, ragged
offsets), so a rank can use arrays read from Ray's object store without copying them.
Everything here is numpy + Faiss: it runs inside the torch-free clustering actor, in one
process or over shard holders on several nodes, with the same result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k2l_dist.clustering.flip import flip_permutation
from k2l_dist.clustering.kmeans import cluster_points, two_way_points
from k2l_dist.clustering.store import PointSet
from k2l_dist.config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass
class RoundLabels:
    """Pseudo-labels of one round, by sample id (the layout of ``train.labels.LabelTable``)."""

    ids: np.ndarray  # (N,) int64 sorted: every image that took part (with or without points)
    offsets: np.ndarray  # (N+1,) int64: image ids[i] owns rows offsets[i]:offsets[i+1]
    points: np.ndarray  # (P, 2) float32 crop pixels
    labels: np.ndarray  # (P,) int64 M-cluster (Stage 1) or landmark channel (Stage 2)
    flipped_labels: np.ndarray  # (P,) int64 the label of the point's mirrored descriptor / channel
    labels_k: np.ndarray  # (P,) int64 K-pass label (Stage 1); = labels in Stage 2
    centroids: np.ndarray  # (M or K, d) float32
    centroids_k: np.ndarray  # (K, d) float32
    flip_permutation: np.ndarray  # (K,) int64 (Stage 2; identity in Stage 1)
    stats: dict[str, Any] = field(default_factory=dict)  # scalars for the log

    ARRAYS = ("ids", "offsets", "points", "labels", "flipped_labels", "labels_k", "centroids", "centroids_k",
              "flip_permutation")

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> RoundLabels:
        return cls(**{k: arrays[k] for k in cls.ARRAYS}, stats=dict(stats))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays().values()))


def part_nbytes(part: dict[str, np.ndarray]) -> int:
    """Bytes of a rank's extraction (or any dict of arrays)."""
    return int(sum(np.asarray(a).nbytes for a in part.values()))


def table_layout(image_ids: np.ndarray, all_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids (``all_ids`` ∪ ``image_ids``) and ragged offsets for points sorted by image id."""
    ids = np.unique(np.concatenate([np.asarray(all_ids, np.int64), np.asarray(image_ids, np.int64)]))
    counts = np.bincount(np.searchsorted(ids, image_ids), minlength=len(ids))
    return ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def images_kept_share(offsets: np.ndarray) -> float:
    """Share of the table's images that keep at least one point."""
    counts = np.diff(offsets)
    return float((counts > 0).mean()) if len(counts) else 0.0


def degenerate_warnings(labels: RoundLabels, where: str) -> list[str]:
    """Logs (and returns) what makes a round's labels weak: most images without points,
    clusters without points. The round still trains; the user sees the numbers."""
    n_images = len(labels.ids)
    kept = int(round(images_kept_share(labels.offsets) * n_images))
    n_clusters = len(labels.centroids)
    empty = int((np.bincount(labels.labels, minlength=n_clusters) == 0).sum())
    out = []
    if kept < n_images / 2:
        out.append(f"{where}: only {kept} of {n_images} images keep pseudo-labels (the others sit out; "
                   "a lower stage1.detect_threshold or more training before the round keeps more)")
    if empty:
        out.append(f"{where}: {empty} of {n_clusters} clusters have no points")
    for message in out:
        log.warning(message)
    return out


def final_stats(labels: np.ndarray, offsets: np.ndarray, k: int) -> dict[str, float]:
    """Scalars of the Stage-2 labels (for TensorBoard and the warnings)."""
    return {"points_per_image": float(len(labels) / max(len(offsets) - 1, 1)),
            "cluster_sizes_min": int(np.bincount(labels, minlength=k).min()) if len(labels) else 0,
            "images_kept_share": images_kept_share(offsets)}


def cluster_size_stats(labels: np.ndarray, n_clusters: int) -> dict[str, float]:
    sizes = np.bincount(labels, minlength=n_clusters) if len(labels) else np.zeros(n_clusters, np.int64)
    return {"cluster_size_min": int(sizes.min()), "cluster_size_median": float(np.median(sizes)),
            "cluster_size_max": int(sizes.max())}


def _mirror_fit(points: PointSet, cfg: ClusterConfig) -> bool:
    """Whether the centroids are fitted on the mirrored descriptors too (as the paper's code does)."""
    return cfg.mirror_together and points.has_flipped


def pseudo_labels(points: PointSet, cfg: ClusterConfig) -> RoundLabels:
    """Stage-1 round: M-cluster labels of the usable points (Eq. 1)."""
    ids = points.image_ids
    res = two_way_points(points, cfg.K, cfg.M, cfg, mirror=_mirror_fit(points, cfg))
    use = res.usable
    flipped = res.labels_m[use]
    if points.has_flipped:
        flipped = points.assign(res.centroids_m, use, mirrored=True)[0][use]
    table_ids, offsets = table_layout(ids[use], points.sample_ids)
    stats = res.stats.summary()
    stats.update(cluster_size_stats(res.labels_m[use], cfg.M))
    stats["images_kept_share"] = images_kept_share(offsets)
    stats["points_per_image_extracted"] = len(ids) / max(len(table_ids), 1)
    return RoundLabels(ids=table_ids, offsets=offsets, points=points.points[use].astype(np.float32),
                       labels=res.labels_m[use], flipped_labels=np.asarray(flipped, np.int64),
                       labels_k=res.labels_k[use], centroids=res.centroids_m, centroids_k=res.centroids_k,
                       flip_permutation=np.arange(cfg.K, dtype=np.int64), stats=stats)


def final_labels(points: PointSet, cfg: ClusterConfig) -> RoundLabels:
    """Stage-2 labels: K clusters, ≤ 1 point per cluster per image, flip permutation (Sec. 3.6-3.7)."""
    ids = points.image_ids
    res = cluster_points(points, cfg.K, cfg, mirror=_mirror_fit(points, cfg))
    keep = res.keep
    labels = res.labels[keep]
    perm = np.arange(cfg.K, dtype=np.int64)
    if points.has_flipped:
        flipped = points.assign(res.kmeans.centroids, keep, mirrored=True)[0][keep]
        perm = flip_permutation(labels, flipped, cfg.K)
    table_ids, offsets = table_layout(ids[keep], points.sample_ids)
    stats = final_stats(labels, offsets, cfg.K)
    return RoundLabels(ids=table_ids, offsets=offsets, points=points.points[keep].astype(np.float32),
                       labels=labels, flipped_labels=perm[labels], labels_k=labels,
                       centroids=res.kmeans.centroids, centroids_k=res.kmeans.centroids, flip_permutation=perm,
                       stats=stats)


def recover(kind: str, points: PointSet, cfg: ClusterConfig) -> RoundLabels:
    """``kind`` = ``"round"`` (Stage 1) or ``"final"`` (Stage 2) on a round's points."""
    if points.n == 0:
        raise ValueError(f"{kind} clustering: no image has a detection above stage1.detect_threshold")
    if kind == "round":
        return pseudo_labels(points, cfg)
    if kind == "final":
        return final_labels(points, cfg)
    raise ValueError(f"unknown clustering kind {kind!r} (round | final)")
