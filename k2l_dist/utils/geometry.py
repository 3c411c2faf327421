"""Point geometry for augmented views, in torch (the training loop's side of the data path).

The DALI pipeline (:mod:`k2l_dist.augment.pipeline`) emits, per view, a 2×3 float
matrix ``M`` that maps *crop* pixel coordinates to *view* pixel coordinates::

    [x_view, y_view]^T = M[:, :2] @ [x_crop, y_crop]^T + M[:, 2]

Both sides use the project's pixel-centre convention: pixel (row i, col j) has centre
(x=j, y=i). A horizontal flip is part of ``M``, so a point mapped by ``M`` lands where
its content is in the (possibly flipped) view. Pseudo-labels are not baked into the
shards because they change every round: the training loop looks points up by sample
id and maps them here. Which cluster labels a flipped view needs is a separate
question (paper Sec. 3.7): :func:`select_by_flip`.
"""

from __future__ import annotations

import torch

__all__ = [
    "transform_points",
    "inverse_affine",
    "compose_affine",
    "relative_affine",
    "inside_view",
    "select_by_flip",
]


def _check_matrices(matrices: torch.Tensor) -> None:
    if matrices.dim() != 3 or matrices.shape[-2:] != (2, 3):
        raise ValueError(f"expected affine matrices of shape (B, 2, 3), got {tuple(matrices.shape)}")


def transform_points(points: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Map points (B, N, 2) in (x, y) by per-sample affine matrices (B, 2, 3) → (B, N, 2).

    NaN points (missing landmarks) stay NaN. Computed in the points' dtype, or float32
    when the points are integer.
    """
    _check_matrices(matrices)
    if points.dim() != 3 or points.shape[-1] != 2 or points.shape[0] != matrices.shape[0]:
        raise ValueError(
            f"expected points of shape (B, N, 2) with B={matrices.shape[0]}, got {tuple(points.shape)}"
        )
    dtype = points.dtype if points.is_floating_point() else torch.float32
    pts = points.to(dtype)
    mats = matrices.to(device=pts.device, dtype=dtype)
    return pts @ mats[:, :, :2].transpose(1, 2) + mats[:, None, :, 2]


def inverse_affine(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of each affine map (B, 2, 3): view → crop coordinates for a view's matrix."""
    _check_matrices(matrices)
    # Invert in float64: the 2×2 part of a view matrix is well conditioned, but float32
    # round-off would show up as hundredths of a pixel after a round trip.
    m = matrices.double()
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * e - b * d
    if torch.any(det.abs() < 1e-12):
        raise ValueError("singular affine matrix")
    inv_lin = torch.stack([torch.stack([e, -b], -1), torch.stack([-d, a], -1)], -2) / det[:, None, None]
    inv_t = -(inv_lin @ torch.stack([c, f], -1)[..., None])
    return torch.cat([inv_lin, inv_t], -1).to(matrices.dtype)


def compose_affine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The affine map that applies ``first`` and then ``second`` (both (B, 2, 3))."""
    _check_matrices(first)
    _check_matrices(second)
    lin = second[:, :, :2] @ first[:, :, :2]
    t = second[:, :, :2] @ first[:, :, 2:] + second[:, :, 2:]
    return torch.cat([lin, t], -1)


def relative_affine(matrix_from: torch.Tensor, matrix_to: torch.Tensor) -> torch.Tensor:
    """Map from one view of a sample to another: view ``from`` → crop → view ``to``.

    With the pipeline's ``matrix0``/``matrix1`` this gives the view0 → view1 map of a
    training pair.
    """
    return compose_affine(inverse_affine(matrix_from), matrix_to)


def inside_view(points: torch.Tensor, size: int | tuple[int, int], margin: float = 0.0) -> torch.Tensor:
    """(B, N) bool: which points (B, N, 2) fall inside a view of ``size`` pixels (int or (H, W)).

    With the pixel-centre convention the view covers [-0.5, W-0.5) × [-0.5, H-0.5);
    ``margin`` shrinks that box on every side. NaN points are outside.
    """
    h, w = (size, size) if isinstance(size, int) else size
    x, y = points[..., 0], points[..., 1]
    lo = -0.5 + margin
    return (x >= lo) & (x < w - 0.5 - margin) & (y >= lo) & (y < h - 0.5 - margin)


def select_by_flip(labels: torch.Tensor, flipped_labels: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per sample, ``flipped_labels`` where the view is flipped, else ``labels``.

    Stage 1 (paper Sec. 3.7) clusters every keypoint's descriptor on the image and on
    its mirror image; a flipped view must be supervised with the mirror assignment.
    ``labels`` and ``flipped_labels`` are (B, ...) of the same shape, ``flip`` is (B,) bool.
    """
    if labels.shape != flipped_labels.shape:
        raise ValueError(f"label shapes differ: {tuple(labels.shape)} vs {tuple(flipped_labels.shape)}")
    if flip.dim() != 1 or flip.shape[0] != labels.shape[0]:
        raise ValueError(f"expected flip of shape ({labels.shape[0]},), got {tuple(flip.shape)}")
    mask = flip.to(device=labels.device, dtype=torch.bool).view(-1, *([1] * (labels.dim() - 1)))
    return torch.where(mask, flipped_labels, labels)
