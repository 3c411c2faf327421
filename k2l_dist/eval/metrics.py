"""Landmark metrics beyond the linear regressor: raw accuracy, CED curves, mean-shape baseline."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from k2l_dist.eval.regression import NMEResult, as_points, landmark_errors


def _match_stats(P: np.ndarray, G: np.ndarray, norm: np.ndarray, threshold: float,
                 miss_penalty: float) -> tuple[np.ndarray, ...]:
    """Per (annotation g, discovered k): mean cost, hit rate within ``threshold``, mean
    distance where detected and detection rate, over the images where g is annotated."""
    n, Kd, Kg = P.shape[0], P.shape[1], G.shape[1]
    if G.shape[0] != n or norm.shape[0] != n:
        raise ValueError(f"pred {P.shape}, gt {G.shape} and norm {norm.shape} disagree on n")
    det = np.isfinite(P).all(-1)  # (n, Kd)
    cost = np.full((Kg, Kd), np.inf)
    hit = np.zeros((Kg, Kd))
    mean_d = np.zeros((Kg, Kd))
    det_rate = np.zeros((Kg, Kd))
    for g in range(Kg):  # loop over annotations only: keeps memory at (n, Kd)
        valid = np.isfinite(G[:, g]).all(-1) & np.isfinite(norm) & (norm > 0)
        if not valid.any():
            continue
        d = np.linalg.norm(P[valid] - G[valid, g][:, None, :], axis=-1) / norm[valid, None]  # (nv, Kd)
        dv = det[valid]
        cost[g] = np.where(dv, d, miss_penalty).mean(0)
        hit[g] = (dv & (np.where(dv, d, np.inf) <= threshold)).mean(0)
        det_rate[g] = dv.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_d[g] = np.where(dv, d, 0.0).sum(0) / dv.sum(0)
    return cost, hit, mean_d, det_rate


def raw_landmark_accuracy(
    pred: np.ndarray,
    gt: np.ndarray,
    norm: np.ndarray,
    threshold: float,
    miss_penalty: float = 1.0,
    match_on: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray | float]:
    """Accuracy of raw discovered landmarks matched one-to-one to annotations (paper Fig. 10, Table 8).

    ``pred`` (n, Kd, 2) with NaN for undetected landmarks; ``gt`` (n, Kg, 2) with NaN for
    unannotated ones; ``norm`` (n,) divides every distance (pass ``image_side / 128`` and
    ``threshold=6`` for the paper's "6 px at 128 px", or the inter-ocular distance for
    NME units). The matching is the Hungarian algorithm on
    ``cost[g, k]`` = mean over images (with annotation g) of ``||pred_k - gt_g|| / norm``,
    where an undetected ``pred_k`` costs ``miss_penalty`` (default 1 normaliser unit, far
    beyond any threshold) so a landmark that is rarely detected cannot win a match on a
    few lucky images. ``match_on`` = ``(pred, gt, norm)`` of other images (the regressor's)
    fits the matching there, so the images scored never choose their own matching.
    Accuracy of annotation g = share of its images where the matched landmark is detected
    within ``threshold``. With Kd < Kg, unmatched annotations get ``matching = -1`` and
    accuracy 0 (they count against ``mean_accuracy``).

    Returns ``matching`` (Kg,) index into Kd, ``accuracy`` (Kg,), ``mean_accuracy``,
    ``mean_distance`` (Kg,) over images where the match is detected, ``detection_rate``
    (Kg,), ``cost`` (Kg, Kd) the matching was fitted on, ``threshold``.
    """
    P, G = as_points(pred, "pred"), as_points(gt, "gt")
    norm = np.asarray(norm, dtype=np.float64).reshape(-1)
    Kg = G.shape[1]
    cost, hit, mean_d, det_rate = _match_stats(P, G, norm, threshold, miss_penalty)
    if match_on is not None:
        mp, mg, mn = match_on
        cost = _match_stats(as_points(mp, "match pred"), as_points(mg, "match gt"),
                            np.asarray(mn, np.float64).reshape(-1), threshold, miss_penalty)[0]
    # annotations never seen cannot be matched; give them a cost the solver can carry
    finite = np.isfinite(cost)
    big = (cost[finite].max() + 1.0) * max(Kg, 1) if finite.any() else 1.0
    rows, cols = linear_sum_assignment(np.where(finite, cost, big))
    matching = np.full(Kg, -1, dtype=np.int64)
    ok = finite[rows, cols]
    matching[rows[ok]] = cols[ok]
    m = matching >= 0
    accuracy = np.zeros(Kg)
    mean_distance = np.full(Kg, np.nan)
    detection = np.zeros(Kg)
    accuracy[m] = hit[m, matching[m]]
    mean_distance[m] = mean_d[m, matching[m]]
    detection[m] = det_rate[m, matching[m]]
    return {
        "matching": matching,
        "accuracy": accuracy,
        "mean_accuracy": float(accuracy.mean()) if Kg else float("nan"),
        "mean_distance": mean_distance,
        "detection_rate": detection,
        "cost": cost,
        "threshold": float(threshold),
    }


def pck(per_landmark: np.ndarray, norm: np.ndarray, gt: np.ndarray, torso: tuple[int, int],
        alpha: float = 0.2) -> float:
    """PCK@``alpha`` of the torso: the share of scored landmarks within ``alpha`` × the
    distance between annotations ``torso`` (left shoulder and right hip for LSP) of their
    image. ``per_landmark`` (n, L): errors divided by ``norm`` (n,), as NME results hold them."""
    dist = np.asarray(per_landmark, np.float64) * np.asarray(norm, np.float64).reshape(-1, 1)
    G = as_points(gt, "gt")
    size = np.linalg.norm(G[:, torso[0]] - G[:, torso[1]], axis=-1)
    ok = np.isfinite(dist) & (np.isfinite(size) & (size > 0))[:, None]
    if not ok.any():
        return float("nan")
    return float((dist <= alpha * size[:, None])[ok].mean())


def temporal_jitter(pred: np.ndarray, gt: np.ndarray, videos: np.ndarray, frames: np.ndarray) -> float:
    """Per-video temporal stability: between consecutive frames of one video, how far the
    predicted landmarks' motion departs from the ground truth's, relative to that motion.

    For a video's frames in order, Σ_t Σ_l |Δpred − Δgt| / Σ_t Σ_l |Δgt| (Δ: frame t to t+1,
    pairs where either frame lacks a landmark left out); the mean over videos with motion.
    0: the landmarks move exactly as the annotations; 1: their frame-to-frame error is as
    large as the motion itself. ``pred``, ``gt`` (n, L, 2); ``videos``, ``frames`` (n,).
    """
    P, G = as_points(pred, "pred"), as_points(gt, "gt")
    videos, frames = np.asarray(videos).astype(str), np.asarray(frames)
    ratios = []
    for video in np.unique(videos):
        rows = np.flatnonzero(videos == video)
        rows = rows[np.argsort(frames[rows], kind="stable")]
        if len(rows) < 2:
            continue
        dp, dg = np.diff(P[rows], axis=0), np.diff(G[rows], axis=0)
        ok = np.isfinite(dp).all(-1) & np.isfinite(dg).all(-1)
        motion = np.linalg.norm(dg, axis=-1)[ok].sum()
        if motion > 0:
            ratios.append(np.linalg.norm(dp - dg, axis=-1)[ok].sum() / motion)
    return float(np.mean(ratios)) if ratios else float("nan")


def ced_curve(errors: np.ndarray, max_err: float, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: ``(thresholds (steps,), fraction of errors <= threshold)``.

    NaN errors (nothing to score, e.g. an unannotated landmark) are left out; +inf counts
    as a failure at every threshold.
    """
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    e = np.sort(e[~np.isnan(e)])
    thresholds = np.linspace(0.0, float(max_err), int(steps))
    if e.size == 0:
        return thresholds, np.zeros_like(thresholds)
    return thresholds, np.searchsorted(e, thresholds, side="right") / e.size


def ced_auc(thresholds: np.ndarray, fraction: np.ndarray) -> float:
    """Area under a CED curve divided by its x range (1 = every error is 0)."""
    span = float(thresholds[-1] - thresholds[0])
    if span <= 0:
        return float("nan")
    y, x = np.asarray(fraction, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / span)


def mean_shape_baseline(
    train_gt: np.ndarray,
    test_gt: np.ndarray,
    norm: np.ndarray,
    center: str = "gt",
) -> NMEResult:
    """NME of predicting the training mean shape for every test image.

    ``center="gt"`` (default): the mean of the training annotations, each centred on its
    own centroid, placed at the test annotations' centroid. That is the best a regressor
    can do from perfect position information and no shape information -- the same
    centred frame :func:`~k2l_dist.eval.regression.fit_linear` works in, with an oracle
    centroid -- so a forward NME not clearly below it means the discovered landmarks say
    nothing about shape. ``center="none"``: the raw mean of the training annotations
    (the baseline for ``EvalConfig.center="none"``).
    """
    tr, te = as_points(train_gt, "train_gt"), as_points(test_gt, "test_gt")
    ok = np.isfinite(tr).all((1, 2))
    if not ok.any():
        raise ValueError("mean_shape_baseline: no complete training annotation")
    tr = tr[ok]
    if center == "gt":
        shape = (tr - tr.mean(1, keepdims=True)).mean(0)
        with np.errstate(invalid="ignore"):
            # test centroid over annotated points; the mean shape's centroid over the same points
            vis = np.isfinite(te).all(-1)
            c_te = np.where(vis[..., None], te, 0.0).sum(1) / vis.sum(1)[:, None]
            c_sh = (vis[..., None] * shape[None]).sum(1) / vis.sum(1)[:, None]
        pred = shape[None] - c_sh[:, None, :] + c_te[:, None, :]
    elif center == "none":
        pred = np.broadcast_to(tr.mean(0), te.shape)
    else:
        raise ValueError(f"unknown center mode {center!r} (gt | none)")
    per_lm, per_img = landmark_errors(pred, te, norm)
    scored = np.isfinite(per_img)
    mean = float(per_img[scored].mean()) if scored.any() else float("nan")
    return NMEResult(mean, per_img, per_lm, None, int(tr.shape[0]), int(scored.sum()))
