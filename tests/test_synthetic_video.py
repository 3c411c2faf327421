"""Tests of the synthetic video clips (k2l_dist.data.synthetic_video)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from k2l_dist.data import synthetic as syn
from k2l_dist.data import synthetic_video as sv
from k2l_dist.data.synthetic import EYE_INDICES, NUM_LANDMARKS, SyntheticImage
from k2l_dist.data.synthetic_video import FRAME_MOTION_MAX_PX, REFERENCE_SIZE, render_clip, render_frame


def _facing(p: syn._Params) -> np.ndarray:
    """Cosine between each part's surface normal and the view direction (as in test_synthetic)."""
    rot = syn._rotation(p.yaw, p.pitch, p.roll)
    n = (p.dirs / p.radii) @ rot.T
    return n[:, 2] / np.linalg.norm(n, axis=1)


def _poses(video: int, seed: int, frames: int) -> list[syn._Params]:
    clip = sv._sample_clip(video, seed, 64, frames, 1.0)
    return [sv._frame_params(clip, t) for t in range(frames)]


def _motion(clip: list[SyntheticImage]) -> np.ndarray:
    """(frames - 1, K) landmark displacement between consecutive frames, px."""
    lms = np.array([f.landmarks for f in clip], dtype=np.float64)
    return np.linalg.norm(np.diff(lms, axis=0), axis=2)


@pytest.mark.parametrize("size", [48, 97])
def test_output_types_and_landmarks_in_frame(size: int) -> None:
    for video in range(3):
        clip = render_clip(video, 3, size, 12)
        assert len(clip) == 12
        for s in clip:
            assert isinstance(s, SyntheticImage)
            assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
            assert s.landmarks.shape == (NUM_LANDMARKS, 2) and s.landmarks.dtype == np.float32
            assert s.visible.shape == (NUM_LANDMARKS,) and s.visible.dtype == bool
            lo, hi = 0.04 * size, 0.96 * size - 1.0  # the still generator's margin, hidden parts too
            assert (s.landmarks >= lo).all() and (s.landmarks <= hi).all(), (video, s.landmarks)


def test_deterministic_and_frames_render_alone() -> None:
    a, b = render_clip(4, 9, 64, 14), render_clip(4, 9, 64, 14)
    for fa, fb in zip(a, b):
        assert np.array_equal(fa.image, fb.image) and np.array_equal(fa.landmarks, fb.landmarks)
        assert np.array_equal(fa.visible, fb.visible)
    for t in (0, 5, 13):  # render_frame is the clip's frame, bit for bit
        f = render_frame(4, t, 9, 64, 14)
        assert np.array_equal(f.image, a[t].image) and np.array_equal(f.landmarks, a[t].landmarks)
        assert np.array_equal(f.visible, a[t].visible)
    short = render_clip(4, 9, 64, 6)  # frame t does not depend on the clip length
    for fs, fa in zip(short, a):
        assert np.array_equal(fs.image, fa.image) and np.array_equal(fs.landmarks, fa.landmarks)


def test_instance_does_not_depend_on_size() -> None:
    small, big = render_clip(2, 5, 64, 6), render_clip(2, 5, 128, 6)
    for s, b in zip(small, big):
        np.testing.assert_allclose(b.landmarks, (s.landmarks + 0.5) * 2.0 - 0.5, atol=1e-3)
        assert np.array_equal(s.visible, b.visible)


def test_different_videos_and_seeds_differ() -> None:
    a, c, d = render_clip(0, 1, 64, 3), render_clip(1, 1, 64, 3), render_clip(0, 2, 64, 3)
    for other in (c, d):
        assert np.abs(a[0].image.astype(int) - other[0].image).mean() > 10
        assert np.abs(a[0].landmarks - other[0].landmarks).max() > 1.0
    # A clip is not a still image set in motion: its streams differ from render(index, seed)'s.
    assert np.abs(a[0].image.astype(int) - syn.render(0, 1, 64).image).mean() > 10


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="frame"):
        render_frame(0, 5, 0, 64, 5)
    with pytest.raises(ValueError, match="frames"):
        render_clip(0, 0, 64, 0)
    with pytest.raises(ValueError, match="size"):
        render_clip(0, 0, 8, 3)


def test_landmarks_move_smoothly_within_the_bound() -> None:
    maxima, accel = [], []
    for video in range(8):
        clip = render_clip(video, 1, REFERENCE_SIZE, 24)
        motion = _motion(clip)
        lms = np.array([f.landmarks for f in clip], dtype=np.float64)
        maxima.append(motion.max())
        accel.append(np.linalg.norm(np.diff(lms, n=2, axis=0), axis=2).max())
        assert np.median(motion) > 0.1, video  # the object really moves, every clip
    maxima, accel = np.array(maxima), np.array(accel)
    print(f"largest frame-to-frame motion per clip at {REFERENCE_SIZE} px: {np.round(maxima, 2)}; "
          f"bound {FRAME_MOTION_MAX_PX:.1f}; largest second difference {accel.max():.2f}")
    assert (maxima <= FRAME_MOTION_MAX_PX).all() and FRAME_MOTION_MAX_PX < 0.15 * REFERENCE_SIZE
    assert maxima.min() > 0.5
    # Smooth, not jittery: the motion changes little from one frame to the next (i.i.d. jitter
    # would make the second difference as large as the motion itself).
    assert (accel < 0.3 * maxima).all() and accel.max() < 0.5


def test_motion_bound_holds_at_other_sizes_and_scales() -> None:
    for size, scale in ((256, 1.0), (96, 1.8)):
        bound = sv.frame_motion_bound_px(size, scale)
        for video in range(10):
            clip = sv._sample_clip(video, 2, size, 30, scale)
            lms = np.array([syn._landmarks(sv._frame_params(clip, t), size)[0] for t in range(30)])
            assert np.linalg.norm(np.diff(lms, axis=0), axis=2).max() <= bound, (size, scale, video)


def test_pose_spans_a_range_within_the_still_ranges() -> None:
    yaw_spans = []
    for video in range(8):
        pose = np.rad2deg([[p.yaw, p.pitch, p.roll] for p in _poses(video, 4, 24)])
        spans = np.ptp(pose, axis=0)
        yaw_spans.append(spans[0])
        assert spans.sum() > 20.0, (video, spans)  # the head turns, nods or tilts in every clip
        assert (np.abs(pose) <= [60.0, 25.0, 30.0]).all()
    print(f"yaw span over 24 frames: {np.round(yaw_spans, 1)} deg")
    assert (np.array(yaw_spans) > 10.0).mean() >= 0.75 and np.median(yaw_spans) > 15.0


def test_visibility_follows_the_pose() -> None:
    size, frames = 96, 20
    vis_all, flips, checked = [], 0, 0
    for video in range(10):
        clip = sv._sample_clip(video, 6, size, frames, 1.0)
        rendered = render_clip(video, 6, size, frames)
        vis = np.array([f.visible for f in rendered])
        vis_all.append(vis)
        flips += int((np.diff(vis.astype(int), axis=0) != 0).any())
        for t in range(0, frames, 4):
            p = sv._frame_params(clip, t)
            facing = _facing(p)
            assert np.array_equal(vis[t], facing > 0.0)
            _, _, part, lms, _ = syn._render_layers(p, size)
            # Clear of the silhouette, drawn <=> visible (a part at a grazing angle is too thin to hit a pixel).
            for k in np.nonzero(np.abs(facing) > 0.2)[0]:
                x, y = np.round(lms[k]).astype(int)
                assert (part[y - 1 : y + 2, x - 1 : x + 2] == k).any() == vis[t, k], (video, t, k)
                checked += 1
    vis_all = np.concatenate(vis_all)
    assert checked > 400
    assert vis_all[:, list(EYE_INDICES)].mean() > 0.95 and 0.8 < vis_all.mean() < 0.99
    assert flips >= 3  # parts turn away and back within clips as the head moves


def test_pixels_move_with_the_landmarks() -> None:
    # A patch around a landmark in frame t matches best (normalised correlation over integer
    # offsets) near where the landmark moved in frame t + 3, not where it was.
    size, gap, r, s = REFERENCE_SIZE, 3, 5, 6
    errors, moved = [], []
    for video in range(6):
        clip = render_clip(video, 1, size, 24)
        poses = _poses(video, 1, 24)
        gray = [cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY).astype(np.float32) for f in clip]
        for t in range(0, 24 - gap, 4):
            for k in np.nonzero(_facing(poses[t]) > 0.5)[0]:  # away from the silhouette
                x, y = np.round(clip[t].landmarks[k]).astype(int)
                template = gray[t][y - r : y + r + 1, x - r : x + r + 1]
                region = gray[t + gap][y - r - s : y + r + s + 1, x - r - s : x + r + s + 1]
                score = cv2.matchTemplate(region, template, cv2.TM_CCOEFF_NORMED)
                iy, ix = np.unravel_index(np.argmax(score), score.shape)
                true = clip[t + gap].landmarks[k] - clip[t].landmarks[k]
                errors.append(np.hypot(ix - s - true[0], iy - s - true[1]))
                moved.append(np.hypot(*true))
    errors, moved = np.array(errors), np.array(moved)
    print(f"patch match error: median {np.median(errors):.2f} px (landmark moved {np.median(moved):.2f} px)")
    assert len(errors) > 150 and np.median(moved) > 1.5
    assert np.median(errors) < 0.75 and (errors <= 1.5).mean() > 0.9


def test_camera_pan_moves_background_and_object_together() -> None:
    # With the head's own motion, pose and warp frozen, only the camera moves: each frame is the
    # first one translated by minus the pan, and the landmarks move by the same amount.
    size = REFERENCE_SIZE
    for video in range(3):
        clip = sv._sample_clip(video, 8, size, 16, 1.0)
        still = {name: np.repeat(getattr(clip, name)[:1], len(getattr(clip, name)), 0)
                 for name in ("yaw", "pitch", "roll", "zoom", "own", "deform")}
        frozen = dataclasses.replace(clip, **still)
        a, b = sv._render_clip_frame(frozen, 0, size), sv._render_clip_frame(frozen, 15, size)
        pan = sv._bspline(clip.pan, 15, sv.KEYFRAME_SPACING) - sv._bspline(clip.pan, 0, sv.KEYFRAME_SPACING)
        shift = -pan * size
        assert np.hypot(*shift) > 1.0
        np.testing.assert_allclose(b.landmarks - a.landmarks, np.tile(shift, (NUM_LANDMARKS, 1)), atol=1e-3)
        # The image's translation by ECC alignment (a(x) ~ b(x + t)), started 0.9 px off the truth.
        ga, gb = (cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY).astype(np.float32) for f in (a, b))
        warp = np.array([[1, 0, shift[0] + 0.7], [0, 1, shift[1] - 0.6]], np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-6)
        _, warp = cv2.findTransformECC(ga, gb, warp, cv2.MOTION_TRANSLATION, criteria, None, 1)
        assert np.hypot(*(warp[:, 2] - shift)) < 0.1, (video, warp[:, 2], shift)
