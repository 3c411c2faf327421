"""Heatmap-regression losses: Φd's detector loss (paper Eq. 2) and Ψ's landmark loss (Sec. 3.6).

All coordinates are ``(x, y)`` in *heatmap* pixels with 0-based pixel centres (map
image points with :func:`k2l_dist.models.points.to_feature_coords`). Predictions may
be bf16 (autocast); the losses are computed in float32.
"""

from __future__ import annotations

import torch


def gaussian_heatmaps(
    points: torch.Tensor, valid: torch.Tensor, size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """One unnormalised Gaussian per point: ``(B,P,h,w)``, peak 1 at the point.

    ``exp(-((x-px)² + (y-py)²) / (2σ²))`` evaluated at pixel centres; invalid points
    give all-zero maps. Built separably (outer product of 1-D profiles).
    """
    h, w = size
    pts = points.float()
    xs = torch.arange(w, device=pts.device, dtype=torch.float32)
    ys = torch.arange(h, device=pts.device, dtype=torch.float32)
    gx = torch.exp(-(xs - pts[..., 0:1]).square() / (2 * sigma**2))  # (B,P,w)
    gy = torch.exp(-(ys - pts[..., 1:2]).square() / (2 * sigma**2))  # (B,P,h)
    maps = gy.unsqueeze(-1) * gx.unsqueeze(-2)
    return maps * valid.to(maps.dtype)[..., None, None]


def detector_target(points: torch.Tensor, valid: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Single-channel target ``(B,1,h,w)``: max over the per-point Gaussians (max, not
    sum, so nearby points never exceed 1)."""
    maps = gaussian_heatmaps(points, valid, size, sigma)
    if maps.shape[1] == 0:
        return maps.new_zeros(maps.shape[0], 1, *size)
    return maps.amax(dim=1, keepdim=True)


def detector_loss(pred: torch.Tensor, points: torch.Tensor, valid: torch.Tensor, sigma: float,
                  images: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> torch.Tensor:
    """MSE (mean over all pixels) between Φd's ``(B,1,h,w)`` map and :func:`detector_target`.

    ``images (B,)`` bool: only these images count (an image without pseudo-labels sits the
    round out instead of being trained towards an empty map); 0, still attached to the
    graph, when none does. ``pixels (B,1,h,w)`` bool: the pixels that count (the part of
    the crop that shows the image).
    """
    target = detector_target(points, valid, tuple(pred.shape[-2:]), sigma)
    per_image = _masked_mean((pred.float() - target).square(), pixels, dims=(1, 2, 3))
    if images is None:
        return per_image.mean()
    mask = images.to(per_image.dtype)
    return (per_image * mask).sum() / mask.sum().clamp_min(1.0)


def _masked_mean(values: torch.Tensor, pixels: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor:
    if pixels is None:
        return values.mean(dim=dims)
    m = pixels.to(values.dtype).expand_as(values)
    return (values * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)


def landmark_loss(pred: torch.Tensor, points: torch.Tensor, valid: torch.Tensor, sigma: float,
                  pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-2 MSE over the labelled channels only.

    ``pred (B,K,h,w)``, ``points (B,K,2)``, ``valid (B,K)``: channel ``k`` of image ``b``
    contributes its per-pixel mean squared error iff ``valid[b,k]``; channels without a
    label are masked (not pushed towards zero, paper Sec. 3.6). The result is the mean
    over valid (image, channel) pairs; 0 (still attached to the graph) if there are none.
    ``pixels (B,1,h,w)``: only these pixels count (the part of the crop showing the image).
    """
    target = gaussian_heatmaps(points, valid, tuple(pred.shape[-2:]), sigma)
    per_channel = _masked_mean((pred.float() - target).square(), pixels, dims=(-2, -1))  # (B,K)
    mask = valid.to(per_channel.dtype)
    return (per_channel * mask).sum() / mask.sum().clamp_min(1.0)
