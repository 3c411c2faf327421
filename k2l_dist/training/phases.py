"""The phases of a run, each a function of the run's fixed context and its state:
:func:`warmup`, :func:`stage1_round`, :func:`stage2` and :func:`evaluate` (paper Alg. 1, Sec. 3.5–3.6)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from k2l_dist import distributed
from k2l_dist.augment import build_loader
from k2l_dist.augment.temporal import TemporalPairs
from k2l_dist.clustering.carry import carry_labels
from k2l_dist.clustering.rounds import RoundLabels, degenerate_warnings
from k2l_dist.clustering.service import ClusteringService
from k2l_dist.config import AugmentConfig, Config, LossConfig, heatmap_radius
from k2l_dist.data.shards import ShardError, dataset_digest, load_manifest, load_samples_meta
from k2l_dist.distributed import DistInfo, watchdog
from k2l_dist.distributed.collectives import check_replicas, max_over_ranks, mean_over_ranks
from k2l_dist.distributed.watchdog import heartbeat
from k2l_dist.eval.split import Split, split_for_run
from k2l_dist.models import STRIDE
from k2l_dist.models.extract import extract, extraction_cap
from k2l_dist.models.regions import CropRegions
from k2l_dist.training.labels import LabelTable
from k2l_dist.training.loop import train_iterations
from k2l_dist.training.schedule import LRSchedule
from k2l_dist.training.state import CheckpointManager, Progress, RunState, Stage2State, lr_for_world
from k2l_dist.training.steps import autocast, stage1_losses, stage2_losses
from k2l_dist.utils.faults import maybe_interrupt, maybe_raise
from k2l_dist.utils.io import atomic_write_text
from k2l_dist.utils.metrics import MetricsLogger
from k2l_dist.utils.seeds import derive_seed

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunData:
    """The prepared shards a run trains on, checked against the config."""

    shard_dir: Path
    manifest: dict
    meta: dict
    split: Split
    regions: CropRegions | None  # the crops' image areas, when the padding is masked
    digest: str  # content digest: a resume refuses other data

    @classmethod
    def load(cls, cfg: Config, shard_dir: Path) -> RunData:
        manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
        prepared = {"data.size": manifest.get("size"),
                    "keypoints.method": manifest.get("keypoints", {}).get("method")}
        asked = {"data.size": cfg.data.size, "keypoints.method": cfg.keypoints.method}
        if len(meta["keypoints"]) == 0:  # the warm-up trains on them: nothing to start from
            raise ShardError(f"{shard_dir} holds no keypoints (prepared with keypoints.method="
                             f"{prepared['keypoints.method']}); training starts from generic keypoints: prepare "
                             f"with keypoints.method=orb, sift or superpoint")
        differ = [f"{k}={asked[k]!r} but the shards have {prepared[k]!r}" for k in asked if prepared[k] != asked[k]]
        if differ:
            raise ValueError(f"{shard_dir} was prepared with other settings: {'; '.join(differ)} (set them as the "
                             f"shards were prepared, or prepare again)")
        split = split_for_run(cfg.eval, meta, shard_dir)
        regions = CropRegions.from_meta(meta, int(manifest["size"])) if cfg.loss.mask_padding else None
        return cls(shard_dir, manifest, meta, split, regions, dataset_digest(shard_dir))

    def initial_table(self) -> LabelTable:
        return initial_table(self.meta, self.split.train)


def initial_table(meta: dict, ids: np.ndarray) -> LabelTable:
    """Warm-up labels: the generic keypoints of each sample, without clusters (-1)."""
    counts = np.diff(meta["kp_offsets"])
    image_ids = np.repeat(meta["ids"], counts)
    keep = np.isin(image_ids, ids)
    return LabelTable.from_points(image_ids[keep], meta["keypoints"][keep], all_ids=ids)


@dataclasses.dataclass
class Run:
    """What every phase reads and never replaces."""

    cfg: Config
    info: DistInfo
    data: RunData
    service: ClusteringService
    checkpoints: CheckpointManager
    log: MetricsLogger
    generator: torch.Generator  # the losses' random draws, reseeded per phase and step
    phi_train: torch.nn.Module  # Φ as the training steps call it (DDP, compiled)
    phi_extract: torch.nn.Module  # Φ as extraction calls it (compiled like training, no DDP: no backward)

    @property
    def show(self) -> bool:
        return self.info.is_main and self.cfg.progress

    def loader(self, *, train: bool, seed: int, views: int = 2, augment: AugmentConfig | None = None,
               ids: np.ndarray | None = None, table: LabelTable | None = None):
        """Over the training split, or the part of it in ``ids``; a Stage-1 loader given the
        phase's ``table`` pairs nearby frames on video shards (``temporal``)."""
        ids = self.data.split.train if ids is None else ids
        pairs = None
        if table is not None and self.cfg.temporal.share > 0 and "videos" in self.data.meta:
            pairs = functools.partial(TemporalPairs, meta=self.data.meta, table=table,
                                      max_points=self.cfg.stage1.max_points, cfg=self.cfg.temporal,
                                      seed=seed)
        return make_loader(self.cfg, self.data.shard_dir, ids, self.info, train=train, seed=seed, views=views,
                           augment=augment, pairs=pairs)


def make_loader(cfg: Config, shard_dir: Path, ids: np.ndarray, info: DistInfo, *, train: bool, seed: int,
                views: int = 2, augment: AugmentConfig | None = None, pairs=None):
    """Training loaders give every rank a full, padded share per epoch (DDP steps in
    lockstep); extraction loaders give every rank its own disjoint slice, nothing repeated."""
    watchdog.pause()  # building a pipeline (validating shards) is not a step
    aug = (augment or cfg.augment) if train else dataclasses.replace(
        cfg.augment, enabled=False, batch_size=cfg.stage1.extract_batch_size or 4 * cfg.augment.batch_size)
    return build_loader(shard_dir, aug, rank=info.rank, world_size=info.world_size, seed=seed, device=info.device,
                        views=views if train else 1, shuffle=train, padded="mark" if train else "drop", ids=ids,
                        pairs=pairs)


def compiled(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``torch.compile`` of a network's forward with ``backend`` (config ``compile``; "" = as
    it is), for training and extraction; checkpoints keep saving the plain module's weights."""
    return torch.compile(model, backend=backend) if backend else model


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


def _step_hooks(run: Run, state: RunState, phase: str):
    """Per-step seeds (a resumed phase draws the same negatives) and in-phase checkpoints."""
    cfg, info = run.cfg, run.info

    def before(i: int) -> None:
        run.generator.manual_seed(derive_seed(cfg.seed, phase, info.rank, i))

    def after(done: int, global_step: int) -> None:
        state.advance(done, global_step)
        if done % cfg.checkpoint_every == 0:
            run.checkpoints.save(state)
        maybe_interrupt(f"{phase}:{done}", info.rank, cfg.run_dir)
    return before, after


def _train_phi(run: Run, state: RunState, loss_cfg: LossConfig, iterations: int, phase: str, loader) -> int:
    """Φ trained ``iterations`` steps of ``phase`` on ``state.table``; returns the global step."""
    cfg, s1 = run.cfg, run.cfg.stage1
    seed_phase(cfg, phase, run.info.rank, run.generator)
    before, after = _step_hooks(run, state, phase)
    lr1 = lr_for_world(s1.lr, cfg.dist.lr_scaling, run.info.world_size)

    def losses(batch: dict) -> dict:
        return stage1_losses(run.phi_train, batch, state.table, max_points=s1.max_points, loss_cfg=loss_cfg,
                             generator=run.generator, regions=run.data.regions)

    return train_iterations(
        run.phi_train, state.optimizer, loader, losses, iterations, info=run.info, step=state.progress.step,
        log=run.log, prefix="stage1/", phase=phase, log_every=cfg.log_every,
        tags={"round": state.progress.rounds_done + (phase != "warmup")}, show_progress=run.show,
        start=state.progress.phase_step, before_step=before, after_step=after, precision=cfg.precision,
        schedule=LRSchedule((lr1,), s1.lr_milestones, s1.lr_gamma), check_every=cfg.check_finite_every)


def warmup(run: Run, state: RunState) -> None:
    """Stage 1's warm-up (Sec. 3.5): Φ learns from known correspondences, two augmentations
    of one image and its generic keypoints."""
    step = _train_phi(run, state, warmup_loss(run.cfg.loss), run.cfg.stage1.warmup_iters, "warmup",
                      run.loader(train=True, seed=run.cfg.seed, table=state.table))
    run.log.scalars(step, {"phi_checksum": check_replicas(state.phi, "after the warm-up")}, "replicas/")
    state.progress = Progress(phase="round", step=step)
    run.checkpoints.save(state)


def recover(run: Run, state: RunState, extract_loader, kind: str, key: str) -> tuple[RoundLabels, dict]:
    """Φ over this rank's slice, then every rank's points clustered together (Sec. 3.3)."""
    cfg, info, s1 = run.cfg, run.info, run.cfg.stage1
    t0 = time.perf_counter()
    cap = extraction_cap(cfg)
    batches = _beating(extract_loader, f"extract-{key}", info.rank, cfg.run_dir)
    with autocast(info.device, cfg.precision):
        ext = extract(run.phi_extract, batches, max_points=cap, threshold=s1.detect_threshold, nms_radius=s1.nms_radius,
                      flip=s1.flip, subpixel=s1.subpixel, total=len(extract_loader), show_progress=run.show,
                      regions=run.data.regions)
    maybe_raise(f"extract:{key}", info.rank)
    extract_seconds = max_over_ranks(time.perf_counter() - t0)
    counts = mean_over_ranks({"capped": ext.capped, "images": ext.num_images})
    capped_share = counts["capped"] / max(counts["images"], 1e-9)
    if info.is_main and capped_share > 0.05:
        _warn_capped(key, capped_share, cap, own_cap=s1.extract_points != 0)
    heartbeat(f"clustering {key}", allow_s=max(cfg.cluster.round_timeout_s, cfg.dist.timeout_s))
    labels = run.service.recover(kind, ext.as_dict(), key)
    if info.is_main:
        degenerate_warnings(labels, "stage 2 labels" if kind == "final" else key.replace("round", "round "))
    return labels, {"extract_seconds": extract_seconds, "images_at_peak_cap_share": capped_share,
                    **run.service.timings}


def _warn_capped(key: str, share: float, cap: int, own_cap: bool) -> None:
    if own_cap:
        logger.info("%s: %.0f%% of images kept only their %d strongest peaks (stage1.extract_points)",
                  key, 100 * share, cap)
    else:  # the safety cap, not a choice
        logger.warning("%s: %.0f%% of images reached the cap of %d peaks per image (stage1.extract_points): "
                     "raise it or stage1.detect_threshold", key, 100 * share, cap)


def _beating(batches, phase: str, rank: int, run_dir: str | Path):
    """The batches, with a heartbeat for each (extraction is watched like training) and the
    fault-injection point ``<phase>:<batch>``."""
    for i, batch in enumerate(batches):
        heartbeat(phase, i)
        maybe_interrupt(f"{phase}:{i}", rank, run_dir)
        yield batch


def round_extract_ids(train_ids: np.ndarray, fraction: float, rnd: int, rounds: int, seed: int) -> np.ndarray | None:
    """The images round ``rnd`` re-extracts (sorted), or None for every image: the first
    round (nothing to carry yet), the last, and every round at ``fraction`` 1. A seeded
    draw of round(fraction × N) ids, the same on every rank and after a resume."""
    if fraction >= 1 or rnd <= 1 or rnd >= rounds:
        return None
    rng = np.random.default_rng(derive_seed(seed, "extract", rnd))
    count = max(1, round(fraction * len(train_ids)))
    return np.sort(rng.choice(np.asarray(train_ids, np.int64), size=count, replace=False))


def carry_radius(cfg: Config, crop_side: int) -> float:
    """The NMS radius in crop pixels: a point found again within it is the same peak."""
    view_side = cfg.augment.size or crop_side
    heat_side = max(1, view_side // STRIDE)
    return max(1, round(heatmap_radius(cfg.stage1.nms_radius, heat_side))) * STRIDE * crop_side / view_side


def round_labels(run: Run, state: RunState, extract_loader, rnd: int) -> tuple[RoundLabels, dict]:
    """Round ``rnd``'s pseudo-labels: every image extracted and clustered, or (a partial
    round, ``stage1.extract_fraction``) a seeded part, the others' labels carried over."""
    cfg = run.cfg
    ids = round_extract_ids(run.data.split.train, cfg.stage1.extract_fraction, rnd, cfg.stage1.rounds, cfg.seed)
    if ids is None:
        labels, timings = recover(run, state, extract_loader, "round", f"round{rnd}")
        return labels, {**timings, "extracted_share": 1.0}
    fresh, timings = recover(run, state, run.loader(train=False, seed=cfg.seed, ids=ids), "round", f"round{rnd}")
    labels = carry_labels(state.table, fresh, carry_radius(cfg, int(run.data.manifest["size"])))
    return labels, {**timings, "extracted_share": labels.stats["extracted_share"]}


def stage1_round(run: Run, state: RunState, extract_loader) -> None:
    """One round of Alg. 1: recover correspondence over the whole dataset (unless resumed
    inside the round: its labels are the checkpoint's), then train Φ on the pseudo-labels."""
    cfg, rnd = run.cfg, state.progress.rounds_done + 1
    if state.progress.phase_step == 0:
        labels, timings = round_labels(run, state, extract_loader, rnd)
        state.table = LabelTable.from_round(labels)
        state.centroids_m = torch.from_numpy(np.array(labels.centroids))
        _report_round(run, state, labels.stats, timings, rnd)
    step = _train_phi(run, state, cfg.loss, cfg.stage1.iters_per_round, f"round{rnd}",
                      run.loader(train=True, seed=cfg.seed + rnd, table=state.table))
    run.log.scalars(step, {"phi_checksum": check_replicas(state.phi, f"after round {rnd}")}, "replicas/")
    state.progress = dataclasses.replace(state.progress, rounds_done=rnd, phase_step=0, step=step)
    run.checkpoints.save(state)


def _report_round(run: Run, state: RunState, stats: dict, timings: dict, rnd: int) -> None:
    step, rounds = state.progress.step, run.cfg.stage1.rounds
    run.log.scalars(step, {"number": rnd, **stats, **timings}, "round/")
    run.log.text("rounds", f"round {rnd} of {rounds} starts at step {step}: "
                 f"{stats['points_per_image_after']:.1f} points/image kept", step)
    if run.info.is_main:
        _round_grid(run.data.shard_dir, state.table, run.data.split.train[:16],
                    Path(run.cfg.run_dir) / "rounds" / f"round{rnd:03d}.png", run.log, step)
    if run.show:
        partial = "" if timings["extracted_share"] >= 1 else (
            f" of {timings['extracted_share']:.0%} of the images (the others' labels carried over, "
            f"{stats['carried_votes_agree_share']:.0%} of the matched points agreeing)")
        print(f"round {rnd}/{rounds}: {stats['points_per_image_after']:.1f} points/image kept, "
              f"{stats['images_kept_share']:.0%} images kept; extraction{partial} "
              f"{timings['extract_seconds']:.1f} s, clustering {timings['cluster_seconds']:.1f} s")


def _round_grid(shard_dir: Path, table: LabelTable, ids: np.ndarray, path: Path, log: MetricsLogger,
                step: int) -> None:
    """The round's pseudo-labels drawn on a few training crops (colour = M-cluster)."""
    from k2l_dist.eval.evaluate import log_landmark_grid

    lab = table.lookup(ids, max(int(table.counts.max(initial=1)), 1))
    points = []
    for pts, valid, labels in zip(lab["points"].numpy(), lab["valid"].numpy(), lab["labels"].numpy()):
        slots = np.full((int(table.labels.max(initial=0)) + 1, 2), np.nan)
        slots[labels[valid]] = pts[valid]
        points.append(slots)
    log_landmark_grid(shard_dir, ids, points, path, log, "landmarks/round", step)


def stage2(run: Run, state: RunState, extract_loader) -> None:
    """Stage 2 (Sec. 3.6): the K clusters of a last extraction label a K-heatmap detector Ψ
    initialised from Φ; Ψ trains, then ``model.pt`` is written."""
    cfg, info, s2 = run.cfg, run.info, run.cfg.stage2
    seed_phase(cfg, "stage2", info.rank, run.generator)  # Ψ's new head: the same init however the run got here
    log2 = run.log.shifted(state.progress.step)  # Stage 2 counts its own steps: after Stage 1's on the axis
    if state.progress.phase == "round":
        final, timings = recover(run, state, extract_loader, "final", "stage2")
        log2.scalars(0, {**final.stats, **timings}, "stage2_labels/")
        state.stage2 = Stage2State.from_labels(final, state.phi, cfg, info)
        state.progress = dataclasses.replace(state.progress, phase="stage2", phase_step=0, step2=0)
    else:  # resumed inside Stage 2
        state.stage2 = Stage2State.from_checkpoint(state.saved_stage2, cfg, info, state.progress.phase_step)
        state.saved_stage2 = None
    psi = state.stage2.psi
    psi_train = compiled(distributed.wrap_ddp(psi, info), cfg.compile)
    lr2 = lr_for_world(s2.lr, cfg.dist.lr_scaling, info.world_size)
    aug2 = dataclasses.replace(cfg.augment, flip_prob=cfg.augment.flip_prob if s2.flip_train else 0.0)
    before, after = _step_hooks(run, state, "stage2")

    def losses(batch: dict) -> dict:
        return stage2_losses(psi_train, batch, state.stage2.table, num_landmarks=cfg.cluster.K,
                             sigma=cfg.loss.heatmap_sigma, regions=run.data.regions, cutout=s2.cutout,
                             cutout_prob=s2.cutout_prob, generator=run.generator)

    step2 = train_iterations(
        psi_train, state.stage2.optimizer, run.loader(train=True, seed=cfg.seed + 10_000, views=1, augment=aug2),
        losses, s2.iterations, info=info, step=state.progress.step2, log=log2, prefix="stage2/",
        log_every=cfg.log_every, show_progress=run.show, start=state.progress.phase_step, before_step=before,
        after_step=after, precision=cfg.precision, check_every=cfg.check_finite_every,
        schedule=LRSchedule((lr2 * s2.backbone_lr_scale, lr2), s2.lr_milestones, s2.lr_gamma))
    log2.scalars(step2, {"psi_checksum": check_replicas(psi, "after Stage 2")}, "replicas/")
    state.progress = dataclasses.replace(state.progress, phase="done", phase_step=step2, step2=step2)
    run.checkpoints.save_model(state)
    run.checkpoints.save(state)


def evaluate(run: Run, state: RunState, metrics: dict) -> dict:
    """Rank 0 scores the unwrapped models on the held-out split (when the shards carry
    landmarks) and writes ``metrics.json``; ``metrics``: the run's own figures so far."""
    data, s2 = run.data, state.stage2
    metrics = dict(metrics)
    if run.info.is_main and "landmarks" in data.meta:
        from k2l_dist.eval.evaluate import evaluate_run

        log = run.log.shifted(state.progress.step).shifted(state.progress.step2)
        metrics.update(evaluate_run(run.cfg, data.shard_dir, data.manifest, data.meta, data.split, state.phi, s2.psi,
                                    s2.centroids, s2.flip_permutation, log, device=run.info.device))
    if run.info.is_main:
        atomic_write_text(Path(run.cfg.run_dir) / "metrics.json", json.dumps(metrics, indent=1))
    run.log.close()
    return metrics


def finished_metrics(run_dir: str | Path, ck: dict, cfg: Config) -> dict | None:
    """The metrics of a run that ``ck`` says is finished as ``cfg`` asks, once evaluated."""
    path = Path(run_dir) / "metrics.json"
    if Progress(**ck["progress"]).finished(cfg) and path.is_file():
        return json.loads(path.read_text())
    return None
