"""Labels carried over a partial round (``stage1.extract_fraction`` < 1).

A partial round re-extracts and clusters only a seeded part of the dataset; every other
image keeps the pseudo-labels of the round before. K-means numbers its clusters afresh
each round, so the kept labels are renumbered first: the images extracted this round
also hold last round's labels, and a point detected again near where it was (within
``radius`` crop pixels, in the same image) votes for "old cluster a is new cluster b".
The votes make an M × M count matrix; the renumbering is its maximum-weight one-to-one
assignment (Hungarian), so the at-most-one-point-per-cluster-per-image rule still holds
for the kept images.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from scipy.optimize import linear_sum_assignment

from k2l_dist.clustering.rounds import RoundLabels, images_kept_share


class LabelRows(Protocol):
    """Last round's table (``train.labels.LabelTable`` has these arrays)."""

    ids: np.ndarray  # (N,) int64 sorted
    offsets: np.ndarray  # (N+1,) int64
    points: np.ndarray  # (P, 2) float32 crop pixels
    labels: np.ndarray  # (P,) int64
    flipped_labels: np.ndarray  # (P,) int64


def _rows_of(table: LabelRows, ids: np.ndarray) -> np.ndarray:
    """Row indices of every point of the images ``ids`` (sorted) that ``table`` holds, in order."""
    if len(table.ids) == 0:
        return np.zeros(0, np.int64)
    pos = np.searchsorted(table.ids, ids)
    pos = pos[(pos < len(table.ids)) & (table.ids[np.minimum(pos, len(table.ids) - 1)] == ids)]
    starts, lengths = table.offsets[pos], np.diff(table.offsets)[pos]
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return (first + np.arange(int(lengths.sum()))).astype(np.int64)


def _point_images(table: LabelRows) -> np.ndarray:
    """(P,) the image id of every row."""
    return np.repeat(table.ids, np.diff(table.offsets))


def match_votes(old: LabelRows, new: LabelRows, n_clusters: int, radius: float) -> np.ndarray:
    """(n_clusters, n_clusters) counts: row a, column b = points of the images both tables
    hold, labelled a last round and b now, found again within ``radius`` crop pixels (each
    new point votes for its nearest old point of the same image)."""
    votes = np.zeros((n_clusters, n_clusters), np.int64)
    common = np.intersect1d(old.ids, new.ids)
    old_rows, new_rows = _rows_of(old, common), _rows_of(new, common)
    old_img, new_img = _point_images(old)[old_rows], _point_images(new)[new_rows]
    old_pts, new_pts = old.points[old_rows], new.points[new_rows]
    # points of one image are contiguous and both sides are ordered by image id
    old_bounds = np.searchsorted(old_img, common, side="left"), np.searchsorted(old_img, common, side="right")
    new_bounds = np.searchsorted(new_img, common, side="left"), np.searchsorted(new_img, common, side="right")
    for oa, ob, na, nb in zip(*old_bounds, *new_bounds):
        if oa == ob or na == nb:
            continue
        dist = np.linalg.norm(new_pts[na:nb, None, :] - old_pts[None, oa:ob, :], axis=-1)
        nearest = dist.argmin(axis=1)
        close = dist[np.arange(nb - na), nearest] <= radius
        a = old.labels[old_rows[oa:ob][nearest[close]]]
        b = new.labels[new_rows[na:nb][close]]
        keep = (a >= 0) & (b >= 0)
        np.add.at(votes, (a[keep], b[keep]), 1)
    return votes


def renumbering(votes: np.ndarray) -> np.ndarray:
    """(n,) int64 permutation: old cluster a is new cluster ``perm[a]`` (most votes kept)."""
    rows, cols = linear_sum_assignment(votes.astype(np.float64), maximize=True)
    perm = np.empty(len(votes), np.int64)
    perm[rows] = cols
    return perm


def _kept_part(previous: LabelRows, kept_ids: np.ndarray, perm: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of the images ``kept_ids`` (sorted), labels renumbered by ``perm``."""
    rows = _rows_of(previous, kept_ids)
    rename = lambda labels: np.where(labels >= 0, perm[np.maximum(labels, 0)], -1)  # noqa: E731
    return {"points": previous.points[rows].astype(np.float32), "labels": rename(previous.labels[rows]),
            "flipped_labels": rename(previous.flipped_labels[rows]), "labels_k": np.full(len(rows), -1, np.int64),
            "counts": np.diff(previous.offsets)[np.searchsorted(previous.ids, kept_ids)]}


def _merged(fresh: RoundLabels, kept: dict[str, np.ndarray], kept_ids: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Sorted ids, offsets and per-point arrays of ``fresh`` and the kept images together
    (each image's own point order kept)."""
    ids = np.concatenate([fresh.ids, kept_ids])
    counts = np.concatenate([np.diff(fresh.offsets), kept["counts"]])
    by_id = np.argsort(ids, kind="stable")
    by_row = np.argsort(np.repeat(ids, counts), kind="stable")
    merged = {k: np.concatenate([getattr(fresh, k), kept[k]])[by_row]
              for k in ("points", "labels", "flipped_labels", "labels_k")}
    return ids[by_id], np.concatenate([[0], np.cumsum(counts[by_id])]).astype(np.int64), merged


def carry_labels(previous: LabelRows, fresh: RoundLabels, radius: float) -> RoundLabels:
    """``fresh`` (the images extracted this round) completed with every other image of
    ``previous``, its labels renumbered into this round's clusters."""
    n_clusters = len(fresh.centroids)
    top = max(int(previous.labels.max(initial=-1)), int(previous.flipped_labels.max(initial=-1)))
    if top >= n_clusters:
        raise ValueError(f"last round's labels reach cluster {top}, this round has {n_clusters} clusters "
                         "(cluster.M changed between rounds): extract every image (stage1.extract_fraction=1)")
    votes = match_votes(previous, fresh, n_clusters, radius)
    perm = renumbering(votes)
    kept_ids = np.setdiff1d(previous.ids, fresh.ids)
    ids, offsets, merged = _merged(fresh, _kept_part(previous, kept_ids, perm), kept_ids)
    stats = dict(fresh.stats)
    matched = int(votes.sum())
    stats.update({"extracted_share": len(fresh.ids) / max(len(ids), 1),
                  "carried_votes_agree_share": float(votes[np.arange(n_clusters), perm].sum() / max(matched, 1)),
                  "carried_points_matched": matched,
                  "images_kept_share": images_kept_share(offsets)})
    return RoundLabels(ids=ids, offsets=offsets, **merged, centroids=fresh.centroids, centroids_k=fresh.centroids_k,
                       flip_permutation=fresh.flip_permutation, stats=stats)
