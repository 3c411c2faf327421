"""Fault injection for tests of failure handling: ``K2L_FAULT=where[@rankR][,…]``.

``where`` names a point in the run, e.g. ``extract:round1`` (a rank raises while
extracting for round 1) or ``actor:round2`` (the clustering actor's process exits while
clustering round 2, once: a recreated actor carries on). Unset in normal runs.
"""

from __future__ import annotations

import os


def fault_requested(where: str, rank: int | None = None, spec: str | None = None) -> bool:
    spec = os.environ.get("K2L_FAULT", "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        target, _, only_rank = item.partition("@rank")
        if target == where and (not only_rank or rank is None or int(only_rank) == rank):
            return True
    return False


def maybe_raise(where: str, rank: int) -> None:
    """Raise at ``where`` when ``K2L_FAULT`` asks for it on this rank."""
    if fault_requested(where, rank):
        raise RuntimeError(f"injected fault (K2L_FAULT) at {where} on rank {rank}")
