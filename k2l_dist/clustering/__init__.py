"""Correspondence recovery: faiss K-means, per-image dedup, two-way clustering, flip map."""

from k2l_dist.clustering.flip import flip_count_matrix, flip_permutation, is_involution
from k2l_dist.clustering.kmeans import (
    ClusterConfig,
    ClusterDedupResult,
    ClusterStats,
    KMeansResult,
    TwoWayResult,
    assign,
    assign_flipped,
    cluster_dedup,
    dedup_per_image,
    kmeans,
    two_way_cluster,
)

__all__ = [
    "ClusterConfig",
    "ClusterDedupResult",
    "ClusterStats",
    "KMeansResult",
    "TwoWayResult",
    "assign",
    "assign_flipped",
    "cluster_dedup",
    "dedup_per_image",
    "flip_count_matrix",
    "flip_permutation",
    "is_involution",
    "kmeans",
    "two_way_cluster",
]
