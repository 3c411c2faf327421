"""Storage every rank must share, checked rather than assumed.

Only rank 0 writes checkpoints, metrics and TensorBoard events, and every rank reads
the checkpoint it resumes from, so ``run_dir`` must be one folder for the whole job: a
relative path resolved on each node, or a node-local disk, would let the nodes resume
at different phases. Rank 0 writes a file with a fresh nonce into the folder and every
rank reads it back; a rank that cannot is named with its node and host.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from k2l_dist.distributed import DistInfo, barrier
from k2l_dist.distributed.collectives import all_gather_json, broadcast_json
from k2l_dist.utils.io import StorageError, atomic_write_text


class NotShared(StorageError):
    """A folder the job needs on shared storage is not the same folder on every node."""


def check_shared(folder: str | Path, key: str, info: DistInfo, settle_s: float = 10.0) -> None:
    """Raise :class:`NotShared` on every rank unless every rank sees the file rank 0 writes
    into ``folder`` (config key ``key``); a network file system gets ``settle_s`` to show it."""
    if info.world_size == 1:
        return
    folder = Path(folder)
    nonce = broadcast_json(uuid.uuid4().hex if info.is_main else None)
    probe = folder / f".k2l-shared-{nonce}"
    if info.is_main:
        atomic_write_text(probe, nonce)
    barrier()
    deadline = time.monotonic() + settle_s
    while True:
        try:
            seen = probe.read_text() == nonce
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    views = all_gather_json({"seen": seen, "node": info.node_rank, "host": info.host, "path": str(folder)})
    if info.is_main:
        probe.unlink(missing_ok=True)
    blind = [v for v in views if not v["seen"]]
    if blind:
        nodes = sorted({(v["node"], v["host"], v["path"]) for v in blind})
        names = ", ".join(f"node {n} (host {h}, {key}={p})" for n, h, p in nodes)
        raise NotShared(f"{key}={views[0]['path']} is not shared by every node: {names} cannot see the file "
                        f"rank 0 (node {views[0]['node']}, host {views[0]['host']}) wrote there; put {key} on "
                        f"storage every node mounts at the same absolute path")
