"""One round of correspondence recovery, from rank extractions to pseudo-labels.

Ranks extract disjoint slices of the dataset. :func:`merge_parts` puts their points in
one canonical order (image id, then the point's order within its image), so the result
never depends on the world size or on which rank arrived first. On the merged arrays:

* :func:`pseudo_labels` — a Stage-1 round (Sec. 3.3): the modified two-way K-means,
  M-cluster labels for the usable points and, for the flip correspondence (Sec. 3.7),
  the M-cluster of each point's mirrored descriptor;
* :func:`final_labels` — Stage 2 (Sec. 3.6-3.7): a last K-means to K with ≤ 1 point per
  cluster per image, and the K↔K flip permutation.

Both return :class:`RoundLabels`, already laid out like a label table (sorted ids, ragged
offsets), so a rank can use arrays read from Ray's object store without copying them.
Everything here is numpy + Faiss: it runs inside the torch-free clustering actor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k2l_dist.clustering.flip import flip_permutation
from k2l_dist.clustering.kmeans import assign, cluster_dedup, two_way_cluster
from k2l_dist.config import ClusterConfig

log = logging.getLogger(__name__)

# Per point, plus ``sample_ids``: every image the rank extracted, with or without points.
PART_KEYS = ("image_ids", "points", "scores", "descriptors", "flipped_descriptors")


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


def merge_parts(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate rank extractions in canonical order: image id, then point order in the image.

    Each image must come from exactly one part (ranks extract disjoint slices); an image
    seen in two parts is an error, since its points would count twice.
    """
    if not parts:
        raise ValueError("no extraction to merge")
    keys = [k for k in PART_KEYS if k in parts[0]]
    for i, part in enumerate(parts):
        if sorted(part) != sorted([*keys, "sample_ids"]):
            raise ValueError(f"extraction part {i} has keys {sorted(part)}, expected {sorted([*keys, 'sample_ids'])}")
    every = np.concatenate([np.asarray(p["sample_ids"], np.int64) for p in parts])
    if len(np.unique(every)) != len(every):
        raise ValueError("an image was extracted by two ranks: rank slices must be disjoint")
    # Rank slices are usually contiguous id ranges: copy (and reorder) only when needed.
    merged = {k: np.asarray(parts[0][k]) if len(parts) == 1 else np.concatenate([np.asarray(p[k]) for p in parts])
              for k in keys}
    ids = merged["image_ids"]
    if len(ids) and (np.diff(ids) < 0).any():
        order = np.argsort(ids, kind="stable")  # stable: keeps in-image order
        merged = {k: np.ascontiguousarray(v[order]) for k, v in merged.items()}
    merged["sample_ids"] = np.sort(every)
    return merged


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


def _mirror_fit(merged: dict[str, np.ndarray], cfg: ClusterConfig) -> np.ndarray | None:
    """The mirrored descriptors, when the centroids are fitted on them too (as the paper's code does)."""
    return merged.get("flipped_descriptors") if cfg.mirror_together else None


def pseudo_labels(merged: dict[str, np.ndarray], cfg: ClusterConfig, all_ids: np.ndarray) -> RoundLabels:
    """Stage-1 round on canonical arrays: M-cluster labels of the usable points (Eq. 1)."""
    ids = merged["image_ids"]
    res = two_way_cluster(merged["descriptors"], ids, cfg.K, cfg.M, cfg, fit_also=_mirror_fit(merged, cfg))
    use = res.usable
    flipped = res.labels_m[use]
    if "flipped_descriptors" in merged:
        flipped, _ = assign(merged["flipped_descriptors"][use], res.centroids_m, use_gpu=cfg.use_gpu)
    table_ids, offsets = table_layout(ids[use], all_ids)
    stats = res.stats.summary()
    stats.update(cluster_size_stats(res.labels_m[use], cfg.M))
    stats["images_kept_share"] = images_kept_share(offsets)
    stats["points_per_image_extracted"] = len(ids) / max(len(table_ids), 1)
    return RoundLabels(ids=table_ids, offsets=offsets, points=merged["points"][use].astype(np.float32),
                       labels=res.labels_m[use], flipped_labels=np.asarray(flipped, np.int64),
                       labels_k=res.labels_k[use], centroids=res.centroids_m, centroids_k=res.centroids_k,
                       flip_permutation=np.arange(cfg.K, dtype=np.int64), stats=stats)


def final_labels(merged: dict[str, np.ndarray], cfg: ClusterConfig, all_ids: np.ndarray) -> RoundLabels:
    """Stage-2 labels: K clusters, ≤ 1 point per cluster per image, flip permutation (Sec. 3.6-3.7)."""
    ids = merged["image_ids"]
    res = cluster_dedup(merged["descriptors"], ids, cfg.K, cfg, fit_also=_mirror_fit(merged, cfg))
    keep = res.keep
    labels = res.labels[keep]
    perm = np.arange(cfg.K, dtype=np.int64)
    if "flipped_descriptors" in merged:
        flipped, _ = assign(merged["flipped_descriptors"][keep], res.kmeans.centroids, use_gpu=cfg.use_gpu)
        perm = flip_permutation(labels, flipped, cfg.K)
    table_ids, offsets = table_layout(ids[keep], all_ids)
    stats = final_stats(labels, offsets, cfg.K)
    return RoundLabels(ids=table_ids, offsets=offsets, points=merged["points"][keep].astype(np.float32),
                       labels=labels, flipped_labels=perm[labels], labels_k=labels,
                       centroids=res.kmeans.centroids, centroids_k=res.kmeans.centroids, flip_permutation=perm,
                       stats=stats)


def recover(kind: str, merged: dict[str, np.ndarray], cfg: ClusterConfig) -> RoundLabels:
    """``kind`` = ``"round"`` (Stage 1) or ``"final"`` (Stage 2) on :func:`merge_parts` output."""
    if len(merged["image_ids"]) == 0:
        raise ValueError(f"{kind} clustering: no image has a detection above stage1.detect_threshold")
    if kind == "round":
        return pseudo_labels(merged, cfg, merged["sample_ids"])
    if kind == "final":
        return final_labels(merged, cfg, merged["sample_ids"])
    raise ValueError(f"unknown clustering kind {kind!r} (round | final)")
