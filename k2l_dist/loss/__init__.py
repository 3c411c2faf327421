"""Training losses: heatmap regression (Φd, Ψ) and the contrastive descriptor loss (Φf)."""

from __future__ import annotations

from k2l_dist.config import LossConfig
from k2l_dist.loss.contrastive import contrastive_loss
from k2l_dist.loss.detector import detector_loss, detector_target, gaussian_heatmaps, landmark_loss

__all__ = [
    "LossConfig",
    "contrastive_loss",
    "detector_loss",
    "detector_target",
    "gaussian_heatmaps",
    "landmark_loss",
]
