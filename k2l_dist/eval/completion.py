"""Filling missing Stage-1 landmarks before evaluation (paper Sec. 4.2).

After Stage 1 an image detects at most K landmarks, so the (images x 2K) coordinate
matrix has holes. Training images are completed with Singular Value Thresholding
(Cai, Candès & Shen, "A singular value thresholding algorithm for matrix completion",
SIAM J. Optim. 2010), detected points left unchanged; test images get the training
mean of each missing coordinate (:func:`fill_with_means`).

SVT computes the unique solution of

    min_X  tau ||X||_* + 1/2 ||X||_F^2   subject to   P_Omega(X) = P_Omega(M)

by gradient ascent on its Lagrange dual (their Eq. 3.2-3.3, shrinkage operator D_tau):

    X^k = D_tau(Y^{k-1})                          # soft-threshold the singular values
    Y^k = Y^{k-1} + delta * P_Omega(M - X^k)

The dual gradient P_Omega(M - D_tau(Y)) is 1-Lipschitz in Y, so their Theorem 4.1 only
guarantees convergence for 0 < delta < 2. Their experiments' delta = 1.2 / (sampling
ratio) exceeds 2 below 60% observed, which is the normal case here (an image detects
about half of the K landmarks): on the quickstart's Stage-1 matrix (1500 x 40, 42%
observed) it oscillated and stopped after 2000 iterations at residual 0.84. We instead
take the dual step delta = 1 (= 1/Lipschitz) with Nesterov momentum in the form of
Chambolle & Dossal ("On the convergence of the iterates of FISTA", JOTA 2015):
extrapolate Z^k = Y^k + (k - 1) / (k + 3) (Y^k - Y^{k-1}), threshold Z^k. The dual
objective then converges at O(1/k^2) and the iterates converge (momentum parameter
a = 3 > 2), so X^k = D_tau(Z^k) converges to the SVT solution, whose residual is 0: the
stopping test ||P_Omega(X^k - M)||_F / ||P_Omega(M)||_F <= tol is reached for any tol > 0
after finitely many iterations. Same quickstart matrix: 169 iterations; rank-3 200 x 40
matrices with 30-50% of the (x, y) pairs missing: 240-540 (plain SVT, delta = 1.9:
800-5000+).

Y^0 = k0 * P_Omega(M), k0 = ceil(tau / ||P_Omega(M)||_2) (their Sec. 5.1.1: it skips the
first iterations where X^k = 0). Their tau = 5n (n x n matrices of unit-variance rank-r
factors, i.e. entries of RMS ~ sqrt(r)) is unit-dependent; we use tau = 3 sqrt(n p) x RMS
of the observed (centred) entries, so pixels or [0, 1] coordinates give the same
completion. Why 3: a larger tau brings the solution closer to the minimum-nuclear-norm
completion but needs more iterations; on synthetic rank-3/5 matrices factor 1 twice
settled on a too-high rank (2-3% error on the missing entries) while factors 2, 3 and 5
all reached ~2e-4. Cost per iteration is O(n p^2), so complete the regressor's
training images, not a whole 200k-image set, unless you have minutes.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def _shrink(Y: np.ndarray, tau: float) -> tuple[np.ndarray, int]:
    """D_tau(Y) = U diag(max(s - tau, 0)) Vᵀ and the number of singular values above tau.

    For a tall matrix (images x 2K: n >> p) the SVD comes from the p x p Gram matrix --
    an eigendecomposition of YᵀY plus two (n x p)(p x p) products instead of a thin SVD
    of the whole matrix. Only singular values above tau survive, so the Gram route's
    loss of relative precision on tiny singular values does not matter.
    """
    n, p = Y.shape
    if n < p:
        X, r = _shrink(Y.T, tau)
        return X.T, r
    if n >= 4 * p:
        evals, V = np.linalg.eigh(Y.T @ Y)
        s = np.sqrt(np.clip(evals, 0.0, None))
        keep = s > tau
        if not keep.any():
            return np.zeros_like(Y), 0
        Vk, sk = V[:, keep], s[keep]
        # U_k diag(s_k - tau) V_kᵀ = Y V_k diag((s_k - tau) / s_k) V_kᵀ
        return (Y @ Vk) @ (((sk - tau) / sk)[:, None] * Vk.T), int(keep.sum())
    U, s, Vt = np.linalg.svd(Y, full_matrices=False)
    keep = s > tau
    if not keep.any():
        return np.zeros_like(Y), 0
    return (U[:, keep] * (s[keep] - tau)) @ Vt[keep], int(keep.sum())


@dataclass
class Completion:
    matrix: np.ndarray  # (n, p): observed entries unchanged, missing ones filled
    iterations: int  # SVT iterations run (0: nothing was missing)
    residual: float  # ||P_Omega(X - M)||_F / ||P_Omega(M)||_F of the last iterate
    rank: int  # singular values above tau in the last iterate (0 when nothing was completed)
    converged: bool  # residual <= tol


def svt(M: np.ndarray, tau: float | None = None, iters: int = 2000, tol: float = 1e-4,
        center: bool = True) -> Completion:
    """Complete ``M`` (n, p) whose missing entries are NaN; observed entries come back unchanged.

    ``tau``: singular value threshold (default ``3 sqrt(n p)`` x RMS of the observed,
    centred entries). ``center``: run SVT on ``M`` minus the observed mean of each column
    and add it back -- the mean shape is a large rank-1 component that SVT would
    otherwise shrink towards 0 at the holes. Columns with no observation at all are
    filled with the global observed mean.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {M.shape}")
    obs = np.isfinite(M)
    out = M.copy()
    if obs.all():
        return Completion(out, 0, 0.0, 0, True)
    if not obs.any():
        raise ValueError("svt_complete: no observed entries")
    n, p = M.shape
    if center:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> handled below
            mu = np.nanmean(M, axis=0)
        mu = np.where(np.isfinite(mu), mu, M[obs].mean())
    else:
        mu = np.zeros(p)
    A = np.where(obs, M - mu, 0.0)  # P_Omega(M - mu)
    norm_obs = float(np.linalg.norm(A))
    if norm_obs == 0.0:  # observed entries all equal their column means: the mean is the answer
        out[~obs] = np.broadcast_to(mu, M.shape)[~obs]
        return Completion(out, 0, 0.0, 0, True)
    if tau is None:
        tau = 3.0 * math.sqrt(n * p) * norm_obs / math.sqrt(obs.sum())
    # ||A||_2 from the small Gram matrix (A is images x 2K, tall)
    G = A.T @ A if n >= p else A @ A.T
    spec = math.sqrt(max(float(np.linalg.eigvalsh(G)[-1]), 0.0))
    Y = max(1, math.ceil(tau / spec)) * A
    Z = Y
    X = np.zeros_like(A)
    rel, it, rank = float("inf"), 0, 0
    for it in range(1, iters + 1):
        X, rank = _shrink(Z, tau)
        R = np.where(obs, A - X, 0.0)
        rel = float(np.linalg.norm(R)) / norm_obs
        if rel <= tol:
            break
        Y_next = Z + R  # dual step 1 = 1 / Lipschitz constant
        Z = Y_next + ((it - 1) / (it + 3)) * (Y_next - Y)
        Y = Y_next
    converged = rel <= tol
    log.info("svt_complete: %dx%d, %.1f%% observed, %d iterations, rank %d, residual %.2e",
             n, p, 100 * obs.mean(), it, rank, rel)
    if not converged:
        log.warning("svt_complete: not converged after %d iterations (residual %.2e > tol %.1e); raise "
                    "eval.svt_iters", iters, rel, tol)
    out[~obs] = (X + mu)[~obs]
    return Completion(out, it, rel, rank, converged)


def svt_complete(M: np.ndarray, tau: float | None = None, iters: int = 2000, tol: float = 1e-4,
                 center: bool = True) -> np.ndarray:
    """:func:`svt`'s completed matrix only."""
    return svt(M, tau, iters, tol, center).matrix


def column_means(train: np.ndarray) -> np.ndarray:
    """Per-column mean (p,) of a (completed) training matrix, ignoring NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(train, dtype=np.float64), axis=0)


def fill_with_means(test: np.ndarray, train_means: np.ndarray) -> np.ndarray:
    """Replace NaN entries of ``test`` (n, p) with ``train_means`` (p,) of their column."""
    test = np.asarray(test, dtype=np.float64)
    train_means = np.asarray(train_means, dtype=np.float64).reshape(-1)
    if test.ndim != 2 or test.shape[1] != train_means.shape[0]:
        raise ValueError(f"test {test.shape} does not match train_means {train_means.shape}")
    return np.where(np.isfinite(test), test, train_means[None, :])
