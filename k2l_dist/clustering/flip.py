"""Cluster symmetry under horizontal flipping (paper Sec. 3.7).

Every kept point has a cluster label and the label of the descriptor read at its
mirrored location on the flipped image. Over the whole dataset, ``C[a, b]`` counts
points labelled ``a`` whose flipped descriptor is labelled ``b``. The flip map is the
permutation that maximises the total count -- solved exactly with the Hungarian
algorithm, so unlike a per-row argmax it can never send two clusters to the same one.

Symmetrisation (default on): a horizontal flip is an involution, so a point of cluster
``b`` flipping to ``a`` is as much evidence for the pair {a, b} as ``a`` flipping to
``b``; we match on ``C + C.T``, which doubles the evidence per pair. The Hungarian
optimum of a symmetric matrix need not be an involution (a 3-cycle scores like its
reverse), so by default cycles longer than 2 are split into pairs afterwards
(:func:`_split_long_cycles`): exact for even cycles (the better of the two
alternating pairings never weighs less than the cycle), best-of-L for odd ones. The
result then satisfies ``perm[perm] == arange(K)`` -- flipping twice is the identity.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)


def flip_count_matrix(labels: np.ndarray, flipped_labels: np.ndarray, K: int) -> np.ndarray:
    """``C[a, b]`` = number of points with label ``a`` whose flipped label is ``b`` (K, K) int64.

    Points with a negative label on either side (dropped / unassigned) are ignored.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    flipped_labels = np.asarray(flipped_labels, dtype=np.int64).reshape(-1)
    if labels.shape != flipped_labels.shape:
        raise ValueError(f"labels {labels.shape} and flipped_labels {flipped_labels.shape} differ in length")
    ok = (labels >= 0) & (flipped_labels >= 0)
    if ((labels[ok] >= K) | (flipped_labels[ok] >= K)).any():
        raise ValueError(f"labels must lie in [0, {K})")
    flat = labels[ok] * K + flipped_labels[ok]
    return np.bincount(flat, minlength=K * K).reshape(K, K).astype(np.int64)


def is_involution(perm: np.ndarray) -> bool:
    perm = np.asarray(perm)
    return bool(np.array_equal(perm[perm], np.arange(perm.size)))


def _cycles(perm: np.ndarray) -> list[list[int]]:
    seen = np.zeros(perm.size, dtype=bool)
    out = []
    for start in range(perm.size):  # K <= a few hundred: a Python loop is fine here
        if seen[start]:
            continue
        cyc = []
        j = start
        while not seen[j]:
            seen[j] = True
            cyc.append(j)
            j = int(perm[j])
        out.append(cyc)
    return out


def _split_long_cycles(perm: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Turn every cycle of length > 2 of ``perm`` into pairs (+ one fixed point if odd).

    ``S`` is the symmetric weight matrix; a pair {a, b} scores ``2 * S[a, b]`` (a->b and
    b->a), a fixed point ``S[a, a]``. For each cycle we try all alternating pairings
    around it (2 for even length, L for odd length: which node stays fixed) and keep
    the best.
    """
    out = perm.copy()
    for cyc in _cycles(perm):
        L = len(cyc)
        if L <= 2:
            continue
        best, best_w = None, -np.inf
        starts = range(2) if L % 2 == 0 else range(L)
        for s in starts:
            rot = cyc[s:] + cyc[:s]
            if L % 2 == 0:
                pairs, fixed = [(rot[i], rot[i + 1]) for i in range(0, L, 2)], []
            else:
                pairs, fixed = [(rot[i], rot[i + 1]) for i in range(1, L, 2)], [rot[0]]
            w = sum(2 * S[a, b] for a, b in pairs) + sum(S[a, a] for a in fixed)
            if w > best_w:
                best, best_w = (pairs, fixed), w
        pairs, fixed = best
        for a, b in pairs:
            out[a], out[b] = b, a
        for a in fixed:
            out[a] = a
    return out


def flip_permutation(
    labels: np.ndarray,
    flipped_labels: np.ndarray,
    K: int,
    symmetrize: bool = True,
    involution: bool = True,
) -> np.ndarray:
    """Flip map over K clusters, perm (K,) int64: cluster ``a`` becomes ``perm[a]`` under a flip.

    Maximum-weight assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) on
    the dataset-wide count matrix, symmetrised (``C + C.T``) when ``symmetrize``; with
    ``involution`` (requires ``symmetrize``) longer cycles are split into pairs, see the
    module docstring. The result is always a permutation of ``arange(K)``.
    """
    C = flip_count_matrix(labels, flipped_labels, K).astype(np.float64)
    S = C + C.T if symmetrize else C
    rows, cols = linear_sum_assignment(S, maximize=True)
    perm = np.empty(K, dtype=np.int64)
    perm[rows] = cols
    if involution and symmetrize and not is_involution(perm):
        before = float(S[np.arange(K), perm].sum())
        perm = _split_long_cycles(perm, S)
        after = float(S[np.arange(K), perm].sum())
        log.info("flip_permutation: split cycles > 2 into pairs (weight %.0f -> %.0f)", before, after)
    agree = float(C[np.arange(K), perm].sum() / max(C.sum(), 1.0))
    log.info("flip_permutation: %.1f%% of flipped points land in the mapped cluster", 100 * agree)
    return perm
