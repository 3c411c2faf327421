"""Square crop boxes and the exact mapping between original and crop pixels.

Convention (used by the whole project): pixel (row i, col j) has its centre at
(x=j, y=i); its area is [j-0.5, j+0.5) × [i-0.5, i+0.5). A box is ``(x0, y0, side)``
in *edge* coordinates of the original image (the image itself spans [0, w) × [0, h) in
edge coordinates, i.e. [-0.5, w-0.5) in centre coordinates). A crop of ``size`` pixels
maps the box onto [0, size) edges, so a point maps as

    u = (x + 0.5 - x0) * size / side - 0.5

which is the only formula here; images are resampled with the same matrix.
"""

from __future__ import annotations

import cv2
import numpy as np


def whole_image_box(width: int, height: int) -> tuple[float, float, float]:
    """The square of side max(w, h) centred on the image (the short side is padded)."""
    side = float(max(width, height))
    return ((width - side) / 2.0, (height - side) / 2.0, side)


def box_around_points(points: np.ndarray, scale: float) -> tuple[float, float, float]:
    """Square centred on the centre of the points' bounding box, side = scale × its longer side."""
    pts = points[np.isfinite(points).all(1)]
    if len(pts) == 0:
        raise ValueError("no finite landmark to build a box from")
    lo, hi = pts.min(0), pts.max(0)
    side = float(scale * max(hi[0] - lo[0], hi[1] - lo[1], 1.0))
    cx, cy = (lo + hi) / 2.0 + 0.5  # centre coords → edge coords
    return (float(cx - side / 2.0), float(cy - side / 2.0), side)


def box_around_rect(x: float, y: float, w: float, h: float, scale: float) -> tuple[float, float, float]:
    """Square centred on an edge-coordinate rectangle (x, y, w, h), side = scale × max(w, h)."""
    side = float(scale * max(w, h))
    return (x + w / 2.0 - side / 2.0, y + h / 2.0 - side / 2.0, side)


def crop_matrix(box: tuple[float, float, float], size: int) -> np.ndarray:
    """2×3 affine taking original centre coordinates to crop centre coordinates."""
    x0, y0, side = box
    s = size / side
    return np.array([[s, 0.0, (0.5 - x0) * s - 0.5], [0.0, s, (0.5 - y0) * s - 0.5]], np.float64)


def to_crop(points: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    m = crop_matrix(box, size)
    return (points @ m[:, :2].T + m[:, 2]).astype(points.dtype)


def to_original(points: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Inverse of :func:`to_crop` (NaN rows stay NaN)."""
    x0, y0, side = box
    s = side / size
    pts = np.asarray(points, np.float64)
    out = (pts + 0.5) * s - 0.5 + np.array([x0, y0])
    return out.astype(np.asarray(points).dtype if np.asarray(points).dtype.kind == "f" else np.float64)


def crop_image(image: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Resample the box to a size×size image (bilinear; replicated border outside the image).

    When the box is at least twice the crop, the image is first reduced by an integer
    factor with area averaging (an exact ×1/f in edge coordinates) to avoid aliasing.
    """
    x0, y0, side = box
    factor = int(side // size)
    if factor >= 2:
        h, w = image.shape[:2]
        hh, ww = (h // factor) * factor, (w // factor) * factor
        if hh >= factor and ww >= factor:
            image = cv2.resize(image[:hh, :ww], (ww // factor, hh // factor), interpolation=cv2.INTER_AREA)
            box = (x0 / factor, y0 / factor, side / factor)
    m = crop_matrix(box, size)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# pixels kept clear of a crop's padding edge: points there sit on the image/padding seam
PADDING_MARGIN = 2.0


def valid_rects(boxes: np.ndarray, orig_sizes: np.ndarray, size: int) -> np.ndarray:
    """Where each crop shows its image: ``(N, 4)`` float32 ``x0, y0, x1, y1`` in crop pixels.

    A box reaching past its image is padded by repeating the border pixel, which draws
    stripes; points, negatives and detector targets outside these rectangles are not
    trusted. ``boxes`` (N, 3) ``x, y, side``; ``orig_sizes`` (N, 2) ``width, height``.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 3)
    wh = np.asarray(orig_sizes, np.float64).reshape(-1, 2)
    scale = size / boxes[:, 2:3]
    # the image spans [-0.5, W - 0.5] in centre coordinates; map both ends into the crop
    lo = (-boxes[:, :2]) * scale - 0.5
    hi = (wh - boxes[:, :2]) * scale - 0.5
    return np.clip(np.concatenate([lo, hi], axis=1), -0.5, size - 0.5).astype(np.float32)


def inside_rects(points: np.ndarray, rects: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """``points (..., P, 2)`` inside ``rects (..., 4)`` shrunk by ``margin`` pixels: bool ``(..., P)``
    (numpy arrays or torch tensors alike)."""
    r = rects[..., None, :]
    return ((points[..., 0] >= r[..., 0] + margin) & (points[..., 0] <= r[..., 2] - margin)
            & (points[..., 1] >= r[..., 1] + margin) & (points[..., 1] <= r[..., 3] - margin))
