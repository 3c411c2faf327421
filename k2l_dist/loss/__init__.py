"""Training losses: heatmap regression (Φd, Ψ) and the contrastive descriptor loss (Φf)."""

from __future__ import annotations

from dataclasses import dataclass

from k2l_dist.loss.contrastive import contrastive_loss
from k2l_dist.loss.detector import detector_loss, detector_target, gaussian_heatmaps, landmark_loss


@dataclass
class LossConfig:
    """Loss settings (paper Sec. 3.4, 3.6, 5.2). Distances are in heatmap (output) pixels.

    Meant to move into :mod:`k2l_dist.config` as ``Config.loss``.
    """

    heatmap_sigma: float = 1.0  # Gaussian σ of detector / landmark targets (64×64 maps)
    margin: float = 1.0  # hinge margin m on squared distances of unit descriptors, in [0, 4]
    neg_weight: float = 1.0  # weight of the mean negative term vs the mean positive term
    negatives: str = "same_image"  # same_image | different_clusters (Table 3)
    correspondence: str = "clustering"  # clustering | equivariance (Table 3)
    random_negatives: int = 32  # random-location negatives per view and image (same_image)
    min_neg_distance: float = 3.0  # random negatives at least this far from every labelled point


__all__ = [
    "LossConfig",
    "contrastive_loss",
    "detector_loss",
    "detector_target",
    "gaussian_heatmaps",
    "landmark_loss",
]
