"""The clustering actor: a Ray actor (torch-free) that turns every rank's extraction into
one round's pseudo-labels.

Each rank ``ray.put``s its extraction and :meth:`ClusteringActor.submit`s the reference;
the first :meth:`ClusteringActor.result` call after the last submission merges the parts
in canonical order, clusters them with Faiss (on every GPU the actor sees, else on
CPU; over shard actors when ``cluster.shards > 1``) and puts the labels into the
object store once; every rank reads that one object. Threaded (not async): calls
wait on a condition while the clustering runs outside the lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

from k2l_dist.clustering.rounds import PART_KEYS, RoundLabels, merge_parts, part_nbytes, recover
from k2l_dist.clustering.sharded import (
    DescriptorShard,
    ShardGroup,
    canonical_slices,
    sharded_final_labels,
    sharded_pseudo_labels,
)
from k2l_dist.config import ClusterConfig
from k2l_dist.utils.faults import fault_requested
from k2l_dist.utils.memory import peak_rss_bytes

# A rank's extraction travels as two objects: the ids (all the coordinator reads) and
# the payload (read only by whoever clusters those points).
ID_KEYS = ("image_ids", "sample_ids")


def split_part(part: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return ({k: part[k] for k in ID_KEYS}, {k: v for k, v in part.items() if k not in ID_KEYS})


def actor_runtime_env() -> dict[str, dict[str, str]]:
    """The clustering processes' allocator, set at their start wherever Ray places them.

    The actor clusters in a pool thread, and glibc gives each thread its own arena, which
    serves gigabyte arrays by mmap and unmaps them when freed: every round's copies then
    fault their pages in again (1.7 s per GB on the project's VM). One arena and no
    mmap/trim threshold keep the freed memory for the next round, as in a training rank.
    """
    big = "17179869184"
    return {"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("K2L_ACTOR_MALLOC_ARENA_MAX", "1"),
                         "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", big),
                         "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", big)}}

log = logging.getLogger(__name__)


class ClusteringActor:
    def __init__(self, cfg: dict[str, Any], world_size: int, fault: str = "") -> None:
        import faiss

        self.cfg = ClusterConfig(**cfg)
        self.world_size = world_size
        self.fault = fault
        self.threads = self.cfg.threads or len(os.sched_getaffinity(0))
        faiss.omp_set_num_threads(self.threads)
        self._cond = threading.Condition()
        self._parts: dict[str, dict[int, list]] = {}
        self._kinds: dict[str, str] = {}
        self._results: dict[str, tuple[dict, list] | BaseException] = {}
        self._running: set[str] = set()
        self._shards = None

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
        id_refs = [self._parts[key][r][0] for r in range(self.world_size)]
        payload_refs = [self._parts[key][r][1] for r in range(self.world_size)]
        ids = ray.get(id_refs)
        if self.cfg.shards > 1:
            labels, part_bytes = self._sharded(self._kinds[key], ids, payload_refs)
            t1 = t0
        else:
            payloads = ray.get(payload_refs)
            part_bytes = sum(part_nbytes(p) for p in ids + payloads)
            t1 = time.perf_counter()
            labels = recover(self._kinds[key], merge_parts([{**i, **p} for i, p in zip(ids, payloads)]), self.cfg)
            del payloads
        t2 = time.perf_counter()
        stats = dict(labels.stats)
        stats.update(actor_fetch_seconds=t1 - t0, actor_cluster_seconds=t2 - t1,
                     object_store_round_bytes=float(part_bytes + labels.nbytes), actor_peak_rss_bytes=peak_rss_bytes(),
                     actor_faiss_threads=float(faiss.omp_get_max_threads()),
                     actor_malloc_arena_max=float(os.environ.get("MALLOC_ARENA_MAX", "0")))
        return stats, [ray.put(labels.arrays())]

    def _sharded(self, kind: str, ids: list[dict], payload_refs: list) -> tuple[RoundLabels, int]:
        """Cluster over ``cfg.shards`` shard actors spread over the nodes; each gathers its
        own rows from the ranks' payloads, so no process holds every descriptor."""
        import ray

        all_ids = np.unique(np.concatenate([i["sample_ids"] for i in ids]))
        if len(all_ids) != sum(len(i["sample_ids"]) for i in ids):
            raise ValueError("an image was extracted by two ranks: rank slices must be disjoint")
        slices = canonical_slices([i["image_ids"] for i in ids], self.cfg.shards)
        if any(len(part) == 0 for part, _ in slices):
            raise ValueError(f"cluster.shards={self.cfg.shards} is more than the images with points allow")
        remote = ray.remote(PartShard).options(num_cpus=0, scheduling_strategy="SPREAD",
                                               num_gpus=1 if self.cfg.use_gpu else 0, runtime_env=actor_runtime_env())
        shards = [remote.remote([payload_refs], [i["image_ids"] for i in ids], part, row, self.cfg.threads or None,
                                self.cfg.use_gpu) for part, row in slices]
        try:
            group = ShardGroup.ray(shards)
            part_bytes = int(sum(group.run("nbytes")))
            fn = sharded_pseudo_labels if kind == "round" else sharded_final_labels
            return fn(group, self.cfg, all_ids), part_bytes
        finally:
            for shard in shards:
                ray.kill(shard)


class PartShard(DescriptorShard):
    """A descriptor shard that gathers its rows from the ranks' payloads in the object store.

    ``part[i]``, ``row[i]``: the rank part and row of the shard's i-th point, in canonical
    order (:func:`~k2l_dist.clustering.sharded.canonical_slices`).
    """

    def __init__(self, payload_refs: list, part_image_ids: list[np.ndarray], part: np.ndarray, row: np.ndarray,
                 threads: int | None, use_gpu: bool) -> None:
        import ray

        needed = np.unique(part).tolist()
        payloads = dict(zip(needed, ray.get([payload_refs[0][i] for i in needed])))
        arrays = {"image_ids": np.zeros(len(part), np.int64)}
        keys = [k for k in PART_KEYS if k in (payloads[needed[0]] if needed else {})]
        for key in keys:
            sample = payloads[needed[0]][key]
            arrays[key] = np.empty((len(part), *sample.shape[1:]), sample.dtype)
        for p in needed:
            at = part == p
            arrays["image_ids"][at] = np.asarray(part_image_ids[p])[row[at]]
            for key in keys:
                arrays[key][at] = payloads[p][key][row[at]]
        del payloads
        super().__init__(arrays, threads=threads, use_gpu=use_gpu)
        self._nbytes = part_nbytes(arrays)

    def nbytes(self) -> int:
        return self._nbytes
