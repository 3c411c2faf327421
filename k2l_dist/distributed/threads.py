"""Threads per process: the cores this process may use divided by the ranks on its node.

Two torch processes at default thread counts on two cores thrash (a 6.9 s step took
589 s), so every pool (torch intra/inter-op, OpenMP, Faiss, DALI) is sized before it
starts.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_pinned: int | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def threads_per_process(requested: int = 0) -> int:
    """``requested`` when > 0, else what :func:`pin_threads` chose, else cores / local ranks."""
    if requested > 0:
        return requested
    if _pinned is not None:
        return _pinned
    return max(1, available_cores() // local_world_size())


def pin_threads(requested: int = 0) -> int:
    """Size torch, OpenMP and Faiss pools for this process; warn when the node is oversubscribed."""
    global _pinned
    import torch

    n = threads_per_process(requested)
    cores, ranks = available_cores(), local_world_size()
    if n * ranks > cores:
        log.warning("%d threads per process × %d processes on this node > %d cores: steps will thrash "
                    "(dist.threads=0 picks cores / processes)", n, ranks, cores)
    os.environ["OMP_NUM_THREADS"] = str(n)  # worker processes started later inherit it
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first inter-op use; keep what is there
        pass
    import faiss

    faiss.omp_set_num_threads(n)
    _pinned = n
    return n
