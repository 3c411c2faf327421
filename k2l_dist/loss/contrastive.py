"""Contrastive descriptor loss of Stage 1 (paper Sec. 3.4, ablations of Sec. 5.2).

Every training image ``b`` is seen in two augmented views A and B; slot ``p`` of
``desc_a[b]`` and ``desc_b[b]`` is the *same physical point* in both views. All
descriptors are L2-normalised first (the clustering's normalisation), so
``‖f − f'‖² = 2 − 2·f·f' ∈ [0, 4]``. The paper's pair loss is

    positive pair:  ‖f − f'‖²
    negative pair:  max(0, m − ‖f − f'‖²)

Pairs (each unordered pair counted once, both points valid):

* positives, always: (A, b, p) – (B, b, p) — equivariance, the known correspondence.
* positives, ``correspondence="clustering"`` (default): any two points of two
  *different* images (either view) with the same cluster label ``>= 0``.
  ``correspondence="equivariance"`` drops these (Table 3, rows 2–3).
* negatives, ``negatives="same_image"`` (default, the paper's): within one image, points
  with different slot indices (across and within views), plus every valid random-location
  descriptor of that image (``neg_a``/``neg_b``) against every valid point of that image.
  Never across images: one landmark appears at most once per image, whereas two images
  may put one landmark in different clusters (Fig. 3).
* negatives, ``negatives="different_clusters"`` (the earlier work's): points of two
  different images whose labels (both ``>= 0``) differ; random negatives are ignored.

The two terms are averaged separately over their pairs so thousands of negatives do not
drown a few positives: ``loss = positive + neg_weight · negative``.

Flipping (Sec. 3.7): flip both views of an image together and pass the flipped-image
cluster labels for it; flipping only one view would make the slot-identity positives
contradict the labels.
"""

from __future__ import annotations

import functools
from typing import get_args

import torch
import torch.nn.functional as F

from k2l_dist.config import Correspondence, LossBalance, Negatives


def _pair_sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Unit vectors: ‖x−y‖² = 2 − 2 x·y; smooth (unlike cdist) and one matmul.
    return (2.0 - 2.0 * x @ y.transpose(-1, -2)).clamp_min(0.0)


def _same_label_pair_sums(x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                          bins: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ‖xᵢ − xⱼ‖² over the unordered pairs of kept rows with one label, and their
    count, from per-label means: Σ_{i<j} ‖xᵢ − xⱼ‖² = n Σᵢ ‖xᵢ − μ‖² (stable, no pair matrix).

    Per-label sums in ``bins`` fixed bins (every label is below it), the rows masked: with
    ``bins`` known on the host the device never waits for it; None reads the largest label
    from the device (one host sync)."""
    if bins is None:
        bins = int(labels.max()) + 1 if labels.numel() else 0
    group = torch.where(keep, labels, torch.zeros_like(labels))
    counts = torch.zeros(max(1, bins), dtype=torch.int64, device=x.device).index_add_(0, group, keep.long())
    weight = keep.to(x.dtype)
    x = x * weight[:, None]
    means = torch.zeros(len(counts), x.shape[1], device=x.device).index_add_(0, group, x) / \
        counts.clamp_min(1)[:, None]
    spread_rows = (x - means[group]).square().sum(-1) * weight
    spread = torch.zeros(len(counts), device=x.device).index_add_(0, group, spread_rows)
    return (counts * spread).sum(), (counts * (counts - 1) // 2).sum()


def contrastive_loss(
    desc_a: torch.Tensor, desc_b: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor,
    neg_a: torch.Tensor | None = None, neg_b: torch.Tensor | None = None, *,
    valid_a: torch.Tensor | None = None, valid_b: torch.Tensor | None = None,
    neg_valid_a: torch.Tensor | None = None, neg_valid_b: torch.Tensor | None = None,
    margin: float = 1.0, neg_weight: float = 1.0, negatives: Negatives = "same_image",
    correspondence: Correspondence = "clustering", points: torch.Tensor | None = None,
    neg_min_distance: float = 0.0, balance: LossBalance = "separate", label_bins: int | None = None,
) -> dict[str, torch.Tensor]:
    """Contrastive loss over two views of a batch.

    Args:
        desc_a, desc_b: ``(B,P,d)`` descriptors of the same P points in views A and B
            (normalised here; raw or unit vectors both fine).
        labels_a, labels_b: ``(B,P)`` int64 cluster labels in each view (they differ only
            for flipped images); ``-1`` = no label.
        neg_a, neg_b: optional ``(B,R,d)`` descriptors at random locations of view A / B,
            far from every labelled point (see
            :func:`k2l_dist.models.points.sample_negative_locations`).
        valid_a, valid_b: ``(B,P)`` bool, point present in that view. Default
            ``labels >= 0``. Pass them explicitly for unlabelled warm-up points (label
            -1 but valid): those then join slot-identity positives and same-image
            negatives but never label-based pairs.
        neg_valid_a, neg_valid_b: ``(B,R)`` bool; default all True.
        margin: ``m`` of the hinge, on squared distances in ``[0, 4]``.
        neg_weight: weight of the mean negative term.
        negatives: ``"same_image"`` | ``"different_clusters"``.
        correspondence: ``"clustering"`` | ``"equivariance"``.
        points: ``(B,P,2)`` position of each slot in one common frame (the crop); with
            ``neg_min_distance > 0``, two points of one image closer than that are not a
            same-image negative (a part detected twice is not two parts).
        balance: ``"separate"`` (the two terms averaged apart, the hinge on squared
            distances) or ``"official"`` (the paper's code: one mean over every pair, the
            negatives' hinge on the distance, squared: ``max(0, m − ‖f − f'‖)²``).
        label_bins: every label is below it (the label table knows it on the host): per-label
            sums without a host sync. None: the largest label is read from the device.

    Returns:
        ``{"loss", "positive", "negative"}`` float32 scalars (a term with no pairs is 0, still
        attached to the graph), ``{"num_pos", "num_neg"}`` int64 tensors (no device sync).
    """
    _check_arguments(desc_a, desc_b, labels_a, labels_b, negatives=negatives, correspondence=correspondence,
                     balance=balance)
    hinge = functools.partial(_hinge, margin=margin, balance=balance)
    va = labels_a >= 0 if valid_a is None else valid_a.bool()
    vb = labels_b >= 0 if valid_b is None else valid_b.bool()

    # Distances in float32 even under bf16 autocast: bf16 matmuls are too coarse for
    # a margin on [0, 4].
    with torch.autocast(device_type=desc_a.device.type, enabled=False):
        x = F.normalize(torch.cat([desc_a, desc_b], dim=1).float(), dim=-1)  # (B, 2P, d)
        labels = torch.cat([labels_a, labels_b], dim=1)  # (B, 2P)
        valid = torch.cat([va, vb], dim=1)
        labelled = valid & (labels >= 0)
        raw, upper, same_slot, pair = _within_image(x, valid)
        dist = raw.clamp_min(0.0)
        pos = pair & same_slot
        pos_sum, num_pos = (dist * pos).sum(), pos.sum()
        if correspondence == "clustering":
            pos_sum, num_pos = _add_across_image_positives(pos_sum, num_pos, x, raw, labels, labelled, upper,
                                                           label_bins)

        if negatives == "same_image":
            neg = pair & ~same_slot
            if points is not None and neg_min_distance > 0:
                neg = neg & _apart(points, neg_min_distance)
            neg_sum, num_neg = (hinge(dist) * neg).sum(), neg.sum()
            rand = _random_negatives(x, valid, [(neg_a, neg_valid_a), (neg_b, neg_valid_b)], hinge)
            if rand is not None:
                neg_sum, num_neg = neg_sum + rand[0], num_neg + rand[1]
        else:
            neg_sum, num_neg = _different_cluster_negatives(x, labels, labelled, hinge)

        positive = pos_sum / num_pos.clamp_min(1)
        negative = neg_sum / num_neg.clamp_min(1)
        pooled = (pos_sum + neg_sum) / (num_pos + num_neg).clamp_min(1)
        return {"loss": positive + neg_weight * negative if balance == "separate" else pooled,
                "positive": positive, "negative": negative, "num_pos": num_pos, "num_neg": num_neg}


def _hinge(sq_dist: torch.Tensor, *, margin: float, balance: str) -> torch.Tensor:
    if balance == "official":
        return F.relu(margin - (sq_dist + 1e-9).sqrt()).square()
    return F.relu(margin - sq_dist)


def _within_image(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pairs within an image: one (2P, 2P) block per image, not the batch's (2BP)² matrix.
    Returns the squared distances before rounding clamps, the upper triangle, the
    same-slot mask (a point and itself in the other view) and the valid pairs."""
    two_p, dev = x.shape[1], x.device
    raw = 2.0 - 2.0 * x @ x.transpose(-1, -2)  # (B, 2P, 2P)
    slot = torch.arange(two_p // 2, device=dev).repeat(2)
    upper = torch.ones(two_p, two_p, dtype=torch.bool, device=dev).triu(1)
    same_slot = slot[:, None] == slot[None, :]
    pair = upper & valid[:, :, None] & valid[:, None, :]
    return raw, upper, same_slot, pair


def _check_arguments(desc_a: torch.Tensor, desc_b: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor, *,
                     negatives: str, correspondence: str, balance: str) -> None:
    for name, value, tp in (("negatives", negatives, Negatives), ("balance", balance, LossBalance),
                            ("correspondence", correspondence, Correspondence)):
        if value not in get_args(tp):
            raise ValueError(f"{name} must be {' or '.join(map(repr, get_args(tp)))}, got {value!r}")
    if desc_a.shape != desc_b.shape or labels_a.shape != desc_a.shape[:2] or labels_b.shape != labels_a.shape:
        raise ValueError(
            f"shape mismatch: desc_a {tuple(desc_a.shape)}, desc_b {tuple(desc_b.shape)}, "
            f"labels_a {tuple(labels_a.shape)}, labels_b {tuple(labels_b.shape)}"
        )


def _add_across_image_positives(pos_sum: torch.Tensor, num_pos: torch.Tensor, x: torch.Tensor, raw: torch.Tensor,
                                labels: torch.Tensor, labelled: torch.Tensor, upper: torch.Tensor,
                                bins: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-image positives' sum and count plus the pairs across images with one label:
    every same-label pair of the batch, less those inside an image (a sum per label, never
    the (2BP)² matrix)."""
    in_image = upper & labelled[:, :, None] & labelled[:, None, :] & (labels[:, :, None] == labels[:, None, :])
    total, count = _same_label_pair_sums(x.reshape(-1, x.shape[-1]), labels.reshape(-1), labelled.reshape(-1), bins)
    return pos_sum + total - (raw * in_image).sum(), num_pos + count - in_image.sum()


def _apart(points: torch.Tensor, min_distance: float) -> torch.Tensor:
    """``(B, 2P, 2P)``: the two slots of an image are at least ``min_distance`` apart."""
    where = torch.cat([points, points], dim=1).float()  # (B, 2P, 2)
    return (where[:, :, None] - where[:, None, :]).square().sum(-1) >= min_distance**2


def _random_negatives(x: torch.Tensor, valid: torch.Tensor, views: list,
                      hinge) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each view's random-location descriptors against every point of the same image
    (None: no view has any); ``views``: ``[(descriptors (B,R,d) or None, valid (B,R) or None), …]``."""
    rand = [r for r, _ in views if r is not None]
    if not rand:
        return None
    rand_valid = [torch.ones(r.shape[:2], dtype=torch.bool, device=x.device) if rv is None else rv.bool()
                  for r, rv in views if r is not None]
    rn = F.normalize(torch.cat(rand, dim=1).float(), dim=-1)  # (B,R',d)
    rmask = torch.cat(rand_valid, dim=1)[:, :, None] & valid[:, None, :]  # same image only, by construction
    return (hinge(_pair_sq_dist(rn, x)) * rmask).sum(), rmask.sum()


def _different_cluster_negatives(x: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                                 hinge) -> tuple[torch.Tensor, torch.Tensor]:
    """Every labelled pair of two images with two labels: needs the whole batch's matrix."""
    b, two_p, d = x.shape
    flat, lab = x.reshape(b * two_p, d), labels.reshape(-1)
    ok = labelled.reshape(-1)
    image = torch.arange(b, device=x.device).repeat_interleave(two_p)
    across = torch.ones(len(lab), len(lab), dtype=torch.bool, device=x.device).triu(1) \
        & ok[:, None] & ok[None, :] & (image[:, None] != image[None, :]) & (lab[:, None] != lab[None, :])
    return (hinge(_pair_sq_dist(flat, flat)) * across).sum(), across.sum()
