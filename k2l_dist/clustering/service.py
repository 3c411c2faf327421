"""The one clustering interface the training loop sees: a rank's extraction in, the
round's pseudo-labels (for every image) out.

Every rank calls :meth:`ClusteringService.recover` with the points and descriptors it
extracted from its own slice of the dataset; every rank gets the same
:class:`~k2l_dist.clustering.rounds.RoundLabels`. Two implementations:

* :class:`InlineService` — the reference: the slices travel to rank 0 as raw tensors
  over the gloo group, rank 0 clusters, the labels are broadcast back;
* :class:`~k2l_dist.clustering.ray_service.RayService` — a Ray actor reads the slices
  from Ray's object store and clusters them with Faiss (sharded over nodes if asked).

``cluster.service`` picks one: ``inline``, ``ray``, or ``auto`` (ray when several
processes train, inline for one).
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from k2l_dist.clustering.rounds import RoundLabels, merge_parts, part_nbytes, recover
from k2l_dist.config import ClusterConfig


class ClusteringService(Protocol):
    timings: dict[str, float]  # the last call's seconds and bytes, for the log

    def recover(self, kind: str, part: dict[str, np.ndarray], key: str) -> RoundLabels:
        """``kind``: ``round`` (Stage 1) or ``final`` (Stage 2); ``key`` names the round in messages."""
        ...

    def close(self, clean: bool = True) -> None:
        """Release the service (idempotent); ``clean=False`` after a failure: no collective."""
        ...


class InlineService:
    """Gather to rank 0 over gloo, cluster there, broadcast the labels back."""

    def __init__(self, cfg: ClusterConfig, world_size: int) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.timings: dict[str, float] = {}

    def recover(self, kind: str, part: dict[str, np.ndarray], key: str) -> RoundLabels:
        t0 = time.perf_counter()
        if self.world_size == 1:
            labels = _cluster([part], kind, self.cfg)
            self.timings = {"cluster_seconds": time.perf_counter() - t0, "bytes_sent": 0.0,
                            "broadcast_seconds": 0.0}
            return labels
        from k2l_dist.distributed import collectives

        parts = collectives.gather_to_main(part)
        t1 = time.perf_counter()
        labels = _cluster(parts, kind, self.cfg) if parts is not None else None
        t2 = time.perf_counter()
        stats = collectives.broadcast_json(labels.stats if labels is not None else None)
        arrays = collectives.broadcast_arrays(labels.arrays() if labels is not None else None)
        t3 = time.perf_counter()
        self.timings = {"gather_seconds": t1 - t0, "cluster_seconds": t2 - t1, "broadcast_seconds": t3 - t2,
                        "bytes_sent": float(part_nbytes(part))}
        return RoundLabels.from_arrays(arrays, stats)

    def close(self, clean: bool = True) -> None:
        pass


def _cluster(parts: list[dict[str, np.ndarray]], kind: str, cfg: ClusterConfig) -> RoundLabels:
    merged = merge_parts(parts)
    return recover(kind, merged, cfg)


def make_service(cfg: ClusterConfig, info) -> ClusteringService:
    """The service ``cfg.service`` names for this job (``info``: the rank's DistInfo)."""
    choice = cfg.service
    if choice == "auto":
        choice = "ray" if info.world_size > 1 else "inline"
    if choice == "inline":
        if cfg.shards > 1:
            raise ValueError("cluster.shards > 1 needs cluster.service=ray (shard actors on several nodes)")
        return InlineService(cfg, info.world_size)
    if choice == "ray":
        from k2l_dist.clustering.ray_service import RayService

        return RayService(cfg, info)
    raise ValueError(f"cluster.service={cfg.service!r}: use auto, ray or inline")
