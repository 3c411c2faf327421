"""`k2l train`: prepare-if-needed → Stage 1 (warm-up + rounds) → Stage 2 → evaluation.

The whole method in one readable function, :func:`train`, the same for one process and
for a torchrun job. Each rank trains a DDP replica on its own batches, extracts points
from its own slice of the dataset each round, and hands them to the clustering service
(:mod:`k2l_dist.clustering.service`), which returns every rank the same pseudo-labels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from k2l_dist import distributed
from k2l_dist.augment import build_loader
from k2l_dist.clustering.rounds import degenerate_warnings
from k2l_dist.clustering.service import ClusteringService, make_service
from k2l_dist.config import Config, LossConfig, absolute_paths, save_config, validate
from k2l_dist.data.shards import ShardError, dataset_digest, load_manifest, load_samples_meta
from k2l_dist.distributed import DistInfo, watchdog
from k2l_dist.distributed.collectives import broadcast_json, check_replicas, max_over_ranks, mean_over_ranks
from k2l_dist.distributed.storage import check_shared
from k2l_dist.distributed.watchdog import PeerLost, heartbeat
from k2l_dist.eval.split import split_for_run
from k2l_dist.models import KeypointNet, LandmarkNet
from k2l_dist.models.extract import extract, extraction_cap
from k2l_dist.models.regions import CropRegions
from k2l_dist.train.compat import incompatible_changes
from k2l_dist.train.labels import LabelTable
from k2l_dist.train.optim import rmsprop
from k2l_dist.train.schedule import LRSchedule
from k2l_dist.train.shards import ensure_shards
from k2l_dist.train.steps import autocast, stage1_losses, stage2_losses
from k2l_dist.utils.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint
from k2l_dist.utils.faults import fault_requested, maybe_hang, maybe_interrupt, maybe_raise
from k2l_dist.utils.io import atomic_write_text, ensure_writable
from k2l_dist.utils.lock import RunLock
from k2l_dist.utils.memory import peak_rss_bytes
from k2l_dist.utils.metrics import MetricsLogger
from k2l_dist.utils.seeds import derive_seed

log_ = logging.getLogger(__name__)


def initial_table(meta: dict, ids: np.ndarray) -> LabelTable:
    """Warm-up labels: the generic keypoints of each sample, without clusters (-1)."""
    counts = np.diff(meta["kp_offsets"])
    image_ids = np.repeat(meta["ids"], counts)
    keep = np.isin(image_ids, ids)
    return LabelTable.from_points(image_ids[keep], meta["keypoints"][keep], all_ids=ids)


def _beating(batches, phase: str, rank: int, run_dir: Path):
    """The batches, with a heartbeat for each (extraction is watched like training) and the
    fault-injection point ``<phase>:<batch>``."""
    for i, batch in enumerate(batches):
        heartbeat(phase, i)
        maybe_interrupt(f"{phase}:{i}", rank, run_dir)
        yield batch


def _loader(cfg: Config, shard_dir: Path, ids: np.ndarray, info, *, train: bool, seed: int, views: int = 2,
            augment=None):
    """Training loaders give every rank a full, padded share per epoch (DDP steps in
    lockstep); extraction loaders give every rank its own disjoint slice, nothing repeated."""
    watchdog.pause()  # building a pipeline (validating shards) is not a step
    aug = (augment or cfg.augment) if train else dataclasses.replace(
        cfg.augment, enabled=False, batch_size=cfg.stage1.extract_batch_size or 4 * cfg.augment.batch_size)
    return build_loader(shard_dir, aug, rank=info.rank, world_size=info.world_size, seed=seed,
                        device=info.device, views=views if train else 1, shuffle=train,
                        padded="mark" if train else "drop", ids=ids)


def warmup_loss(loss: LossConfig) -> LossConfig:
    """The warm-up's loss (Sec. 3.5): known correspondences only, and same-image negatives
    whatever ``loss.negatives`` says: the warm-up's points carry no cluster label, so
    different-cluster negatives would leave it with positives alone (and collapse)."""
    return dataclasses.replace(loss, correspondence="equivariance", negatives="same_image")


def seed_phase(cfg: Config, phase: str, rank: int, generator: torch.Generator) -> None:
    """Every random stream of a phase is a function of (seed, phase, rank): a resume at the
    same world size is exact, at another world size well defined."""
    seed = derive_seed(cfg.seed, phase, rank)
    generator.manual_seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def compiled(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``torch.compile`` of the training forward with ``backend`` (config ``compile``; ""
    = as it is); checkpoints keep saving the plain module's weights."""
    return torch.compile(model, backend=backend) if backend else model


def lr_for_world(lr: float, rule: str, world_size: int) -> float:
    """``dist.lr_scaling``: gradients are averaged over ranks, the global batch grows with them."""
    factors = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}
    if rule not in factors:
        raise ValueError(f"dist.lr_scaling={rule!r}: use none, linear or sqrt")
    return lr * factors[rule]


def train_iterations(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader,
                     loss_fn: Callable[[dict], dict], iterations: int, *, step: int, log: MetricsLogger,
                     prefix: str, log_every: int, show_progress: bool, start: int = 0,
                     before_step: Callable[[int], None] | None = None,
                     after_step: Callable[[int, int], None] | None = None, precision: str = "fp32",
                     schedule: LRSchedule | None = None, phase: str = "",
                     tags: dict[str, float] | None = None) -> int:
    """Optimiser steps ``start`` … ``iterations - 1`` of a phase over (repeated epochs of)
    ``loader``; returns the new global step.

    A phase resumed at ``start`` first draws (and drops) the ``start`` batches it had
    already trained on, so it goes on with the batches it would have seen.
    ``before_step(i)`` runs before phase step i (e.g. reseeding), ``after_step(i + 1,
    global_step)`` after its update (e.g. checkpoints). Logged losses are averaged over
    ranks; ``step_seconds_slowest`` is the slowest rank's mean step time since the last
    log line, where stragglers show. ``prefix`` names the curves (one per stage, over the
    global step), ``phase`` the part of it in messages and fault points, ``tags`` constant
    scalars logged with every line (the round number); the phase's wall time is logged at
    its end as ``phase_seconds``."""
    model.train()
    phase = phase or prefix.rstrip("/")
    began = time.perf_counter()
    batches = _forever(loader)
    for j in range(start):
        heartbeat(f"{phase} (skipping to the resumed batch)", j)
        next(batches)
    bar = tqdm(range(start, iterations), desc=phase, unit="it", disable=not show_progress,
               leave=False)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    device = next(model.parameters()).device
    since, tick = 0, time.perf_counter()
    poison = fault_requested(f"nan:{phase}")
    for i in bar:
        heartbeat(phase, i)
        maybe_hang(f"{phase}:{i}", rank)
        if before_step is not None:
            before_step(i)
        if schedule is not None:
            schedule.apply(optimizer, step)
        batch = next(batches)
        with autocast(device, precision):
            losses = loss_fn(batch)
        if poison:  # injected (K2L_FAULT=nan:<phase>): the first step's loss becomes NaN
            losses["loss"], poison = losses["loss"] * float("nan"), False
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        _check_finite(losses, model, f"{phase} step {step + 1}")
        optimizer.step()
        step += 1
        since += 1
        if step % log_every == 0:
            now = time.perf_counter()
            seconds = (now - tick) / since
            values = mean_over_ranks({k: float(v.detach()) for k, v in losses.items()})
            slowest = max_over_ranks(seconds)
            images = sum(batch[k].shape[0] for k in ("view0", "view1") if k in batch) * world
            values.update(lr=optimizer.param_groups[0]["lr"], step_seconds=seconds, step_seconds_slowest=slowest,
                          images_per_second=images / max(slowest, 1e-9), **(tags or {}))
            log.scalars(step, values, prefix)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            since, tick = 0, now
        if after_step is not None:
            after_step(i + 1, step)
    if iterations > start:
        # the largest rank's peak memory so far: a multi-day run shows a leak as a rising curve
        log.scalars(step, {"phase_seconds": time.perf_counter() - began,
                           "peak_rss_gb": max_over_ranks(peak_rss_bytes() / 1e9)}, prefix)
    return step


class NonFiniteLoss(RuntimeError):
    """A loss term or gradient became NaN or inf; the message names the step and the terms."""


def _check_finite(losses: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """Stop before a NaN/inf reaches the weights (one host sync per step: the terms and the
    gradient norm checked together)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    terms = [k for k, v in losses.items() if v.requires_grad or k == "loss"]
    values = torch.stack([losses[k].detach().float() for k in terms] +
                         [torch.nn.utils.get_total_norm(grads).float().to(losses["loss"].device)])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = [k for k, ok in zip(terms, finite.tolist()) if not ok]
    grad = "" if bool(finite[-1]) else "; the gradient norm is not finite"
    raise NonFiniteLoss(f"{where}: loss term(s) {', '.join(bad) or 'none'} not finite{grad}. The weights were not "
                        f"updated; resume from the last checkpoint with a lower learning rate")


def _forever(loader) -> Iterator[dict]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training loader yielded no batch")


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
        metrics = _train(cfg, info, shard_dir, service, resume)
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


@dataclasses.dataclass
class Progress:
    """Where a run stands; a checkpoint holding it resumes at the same batch."""

    phase: str = "warmup"  # warmup | round | stage2 | done
    rounds_done: int = 0  # finished Stage-1 rounds
    phase_step: int = 0  # iterations done in the current phase
    step: int = 0  # Stage-1 iterations so far
    step2: int = 0  # Stage-2 iterations so far


def _train(cfg: Config, info, shard_dir: Path, service: ClusteringService, resume: bool) -> dict:
    run_dir = Path(cfg.run_dir)
    manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
    prepared = {"data.size": manifest.get("size"), "keypoints.method": manifest.get("keypoints", {}).get("method")}
    asked = {"data.size": cfg.data.size, "keypoints.method": cfg.keypoints.method}
    if len(meta["keypoints"]) == 0:  # the warm-up trains on them: nothing to start from
        raise ShardError(f"{shard_dir} holds no keypoints (prepared with keypoints.method="
                         f"{prepared['keypoints.method']}); training starts from generic keypoints: prepare with "
                         f"keypoints.method=orb, sift or superpoint")
    differ = [f"{k}={asked[k]!r} but the shards have {prepared[k]!r}" for k in asked if prepared[k] != asked[k]]
    if differ:
        raise ValueError(f"{shard_dir} was prepared with other settings: {'; '.join(differ)} (set them as the shards "
                         f"were prepared, or prepare again)")
    split = split_for_run(cfg.eval, meta, shard_dir)
    show = info.is_main and cfg.progress
    s1, s2 = cfg.stage1, cfg.stage2
    regions = CropRegions.from_meta(meta, int(manifest["size"])) if cfg.loss.mask_padding else None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    gen = torch.Generator(device="cpu")

    phi = KeypointNet(cfg.model).to(info.device)
    phi_ddp = compiled(distributed.wrap_ddp(phi, info), cfg.compile)
    lr1 = lr_for_world(s1.lr, cfg.dist.lr_scaling, info.world_size)
    schedule1 = LRSchedule((lr1,), s1.lr_milestones, s1.lr_gamma)
    opt = rmsprop(phi.parameters(), lr=lr1, weight_decay=s1.weight_decay)
    ckpt_path = run_dir / "checkpoint.pt"
    progress, table, ck = Progress(), initial_table(meta, split.train), None
    stage2_state: dict = {}  # round centroids; Ψ, its optimiser and labels once Stage 2 has started
    digest = dataset_digest(shard_dir)
    latest = _resume_point(ckpt_path, info) if resume else None
    if latest is not None:
        ck, used = latest
        changes = incompatible_changes(ck["config"], dataclasses.asdict(cfg))
        if changes:
            raise ValueError(f"cannot resume from {used}: the config changed in ways the checkpoint cannot "
                             f"follow ({'; '.join(changes)}); use another run_dir, or --fresh to start over")
        if ck.get("data_digest", digest) != digest:
            raise ValueError(f"cannot resume from {used}: {shard_dir} holds other data than the run trained on "
                             f"(content digest {digest[:12]}, the checkpoint's {ck['data_digest'][:12]}); prepare "
                             f"the original data again, use another run_dir, or --fresh to start over")
        progress = Progress(**ck["progress"])
        if progress.phase == "done" and progress.rounds_done == s1.rounds and progress.step2 == s2.iterations \
                and (run_dir / "metrics.json").is_file():
            if info.is_main:
                print(f"{run_dir} is a finished run (metrics.json); nothing to do. Pass --fresh to train again, "
                      f"or ask for more rounds or iterations to go on")
            return json.loads((run_dir / "metrics.json").read_text())
        if progress.phase in ("stage2", "done") and progress.rounds_done < s1.rounds:
            progress = dataclasses.replace(progress, phase="round", phase_step=0, step2=0)  # more rounds asked
        elif progress.phase == "done":
            progress = dataclasses.replace(progress, phase="stage2", phase_step=progress.step2)
        phi.load_state_dict(ck["phi"])
        opt.load_state_dict(ck["optimizer"])  # its lr is set by the schedule at every step
        table = LabelTable.from_state(ck["labels"])
        if "centroids_m" in ck:
            stage2_state["centroids_m"] = ck["centroids_m"]
        if info.is_main:
            print(f"resumed from {used}: {progress.phase} phase, step {progress.phase_step} of it, "
                  f"{progress.rounds_done} round(s) done (saved by {ck.get('world_size', 1)} process(es), "
                  f"now {info.world_size})")
    if info.is_main:  # after the resume check: a refused resume leaves the run's config alone
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLogger(run_dir, info.is_main)

    def checkpoint(**extra) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "phi": phi.state_dict(), "optimizer": opt.state_dict(), "labels": table.state(),
                "progress": dataclasses.asdict(progress), "step": progress.step, "round": progress.rounds_done,
                "world_size": info.world_size, "config": dataclasses.asdict(cfg), "data_digest": digest,
                **stage2_state, **extra},
                keep_previous=True)

    def phase_hooks(phase: str, on_stage2: bool = False):
        """Per-step seeds (a resumed phase draws the same negatives) and in-phase checkpoints."""
        def before(i: int) -> None:
            gen.manual_seed(derive_seed(cfg.seed, phase, info.rank, i))

        def after(done: int, global_step: int) -> None:
            nonlocal progress
            if on_stage2:
                progress = dataclasses.replace(progress, phase_step=done, step2=global_step)
            else:
                progress = dataclasses.replace(progress, phase_step=done, step=global_step)
            if done % cfg.checkpoint_every == 0:
                if on_stage2:
                    stage2_state.update(psi=psi.state_dict(), optimizer2=opt2.state_dict())
                checkpoint()
            maybe_interrupt(f"{phase}:{done}", info.rank, run_dir)
        return before, after

    def run(loss_cfg, n: int, phase: str, loader) -> int:
        seed_phase(cfg, phase, info.rank, gen)
        before, after = phase_hooks(phase)
        return train_iterations(
            phi_ddp, opt, loader, lambda b: stage1_losses(phi_ddp, b, table, max_points=s1.max_points,
                                                          loss_cfg=loss_cfg, generator=gen, regions=regions),
            n, step=progress.step, log=log, prefix="stage1/", phase=phase, log_every=cfg.log_every,
            tags={"round": progress.rounds_done + (phase != "warmup")}, show_progress=show,
            start=progress.phase_step, before_step=before, after_step=after,
            precision=cfg.precision, schedule=schedule1)

    def recover(kind: str, key: str):
        """Φ over this rank's slice, then every rank's points clustered together."""
        t0 = time.perf_counter()
        cap = extraction_cap(cfg)
        with autocast(info.device, cfg.precision):
            ext = extract(phi, _beating(extract_loader, f"extract-{key}", info.rank, run_dir), max_points=cap,
                          threshold=s1.detect_threshold, nms_radius=s1.nms_radius, flip=s1.flip,
                          subpixel=s1.subpixel, total=len(extract_loader), show_progress=show, regions=regions)
        maybe_raise(f"extract:{key}", info.rank)
        extract_seconds = max_over_ranks(time.perf_counter() - t0)
        counts = mean_over_ranks({"capped": ext.capped, "images": ext.num_images})
        capped_share = counts["capped"] / max(counts["images"], 1e-9)
        if info.is_main and capped_share > 0.05:
            if s1.extract_points == 0:  # the safety cap, not a choice
                log_.warning("%s: %.0f%% of images reached the cap of %d peaks per image (stage1.extract_points): "
                             "raise it or stage1.detect_threshold", key, 100 * capped_share, cap)
            else:
                log_.info("%s: %.0f%% of images kept only their %d strongest peaks (stage1.extract_points)",
                          key, 100 * capped_share, cap)
        heartbeat(f"clustering {key}", allow_s=max(cfg.cluster.round_timeout_s, cfg.dist.timeout_s))
        labels = service.recover(kind, ext.as_dict(), key)
        if info.is_main:
            degenerate_warnings(labels, "stage 2 labels" if kind == "final" else key.replace("round", "round "))
        return labels, {"extract_seconds": extract_seconds, "images_at_peak_cap_share": capped_share,
                        **service.timings}

    # ---- Stage 1: warm-up on known correspondences (two augmentations of one image).
    t0 = time.time()
    if progress.phase == "warmup":
        step = run(warmup_loss(cfg.loss), s1.warmup_iters, "warmup",
                   _loader(cfg, shard_dir, split.train, info, train=True, seed=cfg.seed))
        log.scalars(step, {"phi_checksum": check_replicas(phi, "after the warm-up")}, "replicas/")
        progress = Progress(phase="round", step=step)
        checkpoint()
    extract_loader = _loader(cfg, shard_dir, split.train, info, train=False, seed=cfg.seed)
    skipped = extract_loader.skipped  # bad samples the loaders leave out, by reason (the same for every loader)
    log.scalars(progress.step, {"skipped_samples": sum(skipped.values()),
                                **{f"skipped_{r.replace(' ', '_')}": n for r, n in skipped.items()}}, "data/")
    # ---- Stage 1 rounds: recover correspondence, then train on the pseudo-labels.
    while progress.phase == "round" and progress.rounds_done < s1.rounds:
        rnd = progress.rounds_done + 1
        if progress.phase_step == 0:  # else: resumed inside the round, its labels are the checkpoint's
            labels, timings = recover("round", f"round{rnd}")
            table = LabelTable.from_round(labels)
            stage2_state["centroids_m"] = torch.from_numpy(np.array(labels.centroids))
            log.scalars(progress.step, {"number": rnd, **labels.stats, **timings}, "round/")
            log.text("rounds", f"round {rnd} of {s1.rounds} starts at step {progress.step}: "
                     f"{labels.stats['points_per_image_after']:.1f} points/image kept", progress.step)
            if info.is_main:
                _round_grid(shard_dir, table, split.train[:16], run_dir / "rounds" / f"round{rnd:03d}.png", log,
                            progress.step)
            if show:
                print(f"round {rnd}/{s1.rounds}: {labels.stats['points_per_image_after']:.1f} points/image kept, "
                      f"{labels.stats['images_kept_share']:.0%} images kept; extraction "
                      f"{timings['extract_seconds']:.1f} s, clustering {timings['cluster_seconds']:.1f} s")
        step = run(cfg.loss, s1.iters_per_round, f"round{rnd}",
                   _loader(cfg, shard_dir, split.train, info, train=True, seed=cfg.seed + rnd))
        log.scalars(step, {"phi_checksum": check_replicas(phi, f"after round {rnd}")}, "replicas/")
        progress = dataclasses.replace(progress, rounds_done=rnd, phase_step=0, step=step)
        checkpoint()
    stage1_seconds = time.time() - t0

    # ---- Stage 2: K clusters → K-heatmap detector Ψ initialised from Φ.
    seed_phase(cfg, "stage2", info.rank, gen)  # Ψ's new head: the same init however the run got here
    log2 = log.shifted(progress.step)  # Stage 2 counts its own steps: after Stage 1's on TensorBoard's axis
    if progress.phase == "round":
        final, timings = recover("final", "stage2")
        table2 = LabelTable.from_round(final)
        centroids = np.array(final.centroids, np.float32)
        perm = np.array(final.flip_permutation, np.int64)
        log2.scalars(0, {**final.stats, **timings}, "stage2_labels/")
        psi = LandmarkNet.from_keypoint_net(phi, cfg.cluster.K).to(info.device)
        progress = dataclasses.replace(progress, phase="stage2", phase_step=0, step2=0)
    else:  # resumed inside Stage 2
        table2 = LabelTable.from_state(ck["stage2_labels"])
        centroids, perm = ck["centroids"].numpy(), ck["flip_permutation"].numpy()
        psi = LandmarkNet(cfg.model, cfg.cluster.K).to(info.device)
        psi.load_state_dict(ck["psi"])
    psi_ddp = compiled(distributed.wrap_ddp(psi, info), cfg.compile)
    lr2 = lr_for_world(s2.lr, cfg.dist.lr_scaling, info.world_size)
    schedule2 = LRSchedule((lr2 * s2.backbone_lr_scale, lr2), s2.lr_milestones, s2.lr_gamma)
    opt2 = rmsprop([{"params": psi.backbone.parameters()}, {"params": psi.head.parameters()}],
                   lr=lr2, weight_decay=s2.weight_decay)
    if "optimizer2" in (ck or {}) and progress.phase_step > 0:
        opt2.load_state_dict(ck["optimizer2"])
    stage2_state.update(stage2_labels=table2.state(), centroids=torch.from_numpy(centroids),
                        flip_permutation=torch.from_numpy(perm))
    aug2 = dataclasses.replace(cfg.augment, flip_prob=cfg.augment.flip_prob if s2.flip_train else 0.0)
    loader2 = _loader(cfg, shard_dir, split.train, info, train=True, seed=cfg.seed + 10_000, views=1,
                      augment=aug2)
    before, after = phase_hooks("stage2", on_stage2=True)
    step2 = train_iterations(psi_ddp, opt2, loader2,
                             lambda b: stage2_losses(psi_ddp, b, table2, num_landmarks=cfg.cluster.K,
                                                     sigma=cfg.loss.heatmap_sigma, regions=regions,
                                                     cutout=s2.cutout, cutout_prob=s2.cutout_prob, generator=gen),
                             s2.iterations, step=progress.step2, log=log2, prefix="stage2/", log_every=cfg.log_every,
                             show_progress=show, start=progress.phase_step, before_step=before, after_step=after,
                             precision=cfg.precision, schedule=schedule2)
    log2.scalars(step2, {"psi_checksum": check_replicas(psi, "after Stage 2")}, "replicas/")
    if info.is_main:
        save_checkpoint(run_dir / "model.pt", {
            "psi": psi.state_dict(), "phi": phi.state_dict(), "centroids": torch.from_numpy(centroids),
            "flip_permutation": torch.from_numpy(perm), "num_landmarks": cfg.cluster.K,
            "stage2_labels": table2.state(), "step": step2, "config": dataclasses.asdict(cfg)})
    progress = dataclasses.replace(progress, phase="done", phase_step=step2, step2=step2)
    stage2_state.update(psi=psi.state_dict(), optimizer2=opt2.state_dict())
    checkpoint()
    train_seconds = time.time() - t0
    service.close(clean=True)  # the other ranks may leave while rank 0 evaluates
    watchdog.pause()  # no collective from here on

    # ---- Evaluation (rank 0, on the unwrapped models).
    metrics: dict = {"train_seconds": round(train_seconds, 1), "stage1_seconds": round(stage1_seconds, 1),
                     "world_size": info.world_size, "samples_skipped": sum(skipped.values()),
                     "samples_skipped_by_reason": skipped}
    if info.is_main and "landmarks" in meta:
        from k2l_dist.eval.evaluate import evaluate_run

        metrics.update(evaluate_run(cfg, shard_dir, manifest, meta, split, phi, psi, centroids, perm,
                                    log2.shifted(step2), device=info.device))
    if info.is_main:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    log.close()
    return metrics


def _resume_point(ckpt_path: Path, info: DistInfo) -> tuple[dict, Path] | None:
    """The checkpoint every rank resumes from: the one rank 0 finds (its latest loadable),
    read by every rank from that very file, so no two ranks resume at different phases."""
    chosen = None
    if info.is_main:
        latest = load_latest_checkpoint(ckpt_path)
        chosen = None if latest is None else str(latest[1])
    if info.world_size > 1:
        chosen = broadcast_json(chosen)
    if chosen is None:
        return None
    if info.is_main:
        return latest
    try:
        return load_checkpoint(chosen), Path(chosen)
    except (OSError, ValueError) as err:
        raise ValueError(f"{info.where} cannot read the checkpoint rank 0 resumes from ({err})") from None


def _round_grid(shard_dir: Path, table: LabelTable, ids: np.ndarray, path: Path, log, step: int) -> None:
    """The round's pseudo-labels drawn on a few training crops (colour = M-cluster)."""
    from k2l_dist.eval.evaluate import log_landmark_grid

    lab = table.lookup(ids, max(int(table.counts.max(initial=1)), 1))
    points = []
    for pts, valid, labels in zip(lab["points"].numpy(), lab["valid"].numpy(), lab["labels"].numpy()):
        slots = np.full((int(table.labels.max(initial=0)) + 1, 2), np.nan)
        slots[labels[valid]] = pts[valid]
        points.append(slots)
    log_landmark_grid(shard_dir, ids, points, path, log, "landmarks/round", step)
