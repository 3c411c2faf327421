"""The Ray side of :class:`~k2l_dist.clustering.service.ClusteringService`, in each rank.

Rank 0 checks that some node can host the clustering actor (:mod:`~k2l_dist.clustering.placement`:
its CPUs, GPU, memory and ``cluster.actor_resource``), then creates it (restartable
``cluster.actor_restarts`` times); every rank puts its own extraction into the object
store, submits the reference and reads the round's labels from the object store: no
descriptor goes through torch.distributed. Ranks wait for the actor in short slices and
between them read the other ranks' heartbeats, so a rank lost on another node ends the
wait (and the actor drops the round) instead of holding everyone for
``cluster.round_timeout_s``. A round whose actor died is redone by every rank (they
agree over the gloo group), so the labels are those an undisturbed actor would have
produced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid

import numpy as np

from k2l_dist.clustering.actor import actor_runtime_env, split_part
from k2l_dist.clustering.placement import place
from k2l_dist.clustering.rounds import RoundLabels, part_nbytes
from k2l_dist.config import ClusterConfig
from k2l_dist.distributed import DistInfo, ray_runtime
from k2l_dist.distributed.waits import wait_until
from k2l_dist.distributed.watchdog import PeerLost

ACTOR_START_S = 300.0  # longest wait for a placed actor's process to answer (a runtime_env may install)
_SLICE_S = 2.0  # each wait on Ray, between two looks at the other ranks' heartbeats

log = logging.getLogger(__name__)


class ClusteringFailed(RuntimeError):
    """The clustering actor could not produce a round's labels; the message names the round."""


class RayService:
    def __init__(self, cfg: ClusterConfig, info: DistInfo, connect_timeout_s: float = 60.0) -> None:
        from k2l_dist.distributed import collectives

        self.cfg = cfg
        self.rank = info.rank
        self.world_size = info.world_size
        self.timings: dict[str, float] = {}
        self._closed = False
        # imports ray itself: the auth mode must come first
        ray_runtime.connect(cfg, info.rank, info.single_node, connect_timeout_s)
        import ray

        from k2l_dist.clustering.actor import ClusteringActor

        name = f"k2l-cluster-{uuid.uuid4().hex[:12]}" if info.rank == 0 else None
        if info.rank == 0:
            # no node can host it: fails now, naming the resource and key; with shard holders
            # the actor itself only fits the K-means samples and leaves the free CPUs to them
            placement = place(dataclasses.replace(cfg, actor_cpus=1) if cfg.shards > 1 and not cfg.actor_cpus
                              else cfg)[0]
            options = {"name": name, "namespace": ray_runtime.NAMESPACE, "max_restarts": cfg.actor_restarts,
                       "max_task_retries": 0, "max_concurrency": info.world_size + 4, "lifetime": None,
                       "runtime_env": actor_runtime_env(), **placement.options}
            remote = ray.remote(ClusteringActor)
            self.actor = remote.options(**options).remote(dataclasses.asdict(cfg), info.world_size,
                                                          os.environ.get("K2L_FAULT", ""), placement.threads)
            self.placed = self._wait(self.actor.where.remote(), "the clustering actor to start",
                                     min(cfg.round_timeout_s, ACTOR_START_S))
            log.info("clustering actor on node %s (%s) with %s CPU(s): Faiss runs %d thread(s)",
                     self.placed["ip"], self.placed["node_id"][:12], placement.cpus, self.placed["faiss_threads"])
        if info.world_size > 1:
            name = collectives.broadcast_json(name)
            if info.rank != 0:
                self.actor = ray.get_actor(name, namespace=ray_runtime.NAMESPACE)

    def _wait(self, ref, what: str, timeout_s: float):
        """``ray.get(ref)``, waited for in slices while watching the other ranks."""
        import ray

        wait_until(lambda: bool(ray.wait([ref], timeout=_SLICE_S)[0]), what, timeout_s, poll_s=0)
        return ray.get(ref)

    def recover(self, kind: str, part: dict[str, np.ndarray], key: str) -> RoundLabels:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from k2l_dist.distributed.collectives import all_ranks_true

        attempts = self.cfg.actor_restarts + 1
        for attempt in range(attempts):
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                refs = [ray.put(half) for half in split_part(part)]  # kept alive until the labels are read
                self.actor.submit.remote(f"{key}/try{attempt}", self.rank, refs, kind)
                t1 = time.perf_counter()
                pending = self.actor.result.remote(f"{key}/try{attempt}", self.cfg.round_timeout_s)
                stats, (labels_ref,) = self._wait(pending, f"{key}: the clustering round",
                                                  self.cfg.round_timeout_s + 60)
                t2 = time.perf_counter()
                arrays = ray.get(labels_ref)
                t3 = time.perf_counter()
            except PeerLost as lost:
                self._drop(f"{key}/try{attempt}", str(lost))
                raise
            except (RayActorError, GetTimeoutError, TimeoutError) as err:
                error = err
            if all_ranks_true(error is None):
                self.timings = {"submit_seconds": t1 - t0, "cluster_seconds": t2 - t1, "broadcast_seconds": t3 - t2,
                                "bytes_sent": float(part_nbytes(part))}
                self.timings.update({k: float(v) for k, v in stats.items() if k.startswith(("actor_", "object_"))})
                return RoundLabels.from_arrays(arrays, {k: v for k, v in stats.items()
                                                        if not k.startswith(("actor_", "object_"))})
            reason = f"{type(error).__name__}: {error}" if error is not None else "another rank lost the actor"
            if attempt + 1 == attempts:
                raise ClusteringFailed(f"clustering failed in {key} after {attempts} attempt(s) "
                                       f"(cluster.actor_restarts={self.cfg.actor_restarts}): {reason}")
            log.warning("clustering actor lost in %s (%s); redoing the round, attempt %d of %d",
                        key, reason.splitlines()[0], attempt + 2, attempts)
            self._await_restart(min(self.cfg.round_timeout_s, 300.0))
        raise AssertionError("unreachable")

    def _drop(self, key: str, why: str) -> None:
        """Tell the actor to give up round ``key`` (best effort: it may be gone too)."""
        try:
            self.actor.drop.remote(key, why)
        except Exception:  # noqa: BLE001 - nothing more to do for a dead actor
            pass

    def _await_restart(self, limit_s: float) -> None:
        """Until the restarted actor answers: its new process (started with its own
        environment, not taken from Ray's pool of idle workers) can take seconds."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor.ping.remote(), timeout=10)
                return
            except (ActorUnavailableError, GetTimeoutError):
                time.sleep(0.5)  # still restarting
            except RayActorError:
                return  # gone for good: the next attempt fails and names the round

    def close(self, clean: bool = True) -> None:
        from k2l_dist.distributed import barrier

        if self._closed:
            return
        self._closed = True
        if not clean:  # a failing job: no collective that could wait on a dead rank
            ray_runtime.disconnect()
            return
        barrier()  # every rank is done with the actor
        if self.rank != 0:
            ray_runtime.disconnect()
        barrier()  # rank 0 stops a Ray it started only after the others left
        if self.rank == 0:
            import ray

            try:
                ray.kill(self.actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
            ray_runtime.disconnect()

