"""`k2l train`: prepare-if-needed → Stage 1 (warm-up + rounds) → Stage 2 → evaluation.

The whole method in one readable function, :func:`train`. Its pieces are separate and
have plain array interfaces so that they can be distributed: :func:`extract`
(Φ over a set of samples), :func:`recover_correspondence` (clustering → pseudo-labels),
:func:`train_iterations` (N steps on the current pseudo-labels).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from k2l_dist import distributed
from k2l_dist.augment import build_loader
from k2l_dist.clustering import assign, cluster_dedup, flip_permutation, two_way_cluster
from k2l_dist.config import Config, save_config
from k2l_dist.data.prepare import is_prepared, prepare
from k2l_dist.data.shards import load_manifest, load_samples_meta
from k2l_dist.models import KeypointNet, LandmarkNet
from k2l_dist.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from k2l_dist.train.extract import Extraction, extract
from k2l_dist.train.labels import LabelTable
from k2l_dist.train.steps import stage1_losses, stage2_losses
from k2l_dist.utils.io import atomic_write_text
from k2l_dist.utils.metrics import MetricsLogger


@dataclasses.dataclass
class Split:
    train: np.ndarray  # ids Φ and Ψ train on (unsupervised: their annotations are never read)
    test: np.ndarray  # held-out ids: never trained on, never used to fit a regressor


def make_split(ids: np.ndarray, test_count: int) -> Split:
    """The last ``test_count`` ids are held out (a fixed, documented split)."""
    ids = np.sort(ids)
    test_count = min(max(test_count, 0), len(ids) // 2)
    return Split(ids[: len(ids) - test_count], ids[len(ids) - test_count :])


def initial_table(meta: dict, ids: np.ndarray) -> LabelTable:
    """Warm-up labels: the generic keypoints of each sample, without clusters (-1)."""
    counts = np.diff(meta["kp_offsets"])
    image_ids = np.repeat(meta["ids"], counts)
    keep = np.isin(image_ids, ids)
    return LabelTable.from_points(image_ids[keep], meta["keypoints"][keep], all_ids=ids)


def _loader(cfg: Config, shard_dir: Path, ids: np.ndarray, info, *, train: bool, seed: int):
    aug = cfg.augment if train else dataclasses.replace(cfg.augment, enabled=False)
    return build_loader(shard_dir, aug, rank=info.rank, world_size=info.world_size, seed=seed,
                        device=info.device, views=2 if train else 1, shuffle=train,
                        padded="mark" if train else "drop", ids=ids)


def train_iterations(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader,
                     loss_fn: Callable[[dict], dict], iterations: int, *, step: int, log: MetricsLogger,
                     prefix: str, log_every: int, show_progress: bool) -> int:
    """``iterations`` optimiser steps over (repeated epochs of) ``loader``; returns the new step."""
    model.train()
    batches = _forever(loader)
    bar = tqdm(range(iterations), desc=prefix.rstrip("/"), unit="it", disable=not show_progress, leave=False)
    for _ in bar:
        batch = next(batches)
        losses = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        step += 1
        if step % log_every == 0:
            log.scalars(step, losses, prefix)
            log.scalars(step, {"lr": optimizer.param_groups[0]["lr"]}, prefix)
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
    return step


def _forever(loader) -> Iterator[dict]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training loader yielded no batch")


def recover_correspondence(ext: Extraction, cfg: Config, ids: np.ndarray) -> tuple[LabelTable, dict, np.ndarray]:
    """Paper Eq. 1: two-way K-means → per-point M-cluster labels (+ flipped labels)."""
    res = two_way_cluster(ext.descriptors, ext.image_ids, cfg.cluster.K, cfg.cluster.M, cfg.cluster)
    use = res.usable
    flipped = res.labels_m[use]
    if ext.flipped_descriptors is not None:
        flipped, _ = assign(ext.flipped_descriptors[use], res.centroids_m, use_gpu=cfg.cluster.use_gpu)
    table = LabelTable.from_points(ext.image_ids[use], ext.points[use], res.labels_m[use], flipped, all_ids=ids)
    stats = res.stats.summary()
    sizes = res.stats.cluster_sizes_m
    stats.update(cluster_size_min=int(sizes.min()), cluster_size_median=float(np.median(sizes)),
                 cluster_size_max=int(sizes.max()))
    stats["images_kept_share"] = 1.0 - len(res.skipped_images) / max(len(ids), 1)
    return table, stats, res.centroids_m


def final_landmarks(ext: Extraction, cfg: Config, ids: np.ndarray) -> tuple[LabelTable, np.ndarray, np.ndarray, dict]:
    """Stage 2 labels (Sec. 3.6-3.7): a last K-means to K, ≤1 point per cluster per image,
    and the K↔K flip permutation from counts over the whole dataset (Hungarian)."""
    res = cluster_dedup(ext.descriptors, ext.image_ids, cfg.cluster.K, cfg.cluster)
    keep = res.keep
    labels = res.labels[keep]
    perm = np.arange(cfg.cluster.K)
    if ext.flipped_descriptors is not None:
        flipped, _ = assign(ext.flipped_descriptors[keep], res.kmeans.centroids, use_gpu=cfg.cluster.use_gpu)
        perm = flip_permutation(labels, flipped, cfg.cluster.K)
    table = LabelTable.from_points(ext.image_ids[keep], ext.points[keep], labels, perm[labels], all_ids=ids)
    stats = {"points_per_image": float(keep.sum() / max(len(ids), 1)),
             "cluster_sizes_min": int(np.bincount(labels, minlength=cfg.cluster.K).min())}
    return table, res.kmeans.centroids, perm, stats


def train(cfg: Config, resume: bool = True) -> dict:
    info = distributed.enable(cfg.device)
    run_dir = Path(cfg.run_dir)
    shard_dir = Path(cfg.data.shards or run_dir / "shards")
    if info.is_main and not is_prepared(shard_dir):
        print(prepare(cfg, shard_dir).text())
    distributed.barrier()
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
    split = make_split(meta["ids"], cfg.eval.test_count if "landmarks" in meta else 0)
    log = MetricsLogger(run_dir, info.is_main)
    show = info.is_main and cfg.progress
    s1, s2 = cfg.stage1, cfg.stage2
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    phi = KeypointNet(cfg.model).to(info.device)
    opt = torch.optim.RMSprop(phi.parameters(), lr=s1.lr, weight_decay=s1.weight_decay)
    ckpt_path = run_dir / "checkpoint.pt"
    step, done_rounds, table = 0, -1, initial_table(meta, split.train)
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        phi.load_state_dict(ck["phi"])
        opt.load_state_dict(ck["optimizer"])
        step, done_rounds, table = ck["step"], ck["round"], LabelTable.from_state(ck["labels"])
        set_rng_state(ck["rng"])
        gen.set_state(ck["generator"])
        print(f"resumed from {ckpt_path}: step {step}, round {done_rounds}")

    def checkpoint(phase: str, **extra) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, {"phi": phi.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                        "round": done_rounds, "labels": table.state(), "rng": rng_state(),
                                        "generator": gen.get_state(), "phase": phase,
                                        "config": dataclasses.asdict(cfg), **extra})

    run = lambda loss_cfg, n, prefix, loader: train_iterations(  # noqa: E731
        phi, opt, loader, lambda b: stage1_losses(phi, b, table, max_points=s1.max_points, loss_cfg=loss_cfg,
                                                  generator=gen),
        n, step=step, log=log, prefix=prefix, log_every=cfg.log_every, show_progress=show)

    # ---- Stage 1: warm-up on known correspondences (two augmentations of one image).
    t0 = time.time()
    if done_rounds < 0:
        warm = dataclasses.replace(cfg.loss, correspondence="equivariance")
        step = run(warm, s1.warmup_iters, "warmup/", _loader(cfg, shard_dir, split.train, info, train=True, seed=cfg.seed))
        done_rounds = 0
        checkpoint("warmup")
    extract_loader = _loader(cfg, shard_dir, split.train, info, train=False, seed=cfg.seed)
    # ---- Stage 1 rounds: recover correspondence, then train on the pseudo-labels.
    for rnd in range(done_rounds, s1.rounds):
        ext = _extract_all(phi, extract_loader, cfg, show)
        table, stats, centroids_m = recover_correspondence(ext, cfg, split.train)
        stats["points_per_image_extracted"] = len(ext.image_ids) / max(ext.num_images, 1)
        log.scalars(rnd + 1, stats, "round/")
        if info.is_main:
            _round_grid(shard_dir, table, split.train[:16], run_dir / "rounds" / f"round{rnd + 1:03d}.png", log, rnd + 1)
        if show:
            print(f"round {rnd + 1}/{s1.rounds}: {stats['points_per_image_after']:.1f} points/image kept, "
                  f"{stats['images_kept_share']:.0%} images kept")
        step = run(cfg.loss, s1.iters_per_round, f"round{rnd + 1}/",
                   _loader(cfg, shard_dir, split.train, info, train=True, seed=cfg.seed + rnd + 1))
        done_rounds = rnd + 1
        checkpoint("stage1", centroids_m=torch.from_numpy(centroids_m))
    stage1_seconds = time.time() - t0

    # ---- Stage 2: K clusters → K-heatmap detector Ψ initialised from Φ.
    ext = _extract_all(phi, extract_loader, cfg, show)
    table2, centroids, perm, stats2 = final_landmarks(ext, cfg, split.train)
    log.scalars(0, stats2, "stage2_labels/")
    psi = LandmarkNet.from_keypoint_net(phi, cfg.cluster.K).to(info.device)
    opt2 = torch.optim.RMSprop(psi.parameters(), lr=s2.lr, weight_decay=s2.weight_decay)
    aug2 = dataclasses.replace(cfg.augment, flip_prob=cfg.augment.flip_prob if s2.flip_train else 0.0)
    loader2 = build_loader(shard_dir, aug2, rank=info.rank, world_size=info.world_size, seed=cfg.seed + 10_000,
                           device=info.device, views=1, shuffle=True, padded="mark", ids=split.train)
    step2 = train_iterations(psi, opt2, loader2,
                             lambda b: stage2_losses(psi, b, table2, num_landmarks=cfg.cluster.K,
                                                     sigma=cfg.loss.heatmap_sigma),
                             s2.iterations, step=0, log=log, prefix="stage2/", log_every=cfg.log_every,
                             show_progress=show)
    if info.is_main:
        save_checkpoint(run_dir / "model.pt", {
            "psi": psi.state_dict(), "phi": phi.state_dict(), "centroids": torch.from_numpy(centroids),
            "flip_permutation": torch.from_numpy(perm.astype(np.int64)), "num_landmarks": cfg.cluster.K,
            "stage2_labels": table2.state(), "step": step2, "config": dataclasses.asdict(cfg)})
    train_seconds = time.time() - t0

    # ---- Evaluation.
    metrics: dict = {"train_seconds": round(train_seconds, 1), "stage1_seconds": round(stage1_seconds, 1)}
    if info.is_main and "landmarks" in meta:
        from k2l_dist.eval.evaluate import evaluate_run

        metrics.update(evaluate_run(cfg, shard_dir, manifest, meta, split, phi, psi, centroids, perm, log,
                                    device=info.device))
    if info.is_main:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    log.close()
    return metrics


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


def _extract_all(phi: torch.nn.Module, loader, cfg: Config, show: bool) -> Extraction:
    ext = extract(phi, loader, max_points=cfg.stage1.extract_points, threshold=cfg.stage1.detect_threshold,
                  nms_radius=cfg.stage1.nms_radius, flip=cfg.stage1.flip, total=len(loader), show_progress=show)
    gathered = distributed.all_gather_arrays(ext.as_dict())
    return Extraction(gathered["image_ids"], gathered["points"], gathered["scores"], gathered["descriptors"],
                      gathered.get("flipped_descriptors"), num_images=int(len(np.unique(gathered["image_ids"]))))
