"""Figures for evaluation reports: CED curves, landmarks drawn on images, image grids.

Figures are built on ``matplotlib.figure.Figure`` and rendered by Agg directly -- no
pyplot, so no global backend switch and no shared figure state in Ray workers / CI.
Images are BGR
uint8 (OpenCV order, as the shards store them); drawing is plain numpy.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from k2l_dist.eval.metrics import ced_auc, ced_curve
from k2l_dist.utils.io import atomic_write_bytes


def _make_palette(n: int = 64) -> np.ndarray:
    """n distinct RGB uint8 colours: golden-ratio hue steps, alternating brightness."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.9 if i % 2 == 0 else 0.65
        v = 1.0 if (i // 2) % 2 == 0 else 0.8
        out.append([round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(out, dtype=np.uint8)


# Fixed: landmark k has the same colour in every figure of every run.
PALETTE_RGB: np.ndarray = _make_palette()


def landmark_color_bgr(k: int) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in PALETTE_RGB[k % len(PALETTE_RGB)])
    return b, g, r


def ced_range(curves: dict[str, np.ndarray], max_err: float = 0.0) -> float:
    """The x range of a CED plot: ``max_err`` when set (> 0), else the largest finite error
    of any curve, so that every curve is seen to its end."""
    if max_err > 0:
        return float(max_err)
    finite = [np.asarray(e, np.float64) for e in curves.values()]
    finite = [e[np.isfinite(e)] for e in finite]
    largest = max((float(e.max()) for e in finite if e.size), default=0.0)
    return largest if largest > 0 else 1.0


def save_ced_plot(
    curves: dict[str, np.ndarray],
    path: str | Path,
    max_err: float = 0.0,
    steps: int = 200,
    title: str = "",
    xlabel: str = "NME",
) -> dict[str, float]:
    """CED curve of each named error array in one PNG; returns the AUC over the plot's x
    range (:func:`ced_range`; divided by it) per name."""
    max_err = ced_range(curves, max_err)
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    aucs = {}
    for name, errors in curves.items():
        t, f = ced_curve(errors, max_err, steps)
        aucs[name] = ced_auc(t, f)
        ax.plot(t, f, label=f"{name} (AUC {aucs[name]:.3f})")
    ax.set_xlim(0, max_err)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"{xlabel} (AUC over 0–{max_err:.3g})")
    ax.set_ylabel("fraction of errors ≤ x")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:  # beside the axes, never over a curve
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return aucs


def draw_landmarks(image_bgr: np.ndarray, points: np.ndarray, radius: int = 2) -> np.ndarray:
    """Copy of ``image_bgr`` (H, W, 3) uint8 with landmark k drawn as a filled disc in colour k.

    ``points`` (K, 2) are (x, y) pixel coordinates; NaN (missing) and off-image points
    are skipped. Grey images (H, W) are converted to 3 channels.
    """
    img = np.asarray(image_bgr)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {img.shape}")
    img = img.astype(np.uint8, copy=True)
    H, W = img.shape[:2]
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    r = max(int(radius), 0)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx**2 + dy**2 <= r * r + r  # +r: rounder small discs
    for k, (x, y) in enumerate(pts):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        cx, cy = int(round(x)), int(round(y))
        ys, xs = cy + dy[disc], cx + dx[disc]
        inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        img[ys[inside], xs[inside]] = landmark_color_bgr(k)
    return img


def save_grid(
    images: Sequence[np.ndarray],
    points_list: Sequence[np.ndarray | None],
    path: str | Path,
    cols: int = 8,
    radius: int = 2,
    pad: int = 2,
) -> None:
    """Draw each image's landmarks (None = none) and tile them ``cols`` wide into one PNG."""
    if len(images) == 0:
        raise ValueError("save_grid: no images")
    if len(points_list) != len(images):
        raise ValueError(f"{len(images)} images but {len(points_list)} point sets")
    tiles = [
        draw_landmarks(im, np.zeros((0, 2)) if pts is None else pts, radius)
        for im, pts in zip(images, points_list)
    ]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    cols = max(1, min(int(cols), len(tiles)))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0 : y0 + t.shape[0], x0 : x0 + t.shape[1]] = t
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, np.ascontiguousarray(grid[..., ::-1]), format="png")  # BGR -> RGB for matplotlib
    atomic_write_bytes(path, buf.getvalue())
