"""Sparse optical flow between two frames: pyramidal Lucas-Kanade with a forward-backward check.

Paper Sec. 4.2: for video, training also pairs nearby frames, with the keypoint correspondence
between them recovered by sparse optical flow. ``track_points`` gives that correspondence: it
tracks points from frame a to frame b with OpenCV's ``calcOpticalFlowPyrLK``, tracks the result
back to frame a, and keeps a point only when both directions converge and the round trip returns
within ``fb_max_px`` of where it started (Kalal et al., "Forward-backward error", ICPR 2010): LK
itself reports success on many points that drifted onto an occluder or a similar-looking patch.

Coordinates: (x, y) = (column, row) in the pixel-centre convention, pixel (row i, col j) centred
at (x=j, y=i), the same as the rest of the package.
"""

from __future__ import annotations

import cv2
import numpy as np

from k2l_dist.keypoints.generic import to_gray_uint8

__all__ = ["track_points"]


def _lucas_kanade(
    src: np.ndarray, dst: np.ndarray, points: np.ndarray, window: int, levels: int, criteria: tuple, min_eigen: float
) -> tuple[np.ndarray, np.ndarray]:
    """One LK pass: the points' positions in ``dst`` (N, 2) float32 and LK's own success flags (N,).

    No conversion of the coordinates: OpenCV puts integer coordinates at pixel centres (LK samples
    the window bilinearly around the point, pixel (row i, col j) being the sample at (j, i), and its
    pyramid levels, made by pyrDown, keep level-l sample k at level-0 coordinate 2^l k, so they scale
    by 2^-l with no half-pixel shift): already our convention.
    """
    moved, status, _ = cv2.calcOpticalFlowPyrLK(
        src, dst, points.reshape(-1, 1, 2), None, winSize=(window, window), maxLevel=levels,
        criteria=criteria, minEigThreshold=min_eigen,
    )
    return moved.reshape(-1, 2), status.reshape(-1).astype(bool)


def _inside(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Points whose position lies within the image's pixel centres (finite, 0 <= x <= W-1, 0 <= y <= H-1)."""
    h, w = shape[:2]
    x, y = points[:, 0], points[:, 1]
    with np.errstate(invalid="ignore"):
        return np.isfinite(points).all(axis=1) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def track_points(
    frame_a: np.ndarray,
    frame_b: np.ndarray,
    points: np.ndarray,
    *,
    window: int = 21,
    levels: int = 3,
    fb_max_px: float = 0.5,
    max_iterations: int = 30,
    epsilon: float = 0.01,
    min_eigen: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Track ``points`` (N, 2) of ``frame_a`` into ``frame_b``: their positions there and which to keep.

    Frames are uint8 BGR or gray (anything ``to_gray_uint8`` takes) of the same height and width.
    ``window`` is LK's square window side in pixels, ``levels`` the number of pyramid levels above the
    full resolution (motion up to about ``window / 2 * 2^levels`` px), ``max_iterations`` and
    ``epsilon`` (px) LK's stopping rule per level, and ``min_eigen`` OpenCV's threshold on the
    window's normalised minimal gradient eigenvalue (flat windows fail).

    Returns ``(positions, keep)``: positions (N, 2) float32, LK's forward estimate (meaningless where
    ``keep`` is False; NaN for points not inside ``frame_a``), and keep (N,) bool: LK succeeded forwards and backwards,
    the forward-backward error is at most ``fb_max_px``, and the position lies inside ``frame_b``.
    """
    gray_a, gray_b = to_gray_uint8(frame_a), to_gray_uint8(frame_b)
    if gray_a.shape != gray_b.shape:
        raise ValueError(f"frames differ in size: {gray_a.shape} vs {gray_b.shape}")
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(pts) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, bool)
    usable = _inside(pts, gray_a.shape)
    positions = np.full_like(pts, np.nan)
    keep = np.zeros(len(pts), bool)
    if not usable.any():
        return positions, keep

    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, max_iterations, epsilon)
    lk = dict(window=window, levels=levels, criteria=criteria, min_eigen=min_eigen)
    start = np.ascontiguousarray(pts[usable])
    forward, ok_forward = _lucas_kanade(gray_a, gray_b, start, **lk)
    # The backward pass starts from the forward result, not from the original point, so a point
    # that drifted must find its own way back.
    backward, ok_backward = _lucas_kanade(gray_b, gray_a, forward, **lk)
    with np.errstate(invalid="ignore"):
        fb_ok = np.linalg.norm(backward - start, axis=1) <= fb_max_px
    positions[usable] = forward
    keep[usable] = ok_forward & ok_backward & fb_ok & _inside(forward, gray_b.shape)
    return positions, keep
