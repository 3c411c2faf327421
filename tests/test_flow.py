"""Tests of sparse optical-flow correspondence (k2l_dist.keypoints.flow)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from k2l_dist.data import synthetic_video as sv
from k2l_dist.data.synthetic_video import REFERENCE_SIZE, render_clip
from k2l_dist.keypoints.flow import track_points

SIZE = 160


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """BGR noise with structure at several scales (32 to 4 px), so every pyramid level has texture."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float32)
    for cell, weight in ((32, 1.0), (16, 0.8), (8, 0.6), (4, 0.5)):
        n = size // cell + 1
        coarse = rng.uniform(-1.0, 1.0, (n, n, 3)).astype(np.float32)
        img += weight * cv2.resize(coarse, (n * cell, n * cell), interpolation=cv2.INTER_CUBIC)[:size, :size]
    return np.clip(128.0 + 45.0 * img, 0, 255).astype(np.uint8)


def _grid(margin: int = 12, step: int = 6, size: int = SIZE) -> np.ndarray:
    xs = np.arange(margin, size - margin, step, dtype=np.float32)
    return np.stack(np.meshgrid(xs, xs), axis=-1).reshape(-1, 2)


def _warp(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``image`` moved by the 2x3 affine ``m`` (OpenCV's pixel-centre coordinates both sides)."""
    return cv2.warpAffine(image, m, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("gray", [False, True])
def test_recovers_a_subpixel_shift(gray: bool) -> None:
    a = _texture(0)
    m = np.array([[1.0, 0.0, 2.3], [0.0, 1.0, -1.7]])
    b = _warp(a, m)
    if gray:
        a, b = cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.cvtColor(b, cv2.COLOR_BGR2GRAY)
    pts = _grid()
    pos, keep = track_points(a, b, pts)
    assert pos.shape == pts.shape and pos.dtype == np.float32 and keep.dtype == bool
    err = np.linalg.norm(pos - _apply(m, pts), axis=1)[keep]
    print(f"shift: kept {keep.mean():.1%}, error max {err.max():.3f} median {np.median(err):.3f} px")
    assert keep.mean() > 0.8
    assert err.max() < 0.5 and np.median(err) < 0.05


def test_recovers_a_small_rotation() -> None:
    a = _texture(1)
    m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 2.0, 1.0)
    pts = _grid()
    pos, keep = track_points(a, _warp(a, m), pts)
    err = np.linalg.norm(pos - _apply(m, pts), axis=1)[keep]
    # LK fits a translation per window: a 2 deg rotation moves the window's corners by ~0.35 px
    # relative to its centre, hence errors of a few tenths (3 deg gives up to 0.46 px).
    print(f"rotation: kept {keep.mean():.1%}, error max {err.max():.3f} median {np.median(err):.3f} px")
    assert keep.mean() > 0.8 and err.max() < 0.5


def test_points_are_in_the_pixel_centre_convention() -> None:
    # A 1.2x zoom about the centre: were LK's coordinates offset by half a pixel from ours, every
    # tracked point would be off by 0.5 * (1.2 - 1) = 0.1 px along both axes, on average.
    a = _texture(2)
    m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 0.0, 1.2)
    pts = _grid(margin=40, step=3)  # stays in frame after the zoom
    pos, keep = track_points(a, _warp(a, m), pts, fb_max_px=1.0)
    bias = (pos - _apply(m, pts))[keep].mean(axis=0)
    assert keep.mean() > 0.8 and (np.abs(bias) < 0.04).all(), bias


@pytest.mark.parametrize("occluder", ["texture", "flat"])
def test_occluded_points_are_rejected(occluder: str) -> None:
    a = _texture(3)
    m = np.array([[1.0, 0.0, 2.3], [0.0, 1.0, -1.7]])
    b = _warp(a, m)
    lo, hi = 40, 110
    b[lo:hi, lo:hi] = _texture(4)[lo:hi, lo:hi] if occluder == "texture" else 128
    pts = _grid()
    moved = _apply(m, pts)
    _, keep = track_points(a, b, pts)
    half = 21 // 2  # the whole LK window lies on the occluder
    hidden = ((moved >= lo + half) & (moved <= hi - 1 - half)).all(axis=1)
    clear = ((moved < lo - half) | (moved > hi - 1 + half)).any(axis=1)
    assert hidden.sum() > 50 and clear.sum() > 200
    assert keep[hidden].mean() < 0.05 and keep[clear].mean() > 0.95


def test_points_leaving_the_frame_are_rejected() -> None:
    a = _texture(5)
    m = np.array([[1.0, 0.0, 9.4], [0.0, 1.0, 0.0]])  # new content enters on the left
    pts = _grid(margin=2, step=4)
    moved = _apply(m, pts)
    pos, keep = track_points(a, _warp(a, m), pts)
    gone = moved[:, 0] > SIZE - 1
    assert gone.sum() > 50 and not keep[gone].any()
    inside = (moved[:, 0] < SIZE - 1 - 21) & (moved[:, 0] > 21) & (moved[:, 1] > 21) & (moved[:, 1] < SIZE - 1 - 21)
    assert keep[inside].mean() > 0.9
    assert (np.linalg.norm(pos - moved, axis=1)[keep] < 0.5).all()


def test_points_outside_the_first_frame_and_empty_input() -> None:
    a = _texture(6)
    pts = np.array([[-3.0, 50.0], [50.0, SIZE + 2.0], [np.nan, 10.0], [80.0, 80.0]], np.float32)
    pos, keep = track_points(a, a, pts)
    assert keep.tolist() == [False, False, False, True]
    assert np.isnan(pos[:3]).all() and np.allclose(pos[3], [80.0, 80.0], atol=0.01)
    pos, keep = track_points(a, a, np.zeros((0, 2)))
    assert pos.shape == (0, 2) and pos.dtype == np.float32 and keep.shape == (0,) and keep.dtype == bool
    with pytest.raises(ValueError, match="size"):
        track_points(a, a[:100], pts)


def test_stricter_forward_backward_threshold_keeps_fewer() -> None:
    a = _texture(7)
    b = _warp(a, cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 6.0, 1.0))
    pts = _grid()
    strict = track_points(a, b, pts, fb_max_px=0.02)[1]
    loose = track_points(a, b, pts, fb_max_px=2.0)[1]
    assert (strict <= loose).all() and strict.sum() < loose.sum()


def test_pan_only_video_frames_track_exactly() -> None:
    """A synthetic clip with the head frozen and only the camera panning: the frames are
    translations of each other, and the tracked landmarks match the true ones within a few tenths
    of a pixel (the renderer point-samples the head's parts, so sub-pixel shifts alias a little)."""
    clip = sv._sample_clip(0, 7, REFERENCE_SIZE, 16, 1.0)
    still = {name: np.repeat(getattr(clip, name)[:1], len(getattr(clip, name)), 0)
             for name in ("yaw", "pitch", "roll", "zoom", "own", "deform")}
    frozen = dataclasses.replace(clip, **still)
    frames = [sv._render_clip_frame(frozen, t, REFERENCE_SIZE) for t in range(0, 16, 3)]
    errors = []
    for a, b in zip(frames, frames[1:]):
        pos, keep = track_points(a.image, b.image, a.landmarks[a.visible])
        assert keep.mean() > 0.8
        errors.extend(np.linalg.norm(pos - b.landmarks[a.visible], axis=1)[keep])
    assert max(errors) < 0.5 and np.mean(errors) < 0.15, errors


def test_tracks_landmarks_between_consecutive_video_frames() -> None:
    """Landmarks visible in two consecutive frames of synthetic clips (128 px), tracked by LK, land
    near the next frame's true landmarks.

    Relaxed from "within 1 px" to "99% within 1 px, all within 1.5 px": LK fits one translation to a
    21 px window, but the head rotates in 3D and deforms, so surface points at different depths in
    the window move differently, and near the silhouette (ears, forehead) the window also holds
    background, which moves with the camera only. The window's average motion then differs from
    its centre's by up to ~1.25 px (measured over 40 clips x 15 pairs; 99th percentile 0.7 px,
    mean 0.2 px). The forward-backward check cannot see it: the bias is the same both ways. A
    pan-only clip (test above) tracks within 0.5 px, so the renderer's tracks are exact.
    """
    errors, kept = [], []
    for video in range(8):
        clip = render_clip(video, 7, REFERENCE_SIZE, 12)
        for a, b in zip(clip, clip[1:]):
            both = a.visible & b.visible
            pos, keep = track_points(a.image, b.image, a.landmarks[both])
            errors.extend(np.linalg.norm(pos - b.landmarks[both], axis=1)[keep])
            kept.extend(keep)
    errors = np.array(errors)
    print(f"video landmarks: kept {np.mean(kept):.1%} of {len(kept)}, error max {errors.max():.2f} "
          f"mean {errors.mean():.2f} px, {np.mean(errors <= 1.0):.1%} within 1 px")
    assert np.mean(kept) > 0.9
    assert errors.max() < 1.5 and np.mean(errors <= 1.0) > 0.99 and errors.mean() < 0.3
