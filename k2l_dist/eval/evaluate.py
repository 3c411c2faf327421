"""Run-level evaluation (paper Sec. 4.2): predictions → NMEs, baselines, accuracy, CED plots.

Every number stands beside what trivial methods get on the same split: the mean shape,
and the keypoint baseline (the initial generic keypoints' own descriptors clustered into
K groups with the same modified K-means, no learning).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from k2l_dist.augment import build_loader
from k2l_dist.augment.pipeline import resolve_device
from k2l_dist.clustering import assign, cluster_dedup, dedup_per_image
from k2l_dist.config import flatten, run_config
from k2l_dist.data.shards import load_manifest, load_samples_meta, read_dataset
from k2l_dist.eval.completion import column_means, fill_with_means, svt
from k2l_dist.eval.detector import landmarks_in_views
from k2l_dist.eval.metrics import mean_shape_baseline, pck, raw_landmark_accuracy, temporal_jitter
from k2l_dist.eval.names import LandmarkNames, save_names
from k2l_dist.eval.regression import backward_nme, forward_nme, landmark_norm
from k2l_dist.eval.split import regressor_ids, split_for_run
from k2l_dist.keypoints import descriptors_to_float
from k2l_dist.models import KeypointNet, LandmarkNet
from k2l_dist.models.extract import extract, extraction_cap
from k2l_dist.models.regions import CropRegions
from k2l_dist.utils.checkpoint import load_checkpoint, model_file
from k2l_dist.utils.geometry import inverse_affine, transform_points
from k2l_dist.utils.io import atomic_write_text
from k2l_dist.utils.lock import RunLock
from k2l_dist.utils.metrics import MetricsLogger

logger = logging.getLogger(__name__)



def slots_from_points(image_ids: np.ndarray, points: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                      num_landmarks: int) -> np.ndarray:
    """(len(ids), K, 2) with each labelled point in its slot and NaN where a slot is empty."""
    out = np.full((len(ids), num_landmarks, 2), np.nan, np.float64)
    row = np.searchsorted(ids, image_ids)
    ok = (labels >= 0) & (row < len(ids))
    ok[ok] &= ids[row[ok]] == image_ids[ok]
    out[row[ok], labels[ok]] = points[ok]
    return out


@torch.no_grad()
def predict_landmarks(psi: torch.nn.Module, loader, perm: np.ndarray | None, show_progress: bool = False):
    """Ψ's K landmarks per image in crop pixels; with ``perm``, flip-test averaging:
    the heatmaps of the mirrored image, mirrored back and channel-permuted, are averaged in."""
    psi.eval()
    ids, pts, conf = [], [], []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not show_progress, leave=False):
        view_pts, c = landmarks_in_views(psi, batch["view0"], perm)
        crop = transform_points(view_pts, inverse_affine(batch["matrix0"]).to(view_pts.device))
        ids.append(batch["id"].cpu().numpy())
        pts.append(crop.cpu().numpy())
        conf.append(c.cpu().numpy())
    ids = np.concatenate(ids)
    order = np.argsort(ids)
    return ids[order], np.concatenate(pts)[order].astype(np.float64), np.concatenate(conf)[order]


def stage1_landmarks(phi: torch.nn.Module, loader, centroids: np.ndarray, ids: np.ndarray, cfg,
                     regions=None) -> np.ndarray:
    """Φ's discovered landmarks: detections assigned to the final K centroids, ≤1 per cluster."""
    ext = extract(phi, loader, max_points=extraction_cap(cfg), threshold=cfg.stage1.detect_threshold,
                  nms_radius=cfg.stage1.nms_radius, flip=False, subpixel=cfg.stage1.subpixel, show_progress=False,
                  regions=regions)
    labels, dist = assign(ext.descriptors, centroids)
    keep = dedup_per_image(ext.image_ids, labels, dist)
    return slots_from_points(ext.image_ids[keep], ext.points[keep], labels[keep], ids, len(centroids))


def keypoint_baseline(shard_dir: Path, train_ids: np.ndarray, ids: np.ndarray, cfg) -> np.ndarray:
    """The method's first correspondence step without learning, on the generic keypoints."""
    image_ids, points, descs = [], [], []
    for s in read_dataset(shard_dir, skip_unreadable=True):  # unreadable images count as undetected
        image_ids.append(np.full(len(s.keypoints), s.id, np.int64))
        points.append(s.keypoints)
        descs.append(descriptors_to_float(s.descriptors))
    image_ids, points = np.concatenate(image_ids), np.concatenate(points)
    descs = np.concatenate(descs).astype(np.float32)
    descs /= np.linalg.norm(descs, axis=1, keepdims=True).clip(1e-12)
    fit = np.isin(image_ids, train_ids)
    res = cluster_dedup(descs[fit], image_ids[fit], cfg.cluster.K, cfg.cluster)
    labels, dist = assign(descs, res.kmeans.centroids)
    keep = dedup_per_image(image_ids, labels, dist)
    return slots_from_points(image_ids[keep], points[keep], labels[keep], ids, cfg.cluster.K)


def _complete(train: np.ndarray, test: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stage-1 style filling: SVT on the train matrix, train means on the test matrix; and
    how the SVT went (iterations, residual, converged)."""
    n, k, _ = train.shape
    tr = train.reshape(n, -1)
    done = svt(tr, iters=cfg.eval.svt_iters, tol=cfg.eval.svt_tol)
    means = column_means(tr)
    means = np.where(np.isnan(means), np.nanmean(tr), means)
    te = fill_with_means(test.reshape(len(test), -1), means)
    info = {"missing_share": float(np.isnan(tr).mean()), "iterations": done.iterations,
            "residual": done.residual, "converged": done.converged}
    return done.matrix.reshape(n, k, 2), te.reshape(len(test), k, 2), info


def evaluate_run(cfg, shard_dir: Path, manifest: dict, meta: dict, split, phi, psi, centroids: np.ndarray,
                 perm: np.ndarray, log, device) -> dict:
    """All metrics of a finished run; writes CED plots and a landmark grid into the run folder."""
    from k2l_dist.eval.plots import save_ced_plot  # matplotlib only when a run is evaluated

    ecfg = cfg.eval
    ecfg_used = _normalisation(ecfg, manifest)
    reg_ids = regressor_ids(split, ecfg.regressor_train_count, ecfg.seed)
    test_ids = split.test
    if len(test_ids) == 0 or len(reg_ids) < 2:
        logger.warning("evaluation skipped: %d held-out and %d regressor images (eval.split=%s, eval.test_count=%d "
                     "of %d images)", len(test_ids), len(reg_ids), ecfg.split, ecfg.test_count,
                     len(split.train) + len(split.test))
        return {"evaluation_skipped": "too few images to hold out a test set"}
    eval_ids = np.union1d(reg_ids, test_ids)
    aug = dataclasses.replace(cfg.augment, enabled=False)
    loader = lambda: build_loader(shard_dir, aug, device=device, views=1, shuffle=False,  # noqa: E731
                                  padded="drop", ids=eval_ids, seed=cfg.seed)
    gt = meta["landmarks"].astype(np.float64)[np.searchsorted(meta["ids"], eval_ids)]
    ids, pred, _ = predict_landmarks(psi, loader(), perm if cfg.stage2.flip_test else None)
    eval_ids, gt, skipped = _scored(ids, eval_ids, gt, shard_dir)
    is_reg, is_test = np.isin(eval_ids, reg_ids), np.isin(eval_ids, test_ids)
    fwd = forward_nme(pred[is_reg], gt[is_reg], pred[is_test], gt[is_test], ecfg_used)
    bwd = backward_nme(pred[is_reg], gt[is_reg], pred[is_test], gt[is_test], ecfg_used)

    regions = CropRegions.from_meta(meta, int(manifest["size"])) if cfg.loss.mask_padding else None
    s1 = stage1_landmarks(phi, loader(), centroids, eval_ids, cfg, regions)
    s1_fwd, s1_bwd, s1_svt = _completed_scores(s1, gt, is_reg, is_test, cfg, ecfg_used)
    kp = keypoint_baseline(shard_dir, split.train, eval_ids, cfg)
    kp_fwd, kp_bwd, kp_svt = _completed_scores(kp, gt, is_reg, is_test, cfg, ecfg_used)

    norm_test = landmark_norm(gt[is_test], ecfg_used.norm, ecfg_used.eye_indices)
    mean_shape = mean_shape_baseline(gt[is_reg], gt[is_test], norm_test,
                                     center="none" if ecfg.center == "dataset" else "gt")
    size = manifest["size"]
    scale = size / ecfg.accuracy_ref_size  # the paper's pixels at 128 px, at this crop size
    acc = raw_landmark_accuracy(pred[is_test], gt[is_test], np.full(is_test.sum(), scale),
                                ecfg.accuracy_thresholds[0],
                                match_on=(pred[is_reg], gt[is_reg], np.full(is_reg.sum(), scale)))

    run_dir = Path(cfg.run_dir)
    names = manifest.get("landmark_names") or [f"lm{i}" for i in range(gt.shape[1])]
    if fwd.map is not None:  # the forward regressor names the detector's landmarks (load_detector(named=True))
        save_names(LandmarkNames(list(names), fwd.map, int(size), fwd.n_train), run_dir)
    curves = {"forward (Ψ)": fwd.per_image, "backward (Ψ)": bwd.per_image, "stage 1 forward": s1_fwd.per_image,
              "keypoint baseline": kp_fwd.per_image, "mean shape": mean_shape.per_image}
    aucs = save_ced_plot(curves, run_dir / "ced.png", ecfg.ced_max, title=f"CED on {len(test_ids)} held-out images")
    metrics = {
        "forward_nme": fwd.mean, "backward_nme": bwd.mean, "stage1_forward_nme": s1_fwd.mean,
        "mean_shape_nme": mean_shape.mean, "keypoint_baseline_nme": kp_fwd.mean,
        "stage1_backward_nme": s1_bwd.mean, "keypoint_baseline_backward_nme": kp_bwd.mean,
        "raw_accuracy": acc["mean_accuracy"],
        "raw_accuracy_per_landmark": dict(zip(names, map(float, acc["accuracy"]))),
        "forward_nme_per_landmark": dict(zip(names, map(float, fwd.per_landmark_mean))),
        "ced_auc": aucs, "regressor_train_images": int(is_reg.sum()), "test_images": int(is_test.sum()),
        "normalisation": ecfg_used.norm, "eval_images_skipped": skipped,
        "split": ecfg.split, "stage1_completion": s1_svt, "keypoint_baseline_completion": kp_svt,
    }
    torso = manifest.get("torso_indices")
    if torso:  # bodies: PCK@0.2 of the torso, beside NME
        metrics.update({f"{name}_pck": pck(result.per_landmark, norm_test, gt[is_test], tuple(torso))
                        for name, result in (("forward", fwd), ("stage1_forward", s1_fwd),
                                             ("mean_shape", mean_shape))})
    if "videos" in meta:  # video: how steadily the regressed landmarks follow the motion
        rows = np.searchsorted(meta["ids"], eval_ids[is_test])
        metrics["temporal_jitter"] = temporal_jitter(fwd.map.predict(pred[is_test]), gt[is_test],
                                                     meta["videos"][rows], meta["frames"][rows])
    _publish(metrics, log, shard_dir, ids[is_test][:16], list(pred[is_test][:16]), run_dir)
    return metrics


def _normalisation(ecfg, manifest: dict):
    """``eval`` with ``auto`` resolved: interocular with the dataset's own eye (or shoulder)
    indices when the shards name them, else the box."""
    norm_idx = manifest.get("norm_indices")
    norm = ecfg.norm if ecfg.norm != "auto" else ("interocular" if norm_idx else "box")
    eyes = tuple(norm_idx) if (norm_idx and ecfg.norm == "auto") else tuple(ecfg.eye_indices)
    return dataclasses.replace(ecfg, norm=norm, eye_indices=eyes, regressor_train_count=0)


def _scored(ids: np.ndarray, eval_ids: np.ndarray, gt: np.ndarray,
            shard_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The evaluation images that were predicted, their ground truth, and how many were not.
    Samples the loader had to skip (corrupt image, truncated shard) cannot be scored:
    evaluation goes on with the rest and says how many were left out."""
    predicted = np.isin(eval_ids, ids)
    skipped = int((~predicted).sum())
    if skipped:
        logger.warning("evaluation: %d of %d images unreadable in %s, left out of the metrics", skipped,
                     len(eval_ids), shard_dir)
        eval_ids, gt = eval_ids[predicted], gt[predicted]
    if not np.array_equal(ids, eval_ids):
        raise RuntimeError("evaluation predicted images outside the evaluation split, or one image twice")
    return eval_ids, gt, skipped


def _completed_scores(points: np.ndarray, gt: np.ndarray, is_reg: np.ndarray, is_test: np.ndarray, cfg, ecfg_used):
    """Forward and backward NME of points with gaps (Stage 1's, the keypoint baseline's),
    completed as Sec. 4.2 does; backward targets: the completed training matrix, and only
    the test points detected."""
    train, test, svt_report = _complete(points[is_reg], points[is_test], cfg)
    fwd = forward_nme(train, gt[is_reg], test, gt[is_test], ecfg_used)
    bwd = backward_nme(train, gt[is_reg], points[is_test], gt[is_test], ecfg_used)
    return fwd, bwd, svt_report


def _publish(metrics: dict, log, shard_dir: Path, grid_ids: np.ndarray, grid_points: list, run_dir: Path) -> None:
    """The metrics and pictures on TensorBoard; the test landmarks' grid as a file too."""
    log.scalars(0, {k: v for k, v in metrics.items() if isinstance(v, float)}, "eval/")
    log.text("eval/metrics", metrics_table(metrics))
    log_landmark_grid(shard_dir, grid_ids, grid_points, run_dir / "landmarks_test.png", log, "landmarks/test")
    ced = cv2.imread(str(run_dir / "ced.png"))
    if ced is not None:
        log.image("eval/ced", ced[..., ::-1].copy(), 0)


def metrics_table(metrics: dict) -> str:
    """The evaluation as one markdown table (TensorBoard's text tab): every number, and each
    per-landmark figure as its own row."""
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            rows += [f"| {key}: {name} | {v:.4f} |" for name, v in value.items()]
    return "\n".join(rows)


def log_landmark_grid(shard_dir: Path, ids: np.ndarray, points: list[np.ndarray], path: Path, log,
                      tag: str, step: int = 0) -> None:
    """Draw ``points[i]`` (row k in colour k, NaN rows skipped) on sample ``ids[i]``'s crop;
    save a PNG grid and send it to TensorBoard."""
    import cv2

    from k2l_dist.eval.plots import save_grid

    wanted = {int(i): k for k, i in enumerate(ids)}
    images: list = [None] * len(ids)
    for s in read_dataset(shard_dir, skip_unreadable=True):
        if s.id in wanted:
            images[wanted.pop(s.id)] = s.image()
            if not wanted:
                break
    keep = [i for i, im in enumerate(images) if im is not None]
    if not keep:
        return
    save_grid([images[i] for i in keep], [points[i] for i in keep], path, cols=8)
    grid = cv2.imread(str(path))
    if grid is not None:
        log.image(tag, grid[..., ::-1].copy(), step)


# What decides which images are held out: a run is evaluated only on its own held-out images
# (any other split would score images the run trained on).
SPLIT_KEYS = ("eval.split", "eval.split_file", "eval.split_pattern", "eval.test_count", "eval.seed")


def evaluate_checkpoint(run_dir: str | Path, device: str = "auto", overrides: list[str] | tuple = (),
                        config: str | Path | None = None) -> dict:
    """Re-evaluate a finished run from its ``model.pt``; its saved config ← ``config`` (a YAML
    file) ← ``overrides``, on the run's own held-out split. The new numbers replace the
    evaluation's in metrics.json; what training wrote there (its time, world size, skipped
    samples) is kept. Holds the run folder's lock while it works."""
    model = model_file(run_dir)
    run_dir = model.parent
    ck = load_checkpoint(model)
    saved = ck["config"]
    if "split" not in saved.get("eval", {}):  # trained before eval.split existed: it held out the last ids
        saved = {**saved, "eval": {**saved.get("eval", {}), "split": "last"}}
    cfg = dataclasses.replace(run_config(saved, config, tuple(overrides)), run_dir=str(run_dir))
    _refuse_another_split(cfg, run_config(saved), run_dir)
    with RunLock(run_dir, "k2l evaluate"):
        shard_dir = Path(cfg.data.shards or run_dir / "shards")
        manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
        if "landmarks" not in meta:
            raise ValueError(f"{shard_dir}: the dataset has no annotated landmarks to evaluate against")
        dev = resolve_device(device)
        phi = KeypointNet(cfg.model)
        phi.load_state_dict(ck["phi"])
        psi = LandmarkNet(cfg.model, int(ck["num_landmarks"]))
        psi.load_state_dict(ck["psi"])
        log = MetricsLogger(run_dir)
        metrics = evaluate_run(cfg, shard_dir, manifest, meta, split_for_run(cfg.eval, meta, shard_dir),
                               phi.to(dev), psi.to(dev), ck["centroids"].numpy(), ck["flip_permutation"].numpy(),
                               log, dev)
        log.close()
        path = run_dir / "metrics.json"
        merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **metrics}
        atomic_write_text(path, json.dumps(merged, indent=1))
    return merged


def _refuse_another_split(cfg, trained, run_dir: Path) -> None:
    """A held-out split other than the run's (``SPLIT_KEYS``) is refused, naming each key."""
    now, before = flatten(dataclasses.asdict(cfg)), flatten(dataclasses.asdict(trained))
    changed = [f"{k}={now[k]!r} (the run's: {before[k]!r})" for k in SPLIT_KEYS if now.get(k) != before.get(k)]
    if changed:
        raise ValueError(f"{'; '.join(changed)}: another held-out split would score images the run trained on; "
                         f"{run_dir} is evaluated on its own split only (train again to hold out other images)")
