"""Linear evaluation of discovered landmarks (paper Sec. 4.2 "Evaluation").

Forward NME: a linear regressor *with no bias* maps the discovered landmarks of an
image to its manual annotations; it is fitted on (a subset of) the training images and
its NME measured on the test images. Backward NME (Sanchez & Tzimiropoulos [53]) swaps
the roles -- annotations -> discovered landmarks -- and flags unstable landmarks; it is
normalised by the same annotation-based distance.

Centring (``EvalConfig.center``). ``"dataset"`` (the default): coordinates are
mean-centred with the training set's means of inputs and targets, a no-bias ridge maps
centred inputs to centred targets, and the target mean is added back; the mean-shape
baseline (predict the training mean annotation) is exactly this regressor with W = 0,
so the two numbers are comparable. ``"input"``: without a bias a linear map of raw
coordinates must fake translation through its weights. We instead remove it
explicitly: for each image we subtract the centroid ``c`` of the regressor's *input*
landmarks (discovered ones for forward, annotations for backward) from both input and
target, fit ``W`` on the centred coordinates, and predict ``(X - c) @ W + c``. Only the
input is needed at test time (the annotation centroid is unknown to a forward
regressor), so train and test use the same frame, and the prediction moves with the
image: translating all input landmarks by ``t`` translates the prediction by ``t``.
``center="none"`` is the plain no-bias regression on raw coordinates.

Layout: landmarks are ``(n, L, 2)`` arrays of (x, y), or the same flattened to
``(n, 2L)`` as ``x0, y0, x1, y1, ...`` (row-major reshape). NME per image = mean over
landmarks of ``||pred - gt|| / norm``, ``norm`` = distance between two annotated
landmarks (``"interocular"``; e.g. MTFL eye centres 0, 1, or shoulders for bodies) or
the square root of the annotations' bounding-box area (``"box"``). Errors are
fractions (x100 for the percentages the paper prints).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from k2l_dist.config import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class NMEResult:
    mean: float  # mean NME over test images with a finite error
    per_image: np.ndarray  # (n,) NaN where the image could not be scored
    per_landmark: np.ndarray  # (n, L) normalised error of every predicted landmark
    W: np.ndarray | None = field(default=None, repr=False)  # (2 L_in, 2 L_out); None for baselines
    n_train: int = 0  # images the regressor was fitted on
    n_scored: int = 0  # test images with a finite per-image error
    map: LinearMap | None = field(default=None, repr=False)  # the fitted regressor itself

    @property
    def per_landmark_mean(self) -> np.ndarray:
        """(L,) mean normalised error of each landmark over images (NaN-aware)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN is intended
            return np.nanmean(self.per_landmark, axis=0)


@dataclass
class LinearMap:
    """A fitted regressor from landmarks (n, L_in, 2) to landmarks (n, L_out, 2), in the
    centring of the module docstring: what forward NME scores, and what names a detector's
    landmarks (``eval.names``)."""

    W: np.ndarray  # (2 L_in, 2 L_out)
    center: str  # "dataset" | "input" | "none"
    input_mean: np.ndarray | None = None  # (L_in, 2), center="dataset"
    target_mean: np.ndarray | None = None  # (L_out, 2), center="dataset"

    @classmethod
    def fit(cls, X: np.ndarray, Y: np.ndarray, alpha: float, center: str) -> LinearMap:
        """Fit on complete rows ``X`` (n, L_in, 2) → ``Y`` (n, L_out, 2)."""
        if center != "dataset":
            return cls(fit_linear(X, Y, alpha, center), center)
        # Mean-centred coordinates: subtract the training means of inputs and targets, fit a
        # no-bias map, add the target mean back. W = 0 is then the mean-shape baseline.
        mx, my = X.mean(0), Y.mean(0)
        return cls(fit_linear(X - mx, Y - my, alpha, "none"), center, mx, my)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, L_in, 2) → (n, L_out, 2); NaN rows stay NaN."""
        if self.center != "dataset":
            return predict_linear(X, self.W, self.center)
        return predict_linear(as_points(X, "X") - self.input_mean, self.W, "none") + self.target_mean


# --------------------------------------------------------------------------- helpers


def as_points(a: np.ndarray, name: str = "landmarks") -> np.ndarray:
    """(n, L, 2) or (n, 2L) -> (n, L, 2) float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 2:
        return a
    if a.ndim == 2 and a.shape[1] % 2 == 0:
        return a.reshape(a.shape[0], -1, 2)
    raise ValueError(f"{name}: expected (n, L, 2) or (n, 2L), got shape {a.shape}")


def landmark_norm(gt: np.ndarray, mode: str = "interocular", eye_indices: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Per-image normaliser (n,) from the annotations; NaN where it cannot be computed or is 0.

    ``"auto"`` is resolved per dataset by the run-level evaluation; here it means interocular.
    """
    gt = as_points(gt, "gt")
    if mode in ("interocular", "auto"):
        i, j = eye_indices
        d = np.linalg.norm(gt[:, i] - gt[:, j], axis=-1)
    elif mode == "box":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN image -> NaN norm
            lo, hi = np.nanmin(gt, axis=1), np.nanmax(gt, axis=1)
        wh = hi - lo
        d = np.sqrt(wh[:, 0] * wh[:, 1])
    else:
        raise ValueError(f"unknown normalisation {mode!r} (interocular | box)")
    return np.where(d > 0, d, np.nan)


def _centroids(P: np.ndarray) -> np.ndarray:
    return P.mean(axis=1, keepdims=True)  # (n, 1, 2)


def _ridge(X: np.ndarray, Y: np.ndarray, alpha: float) -> np.ndarray:
    if alpha > 0:
        G = X.T @ X
        lam = alpha * max(np.trace(G) / G.shape[0], np.finfo(np.float64).tiny)
        return np.linalg.solve(G + lam * np.eye(G.shape[0]), X.T @ Y)
    return np.linalg.lstsq(X, Y, rcond=None)[0]


# --------------------------------------------------------------------------- regression


def fit_linear(X: np.ndarray, Y: np.ndarray, alpha: float = 0.0, center: str = "input") -> np.ndarray:
    """No-bias ridge from landmarks ``X`` (n, L_in[, 2]) to ``Y`` (n, L_out[, 2]); W (2 L_in, 2 L_out).

    See the module docstring for ``center``. ``alpha`` is relative to the mean diagonal
    of XᵀX. Inputs must be finite (drop or complete missing landmarks first).
    """
    P, Q = as_points(X, "X"), as_points(Y, "Y")
    if P.shape[0] != Q.shape[0]:
        raise ValueError(f"X has {P.shape[0]} images, Y has {Q.shape[0]}")
    if not (np.isfinite(P).all() and np.isfinite(Q).all()):
        raise ValueError("fit_linear: X and Y must be finite")
    if center == "input":
        c = _centroids(P)
        P, Q = P - c, Q - c
    elif center != "none":
        raise ValueError(f"unknown center mode {center!r} (input | none)")
    n = P.shape[0]
    return _ridge(P.reshape(n, -1), Q.reshape(n, -1), float(alpha))


def predict_linear(X: np.ndarray, W: np.ndarray, center: str = "input") -> np.ndarray:
    """Apply a :func:`fit_linear` map: (n, L_in[, 2]) -> (n, L_out, 2); NaN rows stay NaN."""
    P = as_points(X, "X")
    n = P.shape[0]
    if center == "input":
        c = _centroids(P)
        return ((P - c).reshape(n, -1) @ W).reshape(n, -1, 2) + c
    if center != "none":
        raise ValueError(f"unknown center mode {center!r} (input | none)")
    return (P.reshape(n, -1) @ W).reshape(n, -1, 2)


def landmark_errors(pred: np.ndarray, target: np.ndarray, norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(per_landmark (n, L), per_image (n,))`` normalised errors; NaN target landmarks are skipped."""
    pred, target = as_points(pred, "pred"), as_points(target, "target")
    norm = np.asarray(norm, dtype=np.float64).reshape(-1)
    if pred.shape != target.shape or norm.shape[0] != pred.shape[0]:
        raise ValueError(f"shape mismatch: pred {pred.shape}, target {target.shape}, norm {norm.shape}")
    per_lm = np.linalg.norm(pred - target, axis=-1) / norm[:, None]
    ok = np.isfinite(target).all(-1)
    per_lm = np.where(ok, per_lm, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        # an image is scored only if every landmark it has is predicted and norm is valid
        cnt = ok.sum(1)
        bad = (ok & ~np.isfinite(per_lm)).any(1) | (cnt == 0) | ~np.isfinite(norm)
        per_img = np.where(bad, np.nan, np.where(ok, per_lm, 0.0).sum(1) / np.maximum(cnt, 1))
    return per_lm, per_img


def _train_rows(X: np.ndarray, Y: np.ndarray, count: int, seed: int) -> np.ndarray:
    ok = np.flatnonzero(np.isfinite(X).all((1, 2)) & np.isfinite(Y).all((1, 2)))
    dropped = X.shape[0] - ok.size
    if dropped:
        log.info("regressor: %d training images with missing landmarks left out", dropped)
    if count > 0 and count < ok.size:
        # seeded subset, kept in input order so results do not depend on sorting
        ok = np.sort(np.random.default_rng(seed).choice(ok, size=count, replace=False))
    if ok.size == 0:
        raise ValueError("no complete training images to fit the regressor")
    return ok


def _regress_nme(
    train_in: np.ndarray,
    train_out: np.ndarray,
    test_in: np.ndarray,
    test_out: np.ndarray,
    norm: np.ndarray,
    cfg: EvalConfig,
) -> NMEResult:
    tr_in, tr_out = as_points(train_in, "train input"), as_points(train_out, "train target")
    te_in, te_out = as_points(test_in, "test input"), as_points(test_out, "test target")
    rows = _train_rows(tr_in, tr_out, cfg.regressor_train_count, cfg.seed)
    fitted = LinearMap.fit(tr_in[rows], tr_out[rows], cfg.ridge_alpha, cfg.center)
    pred = fitted.predict(te_in)
    per_lm, per_img = landmark_errors(pred, te_out, norm)
    scored = np.isfinite(per_img)
    mean = float(per_img[scored].mean()) if scored.any() else float("nan")
    return NMEResult(mean, per_img, per_lm, fitted.W, int(rows.size), int(scored.sum()), fitted)


def forward_nme(train_disc: np.ndarray, train_gt: np.ndarray, test_disc: np.ndarray, test_gt: np.ndarray,
                cfg: EvalConfig | None = None) -> NMEResult:
    """Forward NME: regress annotations from discovered landmarks; per-landmark errors are (n, L_gt)."""
    cfg = cfg or EvalConfig()
    norm = landmark_norm(test_gt, cfg.norm, cfg.eye_indices)
    return _regress_nme(train_disc, train_gt, test_disc, test_gt, norm, cfg)


def backward_nme(train_disc: np.ndarray, train_gt: np.ndarray, test_disc: np.ndarray, test_gt: np.ndarray,
                 cfg: EvalConfig | None = None) -> NMEResult:
    """Backward NME: regress discovered landmarks from annotations, normalised by the
    annotation-based norm of the test image; per-landmark errors are (n, K_disc)."""
    cfg = cfg or EvalConfig()
    norm = landmark_norm(test_gt, cfg.norm, cfg.eye_indices)
    return _regress_nme(train_gt, train_disc, test_gt, test_disc, norm, cfg)
