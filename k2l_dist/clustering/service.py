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
processes train on one node or ``RAY_ADDRESS`` names a cluster, else inline).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import numpy as np

from k2l_dist.clustering.rounds import RoundLabels, part_nbytes, recover
from k2l_dist.clustering.store import DescriptorStore, PointSet
from k2l_dist.config import ClusterConfig, ServiceChoice

if TYPE_CHECKING:
    from k2l_dist.distributed import DistInfo

log = logging.getLogger(__name__)


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
    """The parts clustered where they are: their descriptors are never concatenated."""
    return recover(kind, PointSet.from_parts(parts, DescriptorStore.local(parts, use_gpu=cfg.use_gpu)), cfg)


def service_choice(cfg: ClusterConfig, info: DistInfo) -> Literal["inline", "ray"]:
    """``inline`` or ``ray`` for this job; a choice that cannot work fails here, before any work."""
    ray_cluster = bool(os.environ.get("RAY_ADDRESS"))
    choice = cfg.service
    if choice == "auto":
        choice = "ray" if info.world_size > 1 and (info.single_node or ray_cluster) else "inline"
    if choice == "ray" and not info.single_node and not ray_cluster:
        raise ValueError("cluster.service=ray across several nodes needs RAY_ADDRESS (a Ray cluster every node has "
                         "joined, e.g. launch/ray_submit.sh), or cluster.service=inline")
    if choice == "inline" and cfg.shards > 1:
        raise ValueError("cluster.shards > 1 needs cluster.service=ray (shard actors on several nodes)")
    if choice not in ("inline", "ray"):
        raise ValueError(f"cluster.service={cfg.service!r}: use one of {', '.join(get_args(ServiceChoice))}")
    return choice


def make_service(cfg: ClusterConfig, info: DistInfo, connect_timeout_s: float = 60.0) -> ClusteringService:
    """The service :func:`service_choice` picks for this job (``info``: the rank's DistInfo;
    ``connect_timeout_s``: the longest wait for a Ray cluster to answer)."""
    if service_choice(cfg, info) == "inline":
        return InlineService(cfg, info.world_size)
    from k2l_dist.clustering.ray_service import RayService

    return RayService(cfg, info, connect_timeout_s)
