"""Point operations between images, heatmaps and descriptor maps.

Coordinate conventions (used everywhere in k2l-dist):

* A point is ``(x, y)`` = (column, row), 0-based, with integer values at pixel
  *centres*: pixel row ``i``, column ``j`` is the point ``x=j, y=i``.
* "Image pixels" are pixels of the network input (``H × W``); "heatmap pixels" /
  "feature pixels" are pixels of the stride-``s`` outputs (``H/s × W/s``). Feature
  pixel ``u`` covers image pixels ``s·u … s·u+s-1`` whose centres average to
  ``s·u + (s-1)/2``, hence :func:`to_feature_coords` ``u = (x + 0.5)/s - 0.5`` and its
  inverse :func:`to_image_coords`. Convert only through these two functions.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T", torch.Tensor, float)


def to_feature_coords(points: T, stride: int) -> T:
    """Image-pixel coordinates → feature(heatmap)-pixel coordinates (pixel centres)."""
    return (points + 0.5) / stride - 0.5


def to_image_coords(points: T, stride: int) -> T:
    """Feature(heatmap)-pixel coordinates → image-pixel coordinates (pixel centres)."""
    return (points + 0.5) * stride - 0.5


# --------------------------------------------------------------------------- peaks


def _quadratic_offsets(flat: torch.Tensor, h: int, w: int, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sub-pixel offsets ``(B,N,2)`` in ``[-0.5, 0.5]`` of the integer maxima ``(y, x)``.

    ``flat`` is ``(B,N,h*w)`` (the map of each peak). Per axis, a parabola through the
    log values of three consecutive pixels: exact for a Gaussian peak (its log is a
    parabola), unlike a fit on raw values. At a border pixel the three-pixel window is
    shifted inwards (still exact for a Gaussian). Axes shorter than 3 pixels or without
    curvature get offset 0.
    """
    logv = flat.clamp_min(1e-12).log()

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return logv.gather(2, (yy * w + xx).unsqueeze(-1)).squeeze(-1)

    offsets = []
    for pos, size, axis in ((x, w, 0), (y, h, 1)):
        if size < 3:
            offsets.append(torch.zeros(pos.shape, dtype=flat.dtype, device=flat.device))
            continue
        mid = pos.clamp(1, size - 2)  # centre of the 3-pixel window
        if axis == 0:
            lo, c, hi = at(y, mid - 1), at(y, mid), at(y, mid + 1)
        else:
            lo, c, hi = at(mid - 1, x), at(mid, x), at(mid + 1, x)
        curvature = lo - 2 * c + hi
        ok = curvature < 0
        vertex = mid + 0.5 * (lo - hi) / torch.where(ok, curvature, torch.ones_like(curvature))
        off = (vertex - pos).clamp(-0.5, 0.5)
        offsets.append(torch.where(ok, off, torch.zeros_like(off)))
    return torch.stack(offsets, dim=-1)


def _soft_argmax_offsets(
    flat: torch.Tensor, h: int, w: int, y: torch.Tensor, x: torch.Tensor, radius: int
) -> torch.Tensor:
    """Offsets ``(B,N,2)``: mean position in a ``(2r+1)²`` window around the integer
    maximum, weighted by value minus the window minimum (pixels outside the map get
    weight 0). Still biased towards the window centre when the peak is wider than the
    window (~0.1 px for σ=1.5, r=2); prefer ``"quadratic"`` for Gaussian-shaped maps."""
    r = torch.arange(-radius, radius + 1, device=flat.device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)  # (W2,)
    yy = y.unsqueeze(-1) + dy  # (B,N,W2)
    xx = x.unsqueeze(-1) + dx
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    idx = yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)
    vals = flat.gather(2, idx)
    # Subtracting the window minimum removes most of the pull towards the window
    # centre that a truncated peak on a non-zero background would cause.
    floor = torch.where(inside, vals, torch.full_like(vals, float("inf"))).amin(-1, keepdim=True)
    vals = (vals - floor).clamp_min(0) * inside
    total = vals.sum(-1).clamp_min(1e-12)
    ox = (vals * dx).sum(-1) / total
    oy = (vals * dy).sum(-1) / total
    return torch.stack([ox, oy], dim=-1)


def _refine(
    flat: torch.Tensor, h: int, w: int, y: torch.Tensor, x: torch.Tensor, method: str, radius: int
) -> torch.Tensor:
    if method == "quadratic":
        return _quadratic_offsets(flat, h, w, y, x)
    if method == "soft_argmax":
        return _soft_argmax_offsets(flat, h, w, y, x, radius)
    if method == "none":
        return torch.zeros(*y.shape, 2, dtype=flat.dtype, device=flat.device)
    raise ValueError(f"unknown peak refinement {method!r} (quadratic | soft_argmax | none)")


def nms_peaks(
    heatmap: torch.Tensor,
    max_points: int,
    threshold: float,
    radius: int = 1,
    subpixel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local maxima of a single-channel heatmap, strongest first.

    Args:
        heatmap: ``(B,1,h,w)``.
        max_points: ``P``, the number of slots returned per image.
        threshold: a peak must be strictly above it.
        radius: suppression window is ``(2r+1)×(2r+1)``; a kept peak is the maximum of
            its window. Equal values inside one window (plateaus): the first pixel in
            raster order wins.
        subpixel: refine with the log-quadratic fit of :func:`heatmap_peaks`.

    Returns:
        points ``(B,P,2)`` float ``(x, y)`` in heatmap pixels (0-based pixel centres),
        scores ``(B,P)`` float32 (heatmap value), valid ``(B,P)`` bool. Invalid slots
        (fewer peaks than ``P``) sort last and hold point ``(0,0)`` and score 0.
    """
    if heatmap.dim() != 4 or heatmap.shape[1] != 1:
        raise ValueError(f"nms_peaks expects (B,1,h,w), got {tuple(heatmap.shape)}")
    hm = heatmap.detach().float()
    b, _, h, w = hm.shape
    k = 2 * radius + 1
    keep = (hm == F.max_pool2d(hm, k, stride=1, padding=radius)) & (hm > threshold)
    # Plateau tie-break: among kept pixels in one window, the lowest raster index wins.
    prio = torch.arange(h * w, 0, -1, device=hm.device, dtype=torch.float32).view(1, 1, h, w)
    prio = torch.where(keep, prio, torch.zeros_like(prio))
    keep &= F.max_pool2d(prio, k, stride=1, padding=radius) == prio

    flat = hm.flatten(1)
    masked = torch.where(keep.flatten(1), flat, torch.full_like(flat, float("-inf")))
    n = min(max_points, h * w)
    top, idx = masked.topk(n, dim=1)
    valid = torch.isfinite(top)
    y, x = idx // w, idx % w
    pts = torch.stack([x, y], dim=-1).float()
    if subpixel:
        pts = pts + _refine(flat.unsqueeze(1).expand(b, n, h * w), h, w, y, x, "quadratic", 1)
    pts = torch.where(valid.unsqueeze(-1), pts, torch.zeros_like(pts))
    scores = torch.where(valid, top, torch.zeros_like(top))
    if n < max_points:  # fixed P for batching even on tiny maps
        pad = max_points - n
        pts = F.pad(pts, (0, 0, 0, pad))
        scores = F.pad(scores, (0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    return pts, scores, valid


def heatmap_peaks(
    heatmaps: torch.Tensor, method: str = "quadratic", radius: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sub-pixel peak per channel of ``(B,K,h,w)`` heatmaps (Ψ's landmarks).

    The integer argmax is refined by ``method``: ``"quadratic"`` (parabola through the
    log values of the 3-pixel neighbourhood per axis; exact for Gaussian peaks, needs
    positive maps such as sigmoid outputs), ``"soft_argmax"`` (value-weighted mean in a
    ``(2·radius+1)²`` window) or ``"none"``.

    Returns points ``(B,K,2)`` float ``(x, y)`` in heatmap pixels (0-based pixel
    centres; map to the image with :func:`to_image_coords`) and confidence ``(B,K)``,
    the heatmap value at the integer maximum.
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmap_peaks expects (B,K,h,w), got {tuple(heatmaps.shape)}")
    hm = heatmaps.detach().float()
    _, _, h, w = hm.shape
    flat = hm.flatten(2)
    conf, idx = flat.max(dim=2)
    y, x = idx // w, idx % w
    pts = torch.stack([x, y], dim=-1).float() + _refine(flat, h, w, y, x, method, radius)
    return pts, conf


# --------------------------------------------------------------------------- sampling


def sample_descriptors(
    desc_map: torch.Tensor, points: torch.Tensor, stride: int, normalize: bool = True
) -> torch.Tensor:
    """Bilinearly sample a dense map at image-pixel points.

    Args:
        desc_map: ``(B,d,h,w)`` raw descriptors at stride ``stride``.
        points: ``(B,P,2)`` ``(x, y)`` in *input-image* pixels.
        normalize: L2-normalise the sampled vectors (after interpolation), the same
            normalisation the clustering uses.

    Returns ``(B,P,d)`` float32. A point whose :func:`to_feature_coords` lands exactly on
    a feature-pixel centre returns that pixel's vector. Points beyond the outermost
    feature-pixel centres (including points outside the image) take the value at the
    nearest border position (``padding_mode="border"``): clamped, never zero-padded.
    Differentiable w.r.t. ``desc_map`` (callers mask invalid points themselves).
    """
    b, _, h, w = desc_map.shape
    u = to_feature_coords(points.float(), stride)
    # align_corners=False: normalised g ↔ pixel ((g+1)·size - 1)/2, so pixel u ↔ (2u+1)/size - 1.
    grid = torch.stack([(2 * u[..., 0] + 1) / w - 1, (2 * u[..., 1] + 1) / h - 1], dim=-1)
    out = F.grid_sample(
        desc_map.float(), grid.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False
    )  # (B,d,1,P)
    out = out.squeeze(2).transpose(1, 2)
    return F.normalize(out, dim=-1) if normalize else out


def sample_negative_locations(
    points: torch.Tensor,
    valid: torch.Tensor,
    size: tuple[int, int],
    count: int,
    min_distance: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random heatmap-pixel centres far from every valid point of the same image.

    Draws ``count`` distinct pixels per image uniformly among the pixels of an
    ``(h,w)`` map whose distance to every valid point is ``>= min_distance``
    (all in heatmap pixels). Used for the same-image negatives of the contrastive loss
    (paper Sec. 3.4): convert with :func:`to_image_coords` and
    :func:`sample_descriptors`.

    Args:
        points: ``(B,P,2)`` ``(x, y)`` heatmap pixels; valid: ``(B,P)`` bool.
        generator: drives the draw (any device); results are moved to ``points.device``.

    Returns locations ``(B,count,2)`` float (integer pixel centres) and ``ok`` ``(B,count)``
    bool, False where an image has fewer than ``count`` admissible pixels.
    """
    h, w = size
    dev = points.device
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=torch.float32),
        torch.arange(w, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # (hw,2)
    d2 = (grid.view(1, -1, 1, 2) - points.float().unsqueeze(1)).square().sum(-1)  # (B,hw,P)
    d2 = torch.where(valid.unsqueeze(1), d2, torch.full_like(d2, float("inf")))
    allowed = (d2 >= min_distance**2).all(dim=2) if points.shape[1] else torch.ones(
        points.shape[0], h * w, dtype=torch.bool, device=dev
    )
    gdev = generator.device if generator is not None else dev
    keys = torch.rand(points.shape[0], h * w, generator=generator, device=gdev).to(dev)
    # Random keys + top-k = uniform sampling without replacement among allowed pixels.
    keys = torch.where(allowed, keys, torch.full_like(keys, -1.0))
    n = min(count, h * w)
    top, idx = keys.topk(n, dim=1)
    ok = top >= 0
    locs = grid[idx]
    if n < count:
        locs = F.pad(locs, (0, 0, 0, count - n))
        ok = F.pad(ok, (0, count - n), value=False)
    return locs, ok
