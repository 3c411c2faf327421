"""Automatic outlier removal before Stage 1 (paper Sec. 4.2, "Training").

Keypoints on the object recur across the dataset, so their descriptors have close
neighbours; background clutter is idiosyncratic and sits far from everything. Each
keypoint is scored by the median L2 distance from its descriptor to its nearest
neighbours among the dataset's descriptors (exact search with faiss), and the given
fraction with the largest scores is dropped.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from k2l_dist.keypoints.generic import descriptors_to_float
from k2l_dist.utils.backends import import_faiss

faiss = import_faiss()

_QUERY_BATCH = 16384  # queries per faiss search: bounds the result arrays, paces the progress bar


def outlier_scores(
    features: np.ndarray, neighbours: int, max_reference: int = 200_000, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """Median L2 distance of each row of ``features`` (M, D) float32 to its nearest reference rows.

    The reference set is every row, or ``max_reference`` rows drawn at random without
    replacement when M is larger. A row never counts as its own neighbour (exact
    duplicates of it elsewhere do). With fewer than 2 reference rows all scores are 0.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    m = len(x)
    if m == 0:
        return np.zeros(0, np.float64)
    rng = np.random.default_rng(seed)
    if m > max_reference > 0:
        ref_ids = np.sort(rng.choice(m, size=max_reference, replace=False))
    else:
        ref_ids = np.arange(m)
    k = min(int(neighbours), len(ref_ids) - 1)
    if k < 1:
        return np.zeros(m, np.float64)

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x[ref_ids]))
    scores = np.empty(m, np.float64)
    starts = range(0, m, _QUERY_BATCH)
    for start in tqdm(starts, desc="outliers", unit="batch", disable=not progress or len(starts) < 4, leave=False):
        stop = min(m, start + _QUERY_BATCH)
        d2, ids = index.search(x[start:stop], k + 1)
        # Exclude the query itself by identity, not by distance 0: a duplicate may
        # come first. Rows whose self is not among the k+1 drop their farthest hit.
        is_self = ref_ids[ids] == np.arange(start, stop)[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        dist = np.sqrt(np.maximum(d2[~is_self].reshape(stop - start, k), 0.0))
        scores[start:stop] = np.median(dist, axis=1)
    return scores


def outlier_keep_masks(
    descriptors: list[np.ndarray],
    fraction: float,
    neighbours: int,
    max_reference: int = 200_000,
    seed: int = 0,
    progress: bool = False,
) -> list[np.ndarray]:
    """One boolean keep-mask per image; exactly ``round(fraction * total)`` keypoints are dropped.

    ``descriptors`` are the per-image arrays from :class:`KeypointDetector` (all of the
    same method; empty images allowed); distances are taken on
    :func:`descriptors_to_float`. The share is global over the dataset, so an image
    may lose all its keypoints. Equal scores (common with ORB's integer Hamming
    distances) are ordered at random with ``seed`` rather than by image order, so
    ties do not bias the removal towards the first images.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"outlier fraction must be in [0, 1], got {fraction}")
    if neighbours < 1:
        raise ValueError(f"outlier neighbours must be >= 1, got {neighbours}")
    sizes = [len(d) for d in descriptors]
    total = sum(sizes)
    keep = np.ones(total, dtype=bool)
    n_drop = int(round(fraction * total))
    if n_drop > 0:
        nonempty = [d for d in descriptors if len(d)]
        feats = np.concatenate([descriptors_to_float(d) for d in nonempty], axis=0)
        scores = outlier_scores(feats, neighbours, max_reference, seed, progress)
        tiebreak = np.random.default_rng(seed + 1).random(total)
        order = np.lexsort((tiebreak, -scores))  # largest score first
        keep[order[:n_drop]] = False
    return list(np.split(keep, np.cumsum(sizes)[:-1])) if sizes else []
