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

from k2l_dist.clustering.rounds import merge_parts, recover
from k2l_dist.config import ClusterConfig
from k2l_dist.utils.faults import fault_requested

log = logging.getLogger(__name__)


class ClusteringActor:
    def __init__(self, cfg: dict[str, Any], world_size: int, fault: str = "") -> None:
        import faiss

        self.cfg = ClusterConfig(**cfg)
        self.world_size = world_size
        self.fault = fault
        threads = self.cfg.threads or len(os.sched_getaffinity(0))
        faiss.omp_set_num_threads(threads)
        self._cond = threading.Condition()
        self._parts: dict[str, dict[int, list]] = {}
        self._kinds: dict[str, str] = {}
        self._results: dict[str, tuple[dict, list] | BaseException] = {}
        self._running: set[str] = set()
        self._shards = None

    def ping(self) -> int:
        return os.getpid()

    def submit(self, key: str, rank: int, refs: list, kind: str) -> None:
        """Rank ``rank``'s extraction for ``key`` (``refs``: one reference, wrapped so Ray keeps it a reference)."""
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
        import ray

        round_name = key.split("/")[0]
        if fault_requested(f"actor:{round_name}", spec=self.fault) and \
                not ray.get_runtime_context().was_current_actor_reconstructed:
            os._exit(1)  # injected: the actor's process dies mid-round
        t0 = time.perf_counter()
        refs = [self._parts[key][r][0] for r in range(self.world_size)]
        parts = ray.get(refs)
        part_bytes = sum(int(sum(np.asarray(a).nbytes for a in p.values())) for p in parts)
        t1 = time.perf_counter()
        labels = recover(self._kinds[key], merge_parts(parts), self.cfg)
        del parts
        t2 = time.perf_counter()
        stats = dict(labels.stats)
        stats.update(actor_fetch_seconds=t1 - t0, actor_cluster_seconds=t2 - t1,
                     object_store_round_bytes=float(part_bytes + labels.nbytes))
        return stats, [ray.put(labels.arrays())]
