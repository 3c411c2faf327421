"""`k2l train`: prepare-if-needed → Stage 1 (warm-up + rounds) → Stage 2 → evaluation.

:func:`train` is the same for one process and for a torchrun job. Each rank trains a DDP
replica on its own batches, extracts points from its own slice of the dataset each round,
and hands them to the clustering service (:mod:`k2l_dist.clustering.service`), which
returns every rank the same pseudo-labels. The phases are in :mod:`k2l_dist.training.phases`,
the state a checkpoint holds in :mod:`k2l_dist.training.state`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from k2l_dist import distributed
from k2l_dist.clustering.service import ClusteringService, make_service
from k2l_dist.config import Config, absolute_paths, save_config, validate
from k2l_dist.distributed import DistInfo, watchdog
from k2l_dist.distributed.storage import check_shared
from k2l_dist.distributed.watchdog import PeerLost
from k2l_dist.training.phases import (
    Run,
    RunData,
    compiled,
    evaluate,
    finished_metrics,
    stage1_round,
    stage2,
    warmup,
)
from k2l_dist.training.shards import ensure_shards
from k2l_dist.training.state import CheckpointManager, RunState
from k2l_dist.utils.faults import maybe_raise
from k2l_dist.utils.io import ensure_writable
from k2l_dist.utils.lock import RunLock
from k2l_dist.utils.metrics import MetricsLogger


def train(cfg: Config, resume: bool = True) -> dict:
    """Train Φ then Ψ as ``cfg`` says and evaluate; returns the metrics (evaluated on rank 0)."""
    cfg = absolute_paths(cfg)  # every node and the saved config mean the same files
    validate(cfg)  # values that cannot work fail here, not after the warm-up
    maybe_raise("start", int(os.environ.get("RANK", "0")))
    info = distributed.enable(cfg.dist, cfg.device)
    service: ClusteringService | None = None
    lock: RunLock | None = None
    finished = False
    try:
        if info.is_main:
            ensure_writable(cfg.run_dir, "run_dir")  # a read-only folder fails now, not at the first checkpoint
            lock = RunLock(cfg.run_dir, "k2l train").acquire()  # one run per folder, before anything is written
            print(f"run folder: {cfg.run_dir}  (watch it: tensorboard --logdir {Path(cfg.run_dir) / 'tensorboard'})",
                  flush=True)
        check_shared(cfg.run_dir, "run_dir", info)  # checkpoints are written by rank 0 and read by all
        # an actor no node can host, or a Ray address that does not answer, fails before a long prepare
        service = make_service(cfg.cluster, info, connect_timeout_s=cfg.dist.timeout_s)
        shard_dir = ensure_shards(cfg, info)
        metrics = _train(cfg, info, RunData.load(cfg, shard_dir), service, resume)
        finished = True
        return metrics
    except Exception as err:
        named = _named_failure(err, info)
        if named is err:
            raise
        raise named from err
    finally:
        if service is not None:
            service.close(clean=finished)
        distributed.shutdown()
        if lock is not None:
            lock.release()


def _named_failure(err: Exception, info: DistInfo) -> Exception:
    """``err``, or, when a collective failed because another rank died or failed first, a
    :class:`PeerLost` naming that rank; every other rank is told this one failed."""
    if info.world_size > 1 and distributed.is_collective_error(err):
        lost = watchdog.lost_peer()
        if lost is not None:
            err = PeerLost(f"{lost}; {info.where} stopped in a collective ({str(err).splitlines()[0][:200]})")
    watchdog.announce_failure(f"{type(err).__name__}: {err}")
    return err


def _train(cfg: Config, info: DistInfo, data: RunData, service: ClusteringService, resume: bool) -> dict:
    """Stage 1 (the warm-up, then rounds of recovering correspondence and training on it),
    Stage 2, evaluation; a resumed run starts at the phase and batch its checkpoint saved."""
    checkpoints = CheckpointManager(cfg, info, data.digest)
    resumed = checkpoints.resume_point(data.shard_dir) if resume else None
    done = finished_metrics(cfg.run_dir, resumed[0], cfg) if resumed else None
    if done is not None:
        if info.is_main:
            print(f"{cfg.run_dir} is a finished run (metrics.json); nothing to do. Pass --fresh to train again, "
                  f"or ask for more rounds or iterations to go on")
        return done
    state = RunState.from_checkpoint(resumed[0], cfg, info) if resumed else RunState.fresh(
        cfg, info, data.initial_table())
    if resumed and info.is_main:
        _say_resumed(resumed, state, info)
    if info.is_main:  # after the resume check: a refused resume leaves the run's config alone
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    run = Run(cfg, info, data, service, checkpoints, MetricsLogger(cfg.run_dir, info.is_main),
              torch.Generator(device="cpu"), compiled(distributed.wrap_ddp(state.phi, info), cfg.compile),
              compiled(state.phi, cfg.compile))
    began = time.time()
    if state.progress.phase == "warmup":
        warmup(run, state)
    extract_loader = run.loader(train=False, seed=cfg.seed)
    skipped = extract_loader.skipped  # bad samples the loaders leave out, by reason (the same for every loader)
    _log_skipped(run.log, skipped, state.progress.step)
    while state.progress.phase == "round" and state.progress.rounds_done < cfg.stage1.rounds:
        stage1_round(run, state, extract_loader)
    stage1_seconds = time.time() - began
    stage2(run, state, extract_loader)
    train_seconds = time.time() - began
    service.close(clean=True)  # the other ranks may leave while rank 0 evaluates
    watchdog.pause()  # no collective from here on
    return evaluate(run, state, {"train_seconds": round(train_seconds, 1), "stage1_seconds": round(stage1_seconds, 1),
                                 "world_size": info.world_size, "samples_skipped": sum(skipped.values()),
                                 "samples_skipped_by_reason": skipped})


def _log_skipped(log: MetricsLogger, skipped: dict[str, int], step: int) -> None:
    log.scalars(step, {"skipped_samples": sum(skipped.values()),
                       **{f"skipped_{reason.replace(' ', '_')}": n for reason, n in skipped.items()}}, "data/")


def _say_resumed(resumed: tuple[dict, Path], state: RunState, info: DistInfo) -> None:
    ck, used = resumed
    p = state.progress
    print(f"resumed from {used}: {p.phase} phase, step {p.phase_step} of it, {p.rounds_done} round(s) done (saved "
          f"by {ck.get('world_size', 1)} process(es), now {info.world_size})")
