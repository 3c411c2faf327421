"""The clustering actor: a Ray actor (torch-free) that turns every rank's extraction into
one round's pseudo-labels.

Each rank ``ray.put``s its extraction and :meth:`ClusteringActor.submit`s the reference;
the first :meth:`ClusteringActor.result` call after the last submission orders the
points canonically, clusters them with Faiss (on every GPU the actor sees, else on its
CPUs; over shard holders when ``cluster.shards > 1``) and puts the labels into the
object store once; every rank reads that one object. The descriptors are read in place
from the object store (:class:`~k2l_dist.clustering.store.PointSet`), never copied
whole. Threaded (not async): calls wait on a condition while the clustering runs
outside the lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

from k2l_dist.clustering.placement import place
from k2l_dist.clustering.ray_store import remote_store
from k2l_dist.clustering.rounds import RoundLabels, part_nbytes, recover
from k2l_dist.clustering.store import INDEX_KEYS, DescriptorStore, PointSet
from k2l_dist.config import ClusterConfig
from k2l_dist.utils.allocator import ENV_KEYS, EXPORTED_BYTES, allocator_state
from k2l_dist.utils.faults import fault_requested
from k2l_dist.utils.memory import PrivatePeak, peak_rss_bytes, resident_bytes

# A rank's extraction travels as two objects: the index (ids, positions, scores: all
# the coordinator reads) and the descriptors (read only by whoever assigns those points).
ID_KEYS = ("sample_ids", *INDEX_KEYS)


def split_part(part: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return ({k: part[k] for k in ID_KEYS}, {k: v for k, v in part.items() if k not in ID_KEYS})


def actor_runtime_env() -> dict[str, dict[str, str]]:
    """The clustering processes' allocator, set at their start wherever Ray places them.

    The actor clusters in a pool thread, and glibc gives each thread its own arena, which
    serves gigabyte arrays by mmap and unmaps them when freed: every round's copies then
    fault their pages in again (1.7 s per GB on a 2-core AMD EPYC VM). One arena and no
    mmap/trim threshold keep the freed memory for the next round, as in a training rank.
    """
    # the environment's values only when the user exported them: the package's own (mallopt's
    # int limit, 2 GiB) would send a round's larger arrays back to mmap
    users = allocator_state() == "environment"
    return {"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("K2L_ACTOR_MALLOC_ARENA_MAX", "1"),
                         **{key: os.environ.get(key, EXPORTED_BYTES) if users else EXPORTED_BYTES for key in ENV_KEYS}}}

log = logging.getLogger(__name__)


class ClusteringDropped(RuntimeError):
    """A round given up because some of its ranks have gone."""


class ClusteringActor:
    def __init__(self, cfg: dict[str, Any], world_size: int, fault: str = "", threads: int = 0) -> None:
        """``threads``: the CPUs Ray gave this actor (``cluster.threads`` overrides; 0 = this node's cores)."""
        import faiss

        self.cfg = ClusterConfig(**cfg)
        self.world_size = world_size
        self.fault = fault
        self.threads = self.cfg.threads or threads or len(os.sched_getaffinity(0))
        faiss.omp_set_num_threads(self.threads)
        self._cond = threading.Condition()
        self._parts: dict[str, dict[int, list]] = {}
        self._kinds: dict[str, str] = {}
        self._results: dict[str, tuple[dict, list] | BaseException] = {}
        self._running: set[str] = set()

    def ping(self) -> int:
        return os.getpid()

    def submit(self, key: str, rank: int, refs: list, kind: str) -> None:
        """Rank ``rank``'s extraction for ``key``: ``refs`` = [ids, payload] object references
        (:func:`split_part`), in a list so that Ray hands them over unresolved."""
        with self._cond:
            if key not in self._parts:
                # A new round: every rank has read the previous one (DDP keeps ranks in step).
                self._results = {k: v for k, v in self._results.items() if k == key}
            self._parts.setdefault(key, {})[rank] = refs
            self._kinds[key] = kind
            self._cond.notify_all()

    def drop(self, key: str, why: str) -> None:
        """Give up round ``key`` (its ranks have gone): its parts are released, waiters told why."""
        with self._cond:
            self._parts.pop(key, None)
            if key not in self._results:
                self._results[key] = ClusteringDropped(f"{key} dropped: {why}")
            self._cond.notify_all()

    def result(self, key: str, timeout: float) -> tuple[dict, list]:
        """``(stats, [labels_ref])`` once every rank has submitted ``key``; TimeoutError after ``timeout`` s."""
        with self._cond:
            ready = self._cond.wait_for(lambda: key in self._results or key not in self._running
                                        and len(self._parts.get(key, {})) == self.world_size, timeout)
            if not ready:
                got = sorted(self._parts.get(key, {}))
                raise TimeoutError(f"{key}: only ranks {got} of {self.world_size} submitted within {timeout:.0f} s")
            if key not in self._results:
                self._running.add(key)
                compute = True
            else:
                compute = False
        if compute:
            try:
                out: tuple[dict, list] | BaseException = self._compute(key)
            except Exception as err:  # noqa: BLE001 - handed to every waiting rank
                out = err
            with self._cond:
                self._results[key] = out
                self._running.discard(key)
                self._parts.pop(key, None)
                self._cond.notify_all()
        with self._cond:
            self._cond.wait_for(lambda: key in self._results)
            out = self._results[key]
        if isinstance(out, BaseException):
            raise out
        return out

    def _compute(self, key: str) -> tuple[dict, list]:
        import faiss
        import ray

        # OpenMP's thread count is per calling thread, and Ray starts actors with
        # OMP_NUM_THREADS=1: this method runs in one of the actor's pool threads, not in
        # __init__'s, so without this Faiss ran on one core here.
        faiss.omp_set_num_threads(self.threads)

        round_name = key.split("/")[0]
        if fault_requested(f"actor:{round_name}", spec=self.fault) and \
                not ray.get_runtime_context().was_current_actor_reconstructed:
            os._exit(1)  # injected: the actor's process dies mid-round
        t0 = time.perf_counter()
        with PrivatePeak() as private:
            labels, part_bytes, holders, held, t1 = self._cluster(key)
        t2 = time.perf_counter()
        resident = resident_bytes()
        stats = dict(labels.stats)
        stats.update(actor_fetch_seconds=t1 - t0, actor_cluster_seconds=t2 - t1,
                     object_store_round_bytes=float(part_bytes + labels.nbytes), object_store_used_bytes=held,
                     actor_peak_rss_bytes=peak_rss_bytes(), actor_private_peak_bytes=private.peak,
                     actor_shared_resident_bytes=resident.get("shmem", float("nan")),
                     actor_faiss_threads=float(faiss.omp_get_max_threads()),
                     actor_malloc_arena_max=float(os.environ.get("MALLOC_ARENA_MAX", "0")),
                     actor_holders=float(max(1, holders)))
        return stats, [ray.put(labels.arrays())]

    def _cluster(self, key: str) -> tuple[RoundLabels, int, int, float, float]:
        """Round ``key``'s labels, its bytes, the holders used, the object store's bytes in use
        and when the parts were in place."""
        import ray

        ids = ray.get([self._parts[key][r][0] for r in range(self.world_size)])
        payload_refs = [self._parts[key][r][1] for r in range(self.world_size)]
        holders: list = []
        try:
            if self.cfg.shards > 1:
                placements = place(self.cfg, count=self.cfg.shards)
                store, holders = remote_store(payload_refs, [i["image_ids"] for i in ids],
                                              [p.options | {"runtime_env": actor_runtime_env()} for p in placements],
                                              [self.cfg.threads or p.threads for p in placements], self.cfg.use_gpu)
            else:
                store = DescriptorStore.local(ray.get(payload_refs), use_gpu=self.cfg.use_gpu)
            points = PointSet.from_parts(ids, store)
            t1 = time.perf_counter()
            held = object_store_used_bytes()
            labels = recover(self._kinds[key], points, self.cfg)
        finally:
            for holder in holders:
                ray.kill(holder)
        return labels, sum(part_nbytes(i) for i in ids) + store.nbytes, len(holders), held, t1

    def where(self) -> dict[str, Any]:
        """The node this actor runs on and the threads its Faiss uses."""
        import faiss
        import ray

        faiss.omp_set_num_threads(self.threads)
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "faiss_threads": int(faiss.omp_get_max_threads()), "cpus": self.threads}


def object_store_used_bytes() -> float:
    """Bytes the cluster's object stores hold right now (all nodes; NaN when Ray does not say)."""
    try:
        from ray._private import state
        from ray._private.internal_api import get_memory_info_reply

        return float(get_memory_info_reply(state.state).store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - a private Ray API: the number is a report, never required
        return float("nan")
