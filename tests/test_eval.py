"""Evaluation: linear regression NME, SVT completion, raw accuracy, CED, plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from k2l_dist.eval import (
    EvalConfig,
    backward_nme,
    ced_auc,
    ced_curve,
    column_means,
    fill_with_means,
    fit_linear,
    forward_nme,
    landmark_errors,
    landmark_norm,
    mean_shape_baseline,
    predict_linear,
    raw_landmark_accuracy,
    svt_complete,
)
from k2l_dist.eval.completion import svt
from k2l_dist.eval.plots import PALETTE_RGB, draw_landmarks, save_ced_plot, save_grid

# --------------------------------------------------------------------------- regression


def test_fit_linear_recovers_map_without_centering() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 12))  # 6 discovered landmarks, flattened x0 y0 x1 y1 ...
    A = rng.standard_normal((12, 10))
    W = fit_linear(X, X @ A, alpha=0.0, center="none")
    np.testing.assert_allclose(W, A, atol=1e-9)
    np.testing.assert_allclose(predict_linear(X, W, "none").reshape(60, -1), X @ A, atol=1e-9)


def test_fit_linear_recovers_map_in_input_centred_frame() -> None:
    rng = np.random.default_rng(1)
    X = rng.uniform(0, 128, (80, 6, 2))
    A = rng.standard_normal((12, 10))
    c = X.mean(1, keepdims=True)
    Y = ((X - c).reshape(80, -1) @ A).reshape(80, 5, 2) + c  # the model the regressor assumes
    W = fit_linear(X, Y, alpha=0.0)
    # centred x (and y) coordinates sum to 0, so W is only defined up to that null space;
    # what must be exact is the map itself, on the training images and on new ones
    np.testing.assert_allclose(predict_linear(X, W), Y, atol=1e-8)
    X2 = rng.uniform(0, 128, (20, 6, 2))
    c2 = X2.mean(1, keepdims=True)
    Y2 = ((X2 - c2).reshape(20, -1) @ A).reshape(20, 5, 2) + c2
    np.testing.assert_allclose(predict_linear(X2, W), Y2, atol=1e-8)
    # translation equivariance: the prediction moves with the input landmarks, no bias needed
    t = np.array([17.0, -5.0])
    np.testing.assert_allclose(predict_linear(X + t, W), Y + t, atol=1e-8)
    # a small relative ridge barely moves the exact solution
    np.testing.assert_allclose(predict_linear(X2, fit_linear(X, Y, alpha=1e-8)), Y2, atol=1e-3)


def test_fit_linear_rejects_missing_values() -> None:
    X = np.ones((5, 4, 2))
    X[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_linear(X, np.ones((5, 3, 2)))


def test_norms_and_errors_hand_computed() -> None:
    gt = np.array(
        [
            [[0.0, 0.0], [10.0, 0.0], [0.0, 40.0]],  # eyes 10 apart; box 10 x 40 -> 20
            [[5.0, 5.0], [5.0, 11.0], [13.0, 5.0]],  # eyes 6 apart; box 8 x 6 -> sqrt(48)
        ]
    )
    np.testing.assert_allclose(landmark_norm(gt, "interocular", (0, 1)), [10.0, 6.0])
    np.testing.assert_allclose(landmark_norm(gt, "box"), [20.0, np.sqrt(48.0)])
    np.testing.assert_allclose(landmark_norm(gt, "interocular", (0, 2)), [40.0, 8.0])
    pred = gt.copy()
    pred[0, 0] += [3.0, 4.0]  # error 5 on landmark 0 of image 0
    pred[1, 2] += [0.0, 6.0]  # error 6 on landmark 2 of image 1
    per_lm, per_img = landmark_errors(pred, gt, landmark_norm(gt))
    np.testing.assert_allclose(per_lm, [[0.5, 0, 0], [0, 0, 1.0]])
    np.testing.assert_allclose(per_img, [0.5 / 3, 1.0 / 3])
    # unannotated landmarks are skipped, not counted as zero error
    gt2 = gt.copy()
    gt2[1, 1] = np.nan
    per_lm, per_img = landmark_errors(pred, gt2, np.array([10.0, 6.0]))
    assert np.isnan(per_lm[1, 1])
    np.testing.assert_allclose(per_img[1], 1.0 / 2)


def _faces(n: int, rng: np.random.Generator) -> np.ndarray:
    """Annotations (n, 5, 2): a mean shape, random scale/shift, small jitter."""
    mean = np.array([[40, 50], [88, 50], [64, 75], [45, 100], [83, 100]], dtype=np.float64)
    s = rng.uniform(0.8, 1.2, (n, 1, 1))
    return (mean - 64) * s + 64 + rng.uniform(-10, 10, (n, 1, 2)) + rng.normal(0, 1.5, (n, 5, 2))


def test_forward_and_backward_nme_end_to_end() -> None:
    rng = np.random.default_rng(2)
    gt_tr, gt_te = _faces(300, rng), _faces(100, rng)
    B = rng.standard_normal((10, 16)) * 0.3
    # 8 discovered landmarks: a fixed linear function of the annotations in the centred frame
    def disc_of(gt: np.ndarray) -> np.ndarray:
        c = gt.mean(1, keepdims=True)
        return ((gt - c).reshape(len(gt), -1) @ B).reshape(len(gt), 8, 2) + c

    d_tr, d_te = disc_of(gt_tr), disc_of(gt_te)
    cfg = EvalConfig(ridge_alpha=0.0, norm="interocular", eye_indices=(0, 1))
    bwd = backward_nme(d_tr, gt_tr, d_te, gt_te, cfg)
    assert bwd.mean < 1e-9  # disc is exactly linear in gt (centred frame)
    assert bwd.per_landmark.shape == (100, 8) and bwd.W.shape == (10, 16)
    fwd = forward_nme(d_tr, gt_tr, d_te, gt_te, cfg)
    assert fwd.per_landmark.shape == (100, 5) and fwd.n_train == 300 and fwd.n_scored == 100
    assert fwd.mean < 0.02  # 16 -> 10 dims: annotations recoverable from the discovered ones

    # backward errors are normalised by the *annotation* distance of the test image
    noisy = d_te + rng.normal(0, 2.0, d_te.shape)
    res = backward_nme(d_tr, gt_tr, noisy, gt_te, cfg)
    W = fit_linear(gt_tr, d_tr, 0.0)
    err = np.linalg.norm(predict_linear(gt_te, W) - noisy, axis=-1) / landmark_norm(gt_te)[:, None]
    np.testing.assert_allclose(res.per_landmark, err, rtol=1e-6)
    np.testing.assert_allclose(res.mean, err.mean(1).mean(), rtol=1e-6)

    # a baseline's undetected test points (NaN) are not scored: the mean is over the rest
    missing = noisy.copy()
    missing[:50, 3] = np.nan
    part = backward_nme(d_tr, gt_tr, missing, gt_te, cfg)
    observed = np.ones(err.shape, bool)
    observed[:50, 3] = False
    np.testing.assert_allclose(part.mean, np.mean([e[o].mean() for e, o in zip(err, observed)]), rtol=1e-6)
    assert part.n_scored == 100 and np.isnan(part.per_landmark[:50, 3]).all()

    # regressor_train_count: a seeded subset
    sub = forward_nme(d_tr, gt_tr, d_te, gt_te, EvalConfig(regressor_train_count=50))
    assert sub.n_train == 50


def test_mean_shape_baseline() -> None:
    rng = np.random.default_rng(3)
    tr = _faces(200, rng)
    shape = (tr - tr.mean(1, keepdims=True)).mean(0)
    te = shape[None] + rng.uniform(20, 100, (30, 1, 2))  # the mean shape, translated
    norm = landmark_norm(te)
    assert mean_shape_baseline(tr, te, norm, center="gt").mean < 1e-9
    assert mean_shape_baseline(tr, te, norm, center="none").mean > 0.1
    # discovered landmarks that only carry position do no better than the baseline
    d_tr = tr.mean(1, keepdims=True) + rng.normal(0, 1, (200, 4, 2))
    d_te = te.mean(1, keepdims=True) + rng.normal(0, 1, (30, 4, 2))
    fwd = forward_nme(d_tr, tr, d_te, te, EvalConfig(ridge_alpha=1e-3))
    base = mean_shape_baseline(tr, te, norm)
    assert fwd.mean > base.mean


# --------------------------------------------------------------------------- completion


def test_svt_recovers_low_rank_and_keeps_observed() -> None:
    rng = np.random.default_rng(5)
    n, p, r = 200, 40, 3
    L = rng.standard_normal((n, r)) @ rng.standard_normal((r, p)) * 10 + 60  # pixel-like
    M = L.copy()
    miss = rng.random((n, p)) < 0.3
    M[miss] = np.nan
    F = svt_complete(M, tol=1e-4)
    np.testing.assert_array_equal(F[~miss], M[~miss])  # bit-exact, not just close
    rel = np.linalg.norm((F - L)[miss]) / np.linalg.norm(L[miss] - L.mean())
    assert rel < 2e-3
    assert np.isfinite(F).all()
    # unit-free: the same completion in [0, 1] coordinates
    F01 = svt_complete(M / 128.0, tol=1e-4)
    np.testing.assert_allclose(F01 * 128.0, F, rtol=1e-6, atol=1e-6)


def _low_rank_with_missing_pairs(rng, n: int, missing: float, noise: float = 0.0):
    """Stage-1-like matrix: rank-3 landmark coordinates around pixel 60, an image missing
    a landmark's x and y together."""
    L = rng.standard_normal((n, 3)) @ rng.standard_normal((3, 40)) * 10 + 60
    M = L + rng.normal(0, noise, L.shape) if noise else L.copy()
    miss = np.repeat(rng.random((n, 20)) < missing, 2, axis=1)
    M[miss] = np.nan
    return L, M, miss


def test_svt_converges_with_most_landmarks_missing() -> None:
    # 45% of the pairs missing: Cai-Candes-Shen's step 1.2 / (sampling ratio) = 2.2 is
    # past their convergence bound (2); it stopped at residual 3.9e-4 after 2000 iterations
    L, M, miss = _low_rank_with_missing_pairs(np.random.default_rng(2), 400, 0.45)
    done = svt(M, iters=2000, tol=1e-4)
    assert done.converged and done.residual <= 1e-4 and done.iterations < 1000
    assert done.rank <= 5  # rank 3, plus what the centring leaves
    rel = np.linalg.norm((done.matrix - L)[miss]) / np.linalg.norm(L[miss] - L.mean())
    assert rel < 2e-3
    np.testing.assert_array_equal(done.matrix[~miss], M[~miss])


def test_svt_converges_on_noisy_matrices_and_beats_the_mean() -> None:
    # noisy detections make the matrix full-rank; the old step oscillated here (residual ~0.2)
    rng = np.random.default_rng(0)
    L, M, miss = _low_rank_with_missing_pairs(rng, 600, 0.58, noise=2.0)
    done = svt(M, iters=2000, tol=1e-4)
    assert done.converged and done.iterations < 1000
    rmse = np.sqrt(np.mean((done.matrix - L)[miss] ** 2))
    mean_rmse = np.sqrt(np.mean((np.nanmean(M, 0) - L)[miss] ** 2))
    assert rmse < 2.0 * 2.0 and rmse < 0.25 * mean_rmse
    # too few iterations is reported, not hidden
    short = svt(M, iters=5, tol=1e-4)
    assert not short.converged and short.iterations == 5 and short.residual > 1e-4


def test_svt_no_missing_and_fill_with_means() -> None:
    M = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(svt_complete(M), M)
    test = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, 0.0]])
    means = column_means(np.array([[2.0, 4.0, 6.0], [4.0, 8.0, np.nan]]))
    np.testing.assert_allclose(means, [3.0, 6.0, 6.0])
    np.testing.assert_allclose(fill_with_means(test, means), [[1.0, 6.0, 3.0], [3.0, 6.0, 0.0]])


# --------------------------------------------------------------------------- metrics


def test_raw_accuracy_hungarian_planted() -> None:
    rng = np.random.default_rng(5)
    n = 100
    gt = rng.uniform(20, 100, (n, 3, 2))
    pred = rng.uniform(0, 128, (n, 5, 2))  # unrelated landmarks
    pred[:, 4] = gt[:, 0] + rng.normal(0, 1, (n, 2))
    pred[:, 0] = gt[:, 1] + rng.normal(0, 1, (n, 2))
    pred[:, 2] = gt[:, 2] + rng.normal(0, 1, (n, 2))
    # landmark 3 sits between gt 0 and gt 1 and is the nearest to *both* on average:
    # a per-annotation argmin would give it to two annotations, the Hungarian cannot
    pred[:, 3] = (gt[:, 0] + gt[:, 1]) / 2
    pred[:10, 2] = np.nan  # landmark 2 undetected in 10 images
    res = raw_landmark_accuracy(pred, gt, np.ones(n), threshold=6.0)
    np.testing.assert_array_equal(res["matching"], [4, 0, 2])
    np.testing.assert_allclose(res["accuracy"], [1.0, 1.0, 0.9])
    np.testing.assert_allclose(res["detection_rate"], [1.0, 1.0, 0.9])
    assert res["mean_accuracy"] == pytest.approx(2.9 / 3)
    assert np.all(res["mean_distance"] < 3.0)
    # fewer discovered than annotated: the unmatched annotation scores 0
    res2 = raw_landmark_accuracy(pred[:, [4, 0]], gt, np.ones(n), threshold=6.0)
    np.testing.assert_array_equal(res2["matching"], [0, 1, -1])
    assert res2["accuracy"][2] == 0.0


def test_ced_curve() -> None:
    rng = np.random.default_rng(6)
    e = rng.uniform(0, 0.08, 500)
    t, f = ced_curve(np.concatenate([e, [np.nan]]), max_err=0.1, steps=101)
    assert t[0] == 0 and t[-1] == pytest.approx(0.1) and len(t) == 101
    assert np.all(np.diff(f) >= 0) and f[-1] == 1.0  # NaN left out
    assert f[50] == pytest.approx((e <= t[50]).mean())
    _, f_inf = ced_curve(np.array([0.01, np.inf]), 0.1)
    assert f_inf[-1] == 0.5  # inf never passes
    t0, f0 = ced_curve(np.zeros(10), 0.1)
    assert ced_auc(t0, f0) == pytest.approx(1.0)
    assert 0.55 < ced_auc(t, f) < 0.65  # uniform on [0, 0.08] over [0, 0.1]: 0.6


# --------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    p = tmp_path / "ced.png"
    aucs = save_ced_plot({"forward": rng.uniform(0, 0.06, 200), "backward": rng.uniform(0, 0.1, 200)}, p, 0.1)
    assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert aucs["forward"] > aucs["backward"]

    img = np.zeros((64, 64, 3), np.uint8)
    pts = np.array([[10, 10], [np.nan, 5], [50.2, 30.7], [200, 200]])  # missing and off-image
    out = draw_landmarks(img, pts, radius=2)
    assert img.sum() == 0  # input untouched
    r, g, b = PALETTE_RGB[0]
    np.testing.assert_array_equal(out[10, 10], [b, g, r])  # BGR
    r, g, b = PALETTE_RGB[2]
    np.testing.assert_array_equal(out[31, 50], [b, g, r])
    assert not np.array_equal(PALETTE_RGB[0], PALETTE_RGB[2])
    assert len({tuple(c) for c in PALETTE_RGB[:30]}) == 30  # 30 distinct colours

    g = tmp_path / "grid.png"
    save_grid([img, img[:40], img], [pts, None, pts[:1]], g, cols=2)
    grid = matplotlib.image.imread(g)
    assert grid.shape[:2] == (2 + 2 * 66, 2 + 2 * 66)


def test_pck_counts_landmarks_within_a_share_of_the_torso():
    from k2l_dist.eval.metrics import pck

    gt = np.zeros((2, 3, 2))
    gt[:, 1] = [0.0, 10.0]  # the torso: landmarks 0 and 1, 10 px apart
    norm = np.array([5.0, 5.0])
    errors_px = np.array([[1.0, 2.0, 3.0], [1.5, np.nan, 2.5]])  # NaN: not scored
    assert pck(errors_px / norm[:, None], norm, gt, (0, 1), alpha=0.2) == pytest.approx(3 / 5)


def test_the_raw_accuracy_matching_is_fitted_on_other_images_when_asked():
    from k2l_dist.eval.metrics import raw_landmark_accuracy

    gt = np.zeros((4, 1, 2))
    near_0 = np.stack([np.zeros((4, 2)), np.full((4, 2), 50.0)], axis=1)  # discovered 0 sits on the annotation
    near_1 = near_0[:, ::-1]  # on these images discovered 1 does
    own = raw_landmark_accuracy(near_1, gt, np.ones(4), 1.0)
    assert own["matching"].tolist() == [1] and own["mean_accuracy"] == 1.0
    fitted = raw_landmark_accuracy(near_1, gt, np.ones(4), 1.0, match_on=(near_0, gt, np.ones(4)))
    assert fitted["matching"].tolist() == [0] and fitted["mean_accuracy"] == 0.0  # scored, not chosen, here


def test_the_ced_range_follows_the_data_unless_set(tmp_path):
    from k2l_dist.eval.plots import ced_range, save_ced_plot

    curves = {"a": np.array([0.1, 0.2, np.nan]), "b": np.array([0.35, np.inf])}
    assert ced_range(curves) == 0.35 and ced_range(curves, 0.1) == 0.1
    aucs = save_ced_plot(curves, tmp_path / "ced.png")
    assert aucs["a"] > aucs["b"] > 0  # every curve reaches its end inside the plot
