"""The training data every rank reads: prepared once (or once per node), the same everywhere.

``data.shards`` empty: the shards go to ``<run_dir>/shards`` (shared storage, checked),
prepared by rank 0. ``data.shards`` set: a prepared folder every node sees at that path,
never prepared into; with ``data.local_shards`` it is each node's own disk, and the
first process of every node that lacks it prepares it there. Either way every rank
then reports the content digest of what it sees, and a job whose nodes see different
data stops, naming them. Ranks that wait for another's preparation watch the other
ranks' heartbeats: a preparation that fails or a rank that dies ends the wait at once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from k2l_dist.config import Config
from k2l_dist.data.shards import ShardError, dataset_digest
from k2l_dist.distributed import DistInfo
from k2l_dist.distributed.collectives import all_gather_json
from k2l_dist.distributed.waits import wait_until
from k2l_dist.prepare import is_prepared, prepare

log = logging.getLogger(__name__)


def shard_folder(cfg: Config) -> Path:
    return Path(cfg.data.shards or Path(cfg.run_dir) / "shards")


def _prepares_here(cfg: Config, info: DistInfo) -> bool:
    """Whether this rank prepares a missing shard folder: rank 0 for <run_dir>/shards, the
    first process of each node for node-local shards, nobody for a named shared folder."""
    if not cfg.data.shards:
        return info.is_main
    return cfg.data.local_shards and info.local_rank == 0


def ensure_shards(cfg: Config, info: DistInfo) -> Path:
    """The prepared shard folder of ``cfg``, the same data on every rank (digest checked)."""
    shard_dir = shard_folder(cfg)
    named = f"data.shards={shard_dir}" if cfg.data.shards else f"{shard_dir} (<run_dir>/shards)"
    if _prepares_here(cfg, info):
        if not is_prepared(shard_dir):
            if shard_dir.exists() and any(shard_dir.iterdir()):  # never prepare into (and wipe) other files
                raise ShardError(f"{named} on {info.where}: exists but is not a prepared shard folder (no "
                                 f"index.json); empty it, or run `k2l prepare --out {shard_dir}`")
            t0 = time.time()
            print(prepare(cfg, shard_dir).text(), flush=True)
            if info.world_size > 1:
                log.info("%s prepared %s in %.0f s", info.where, shard_dir, time.time() - t0)
    elif cfg.data.shards and not cfg.data.local_shards:
        if not is_prepared(shard_dir):
            raise ShardError(f"{named}: not a prepared shard folder (no index.json) on {info.where}; run "
                             f"`k2l prepare --out {shard_dir}` on storage every node mounts there, or set "
                             f"data.local_shards=true to prepare a copy on each node's own disk")
    else:
        who = "rank 0" if not cfg.data.shards else f"the first process of node {info.node_rank}"
        wait_until(lambda: is_prepared(shard_dir), f"{info.where}: waiting for {who} to prepare {shard_dir}",
                   cfg.dist.prepare_timeout_s)
    digest = dataset_digest(shard_dir)
    views = all_gather_json({"digest": digest, "node": info.node_rank, "host": info.host})
    if len({v["digest"] for v in views}) > 1:
        by_digest: dict[str, list[str]] = {}
        for v in views:
            by_digest.setdefault(v["digest"][:12], []).append(f"node {v['node']} ({v['host']})")
        seen = "; ".join(f"{d}: {', '.join(sorted(set(n)))}" for d, n in by_digest.items())
        raise ShardError(f"{named} holds different data on different nodes (content digests {seen}); prepare "
                         f"every copy from the same inputs and settings, or use one shared folder")
    return shard_dir
