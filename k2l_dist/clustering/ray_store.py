"""The Ray transport of a :class:`~k2l_dist.clustering.store.DescriptorStore`: holders as actors.

With ``cluster.shards = N > 1`` the clustering actor cuts the round's rows (the ranks'
parts in rank order) into N contiguous runs of about equal size, never inside an
image, and starts one :class:`PartHolder` actor per run. Each holder reads only the
parts its run touches from the object store, so no process holds every descriptor;
the K-means samples, the nearest-centroid labels and distances are all that travel
back. The algorithm is the one of a single process (:mod:`k2l_dist.clustering.rounds`
on the same :class:`~k2l_dist.clustering.store.PointSet`), so 1 or N holders give the
same labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from k2l_dist.clustering.store import DescriptorStore, SegmentHolder

_PUT_BYTES = 65536  # arguments at least this large go to the object store once, not once per holder


class PartHolder(SegmentHolder):
    """A holder whose segments are runs of the ranks' payloads in the object store.

    ``payload_refs[0][p]``: rank part p's payload (wrapped in a list so Ray passes the
    references unresolved); ``pieces``: ``(part, first row, end row)`` of each segment.
    """

    def __init__(self, payload_refs: list, pieces: Sequence[tuple[int, int, int]], threads: int | None,
                 use_gpu: bool) -> None:
        import ray

        needed = sorted({p for p, _, _ in pieces})
        payloads = dict(zip(needed, ray.get([payload_refs[0][p] for p in needed])))
        segments = [{k: v[a:b] for k, v in payloads[p].items()} for p, a, b in pieces]
        super().__init__(segments, threads=threads, use_gpu=use_gpu)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def call_ray(holders: Sequence[Any], method: str, args: Sequence[tuple]) -> list:
    """``method(*args[i])`` on actor i, every call out at once, then one ``ray.get``."""
    import ray

    shared: dict[int, Any] = {}

    def put(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.nbytes >= _PUT_BYTES:
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]
        return value

    return ray.get([getattr(h, method).remote(*(put(v) for v in a)) for h, a in zip(holders, args)])


def plan_runs(part_image_ids: Sequence[np.ndarray], n_runs: int) -> list[list[tuple[int, int, int]]]:
    """Cut the parts' rows (in part order) into ``n_runs`` contiguous runs of about equal size.

    A cut falls only where a part ends or the image id changes inside a part (a part keeps
    each image's points together), at the allowed position nearest an equal share. Each
    run is a list of ``(part, first row, end row)`` pieces; a run may be empty when there
    are fewer images than runs.
    """
    if n_runs < 1:
        raise ValueError(f"n_runs must be >= 1, got {n_runs}")
    sizes = [len(ids) for ids in part_image_ids]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    allowed = [starts]
    for p, ids in enumerate(part_image_ids):
        ids = np.asarray(ids, np.int64)
        allowed.append(starts[p] + np.flatnonzero(ids[1:] != ids[:-1]) + 1)
    allowed = np.unique(np.concatenate(allowed))
    total = int(starts[-1])
    targets = np.arange(1, n_runs) * total / n_runs
    right = np.clip(np.searchsorted(allowed, targets), 0, len(allowed) - 1)
    left = np.clip(right - 1, 0, len(allowed) - 1)
    nearer_left = targets - allowed[left] <= allowed[right] - targets
    cuts = np.maximum.accumulate(np.where(nearer_left, allowed[left], allowed[right]))
    edges = np.concatenate([[0], cuts, [total]]).astype(np.int64)
    runs = []
    for a, b in zip(edges[:-1], edges[1:]):
        pieces = []
        for p in range(len(sizes)):
            lo, hi = max(a, starts[p]), min(b, starts[p + 1])
            if hi > lo:
                pieces.append((p, int(lo - starts[p]), int(hi - starts[p])))
        runs.append(pieces)
    return runs


def remote_store(payload_refs: list, part_image_ids: Sequence[np.ndarray], options: Sequence[dict[str, Any]],
                 threads: Sequence[int], use_gpu: bool) -> tuple[DescriptorStore, list]:
    """One PartHolder actor per entry of ``options`` (its Ray options; ``threads``: its Faiss
    threads) over runs of the parts; the store and the actors (killed by the caller)."""
    import ray

    runs = plan_runs(part_image_ids, len(options))
    remote = ray.remote(PartHolder)
    holders = [remote.options(**opt).remote([payload_refs], run, n, use_gpu)
               for run, opt, n in zip(runs, options, threads) if run]
    infos = ray.get([h.info.remote() for h in holders])
    return DescriptorStore.from_holders(holders, infos, call_ray), holders
