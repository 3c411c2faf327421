"""Adaptive non-maximal suppression (Brown, Szeliski & Winder, CVPR 2005).

SIFT and ORB fire in dense clusters on textured regions; the paper (Sec. 5.1) thins
them with ANMS so the initial keypoints spread homogeneously over the object.
"""

from __future__ import annotations

import numpy as np

# Rows of the (rows x stronger-points) distance block computed at once: bounds the
# temporary memory to about _BLOCK_ELEMENTS float64 values whatever N is.
_BLOCK_ELEMENTS = 1 << 20


def suppression_radii(points: np.ndarray, responses: np.ndarray, robustness: float = 0.9) -> np.ndarray:
    """Radius of every point: distance to the nearest point j with ``responses[j] * robustness > responses[i]``.

    Points that no other point dominates get ``inf``. Negative responses are shifted
    to start at 0 first, so that the multiplicative robustness test keeps its meaning.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    resp = np.asarray(responses, dtype=np.float64).reshape(-1)
    if len(pts) != len(resp):
        raise ValueError(f"anms: {len(pts)} points but {len(resp)} responses")
    if not 0.0 < robustness <= 1.0:
        raise ValueError(f"anms: robustness must be in (0, 1], got {robustness}")
    n = len(pts)
    radii = np.full(n, np.inf)
    if n == 0:
        return radii
    if resp.min() < 0:
        resp = resp - resp.min()

    # Sorted by decreasing response, the points that dominate point i form a prefix
    # of the order (r_j * robustness is monotone in r_j): row i only needs columns
    # [0, n_dominating[i]), which halves the work of the full N x N matrix.
    order = np.argsort(-resp, kind="stable")
    sp = pts[order] - pts.mean(axis=0)  # centred: smaller magnitudes, less cancellation
    sr = resp[order]
    # Number of sorted points j with sr[j] * robustness > sr[i].
    scaled_ascending = (sr * robustness)[::-1]
    n_dominating = n - np.searchsorted(scaled_ascending, sr, side="right")

    sq = np.einsum("ij,ij->i", sp, sp)
    sorted_radii = np.full(n, np.inf)
    start = int(np.searchsorted(n_dominating, 1))  # n_dominating is non-decreasing
    while start < n:
        rows = max(1, _BLOCK_ELEMENTS // max(int(n_dominating[-1]), 1))
        stop = min(n, start + rows)
        width = int(n_dominating[stop - 1])  # widest row of the block
        # |a-b|^2 = |a|^2 + |b|^2 - 2ab in float64: exact enough for pixel
        # coordinates and one matrix product instead of a 3-D temporary.
        d2 = sq[start:stop, None] + sq[None, :width] - 2.0 * (sp[start:stop] @ sp[:width].T)
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(width)[None, :] >= n_dominating[start:stop, None]] = np.inf
        sorted_radii[start:stop] = d2.min(axis=1)
        start = stop
    radii[order] = np.sqrt(sorted_radii)
    return radii


def anms(points: np.ndarray, responses: np.ndarray, count: int, robustness: float = 0.9) -> np.ndarray:
    """Indices of the ``count`` points with the largest suppression radii.

    Returns int64 indices into ``points`` (length ``min(count, N)``), ordered by
    decreasing radius. Every point within ``robustness`` of the maximum response is
    undominated (radius ``inf``); these are ordered among themselves by the distance
    to the nearest strictly stronger point (the radius with robustness 1), so that
    the choice inside that set is spatially spread too, and the strongest point
    always comes first. Remaining ties: stronger response, then lower index.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    resp = np.asarray(responses, dtype=np.float64).reshape(-1)
    radii = suppression_radii(pts, resp, robustness)
    n = len(radii)
    k = max(0, min(int(count), n))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    # Points strictly stronger than an undominated point are undominated too, so the
    # secondary radii need only the (usually small) undominated subset.
    secondary = np.zeros(n)
    free = np.flatnonzero(np.isinf(radii))
    secondary[free] = suppression_radii(pts[free], resp[free], 1.0)
    # lexsort: last key is primary.
    order = np.lexsort((np.arange(n), -resp, -secondary, -radii))
    return order[:k].astype(np.int64)
