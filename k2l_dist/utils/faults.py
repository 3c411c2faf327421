"""Fault injection for tests of failure handling: ``K2L_FAULT=where[@rankR][,…]``.

``where`` names a point in the run: ``start`` (a rank raises before it joins the job),
``extract:round1`` (a rank raises while extracting
for round 1), ``actor:round2`` (the clustering actor's process exits while clustering
round 2, once: a recreated actor carries on), ``nan:round2`` (the first loss of round 2
becomes NaN), ``kill:round1:15`` / ``stop:round1:15`` (after step 15 of round 1 the
rank SIGKILLs itself / raises, once per run folder, so that a restarted or resumed run
gets past it; ``kill:extract-round2:1`` does so at batch 1 of round 2's extraction),
``hang:round1:5`` (before step 5 of round 1 the rank stops making progress, to test the
watchdog). Unset in normal runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


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


def maybe_interrupt(where: str, rank: int, run_dir: Path) -> None:
    """At ``where`` (e.g. ``round1:6``), once per run folder: ``kill:where`` SIGKILLs this
    process (a worker lost), ``stop:where`` raises (a crash a test can catch in-process)."""
    for action in ("kill", "stop"):
        if not fault_requested(f"{action}:{where}", rank):
            continue
        marker = Path(run_dir) / f".fault-{action}-{where.replace(':', '-')}-rank{rank}"
        if marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault (K2L_FAULT) stop:{where} on rank {rank}")


def maybe_hang(where: str, rank: int) -> None:
    """``hang:where``: this rank sleeps for good, as a rank stuck in I/O or a driver would."""
    if fault_requested(f"hang:{where}", rank):
        while True:
            time.sleep(60)
