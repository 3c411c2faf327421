"""Tests of the synthetic landmark dataset (k2l_dist.data.synthetic)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from k2l_dist.data import synthetic as syn
from k2l_dist.data.synthetic import (
    EYE_INDICES,
    FLIP_PERMUTATION,
    LANDMARK_NAMES,
    NUM_LANDMARKS,
    SyntheticImage,
    render,
)


def _facing(p: syn._Params) -> np.ndarray:
    """Cosine between each part's surface normal and the view direction."""
    rot = syn._rotation(p.yaw, p.pitch, p.roll)
    n = (p.dirs / p.radii) @ rot.T
    return n[:, 2] / np.linalg.norm(n, axis=1)


def _mirror_params(p: syn._Params) -> syn._Params:
    """The same instance seen in a horizontal mirror: mirroring world x (M = diag(-1, 1, 1))
    maps pose R to M R M, i.e. negated yaw and roll, and the object to its mirror image,
    whose part i is old part FLIP[i]."""
    perm = list(FLIP_PERMUTATION)
    rw = p.rbf_weights.copy()
    rw[:, 0] *= -1
    rc = p.rbf_centres.copy()
    rc[:, 0] = 1.0 - rc[:, 0]
    light = p.light.copy()
    light[0] *= -1
    return dataclasses.replace(
        p, yaw=-p.yaw, roll=-p.roll, centre=np.array([1.0 - p.centre[0], p.centre[1]]),
        dirs=p.dirs[perm] @ syn._MIRROR, rbf_centres=rc, rbf_weights=rw, part_jitter=p.part_jitter[perm],
        spot_dirs=p.spot_dirs @ syn._MIRROR, light=light)


def test_constants_are_consistent() -> None:
    assert NUM_LANDMARKS == len(LANDMARK_NAMES) == len(FLIP_PERMUTATION)
    perm = np.array(FLIP_PERMUTATION)
    assert sorted(perm.tolist()) == list(range(NUM_LANDMARKS))
    assert (perm[perm] == np.arange(NUM_LANDMARKS)).all()  # involution
    assert (perm != np.arange(NUM_LANDMARKS)).any()  # something actually swaps
    for i, j in enumerate(perm):  # names agree: left_x <-> right_x, centre fixed
        name = LANDMARK_NAMES[i]
        expected = name.replace("left", "#").replace("right", "left").replace("#", "right")
        assert LANDMARK_NAMES[j] == expected
    e0, e1 = EYE_INDICES
    assert e0 != e1 and FLIP_PERMUTATION[e0] == e1


@pytest.mark.parametrize("size", [48, 97, 256])
def test_output_types_and_landmarks_in_frame(size: int) -> None:
    for i in range(12):
        s = render(i, 3, size)
        assert isinstance(s, SyntheticImage)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.landmarks.shape == (NUM_LANDMARKS, 2) and s.landmarks.dtype == np.float32
        assert s.visible.shape == (NUM_LANDMARKS,) and s.visible.dtype == bool
        lo, hi = 0.04 * size, 0.96 * size - 1.0  # a margin, for visible and hidden alike
        assert (s.landmarks >= lo).all() and (s.landmarks <= hi).all(), (i, s.landmarks)


def test_deterministic_and_varied() -> None:
    a, b = render(5, 11, 96), render(5, 11, 96)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.landmarks, b.landmarks)
    assert np.array_equal(a.visible, b.visible)
    c, d = render(6, 11, 96), render(5, 12, 96)
    assert np.abs(a.image.astype(int) - c.image).mean() > 10
    assert np.abs(a.image.astype(int) - d.image).mean() > 10
    assert np.abs(a.landmarks - c.landmarks).max() > 1.0


def test_instance_does_not_depend_on_size() -> None:
    # Same (index, seed) at two sizes: same instance, landmarks scale about pixel edges.
    for i in range(4):
        small, big = render(i, 2, 64), render(i, 2, 128)
        expected = (small.landmarks + 0.5) * 2.0 - 0.5
        np.testing.assert_allclose(big.landmarks, expected, atol=1e-3)
        assert np.array_equal(small.visible, big.visible)


def test_flip_permutation_matches_mirrored_instance() -> None:
    # The mirror image of an instance is itself a valid instance whose part i is
    # the original's FLIP_PERMUTATION[i]: geometry, part map and colours all agree.
    size = 96
    perm = np.array(FLIP_PERMUTATION)
    for i in range(3):
        p = syn._sample_params(np.random.default_rng([1, i]))
        col, alpha, part, lms, vis = syn._render_layers(p, size)
        col_m, alpha_m, part_m, lms_m, vis_m = syn._render_layers(_mirror_params(p), size)
        mirrored = np.column_stack([size - 1 - lms[:, 0], lms[:, 1]])
        np.testing.assert_allclose(lms_m[perm], mirrored, atol=1e-6)
        assert np.array_equal(vis_m[perm], vis)
        flipped = part[:, ::-1].copy()
        flipped[flipped >= 0] = perm[flipped[flipped >= 0]]
        assert np.array_equal(flipped, part_m)
        np.testing.assert_allclose(col[:, ::-1], col_m, atol=0.05)
        np.testing.assert_allclose(alpha[:, ::-1], alpha_m, atol=1e-4)


def test_symmetric_parts_look_mirrored_not_copied() -> None:
    # A frontal, undeformed, symmetric instance: the left eye is the mirror image of
    # the right eye (tilt and highlight mirrored), not a translated copy of it.
    size = 128
    perm = np.array(FLIP_PERMUTATION)
    p = syn._sample_params(np.random.default_rng([9, 0]))
    xy = syn._TEMPLATE_XY
    dirs = np.column_stack([xy, np.sqrt(1.0 - (xy**2).sum(1))])
    p = dataclasses.replace(
        p,
        yaw=0.0,
        pitch=0.0,
        roll=0.0,
        centre=np.array([0.5, 0.5]),
        dirs=dirs,
        rbf_weights=np.zeros_like(p.rbf_weights),
        part_jitter=(p.part_jitter + p.part_jitter[perm]) / 2,
        light=np.array([0.0, -0.3, 0.95]),
        specular=0.0,
    )
    col, _, part, lms, _ = syn._render_layers(p, size)
    (xl, yl), (xr, yr) = np.round(lms[list(EYE_INDICES)]).astype(int)
    assert xl + xr == size - 1 and yl == yr
    r = 6
    left = col[yl - r : yl + r + 1, xl - r : xl + r + 1]
    right = col[yr - r : yr + r + 1, xr - r : xr + r + 1]
    np.testing.assert_allclose(left, right[:, ::-1], atol=0.05)
    assert np.abs(left - right).mean() > 10.0


def test_parts_are_drawn_at_landmarks() -> None:
    # The centroid of each part's pixels (after the non-rigid warp) is the landmark.
    size = 128
    errors = []
    checked_hidden = 0
    for i in range(40):
        p = syn._sample_params(np.random.default_rng([4, i]))
        _, _, part, lms, vis = syn._render_layers(p, size)
        facing = _facing(p)
        for k in range(NUM_LANDMARKS):
            ys, xs = np.nonzero(part == k)
            x, y = np.round(lms[k]).astype(int)
            drawn_here = (part[y - 1 : y + 2, x - 1 : x + 2] == k).any()
            if abs(facing[k]) > 0.1:  # clear of the silhouette: visible <=> drawn there
                assert drawn_here == vis[k], (i, k, facing[k], vis[k])
            if not vis[k]:
                checked_hidden += 1
                assert xs.size <= 10  # a part facing away leaves at most a horizon sliver
            elif facing[k] > 0.5:  # away from the silhouette, where no part is clipped
                assert xs.size >= 3
                errors.append(np.hypot(xs.mean() - lms[k, 0], ys.mean() - lms[k, 1]))
    errors = np.array(errors)
    assert errors.size > 250 and checked_hidden > 10
    assert errors.max() < 1.25 and errors.mean() < 0.5, (errors.max(), errors.mean())


def test_eye_pupils_are_dark_in_the_final_image() -> None:
    # Check the public image itself: the slit pupil is at the eye landmark.
    vals = []
    for i in range(20):
        s = render(i, 6, 256)
        p = syn._sample_params(np.random.default_rng([6, i]))
        grey = cv2.cvtColor(s.image, cv2.COLOR_BGR2GRAY).astype(float)
        facing = _facing(p)
        for k in EYE_INDICES:
            if facing[k] > 0.6:
                x, y = np.round(s.landmarks[k]).astype(int)
                centre = grey[y - 1 : y + 2, x - 1 : x + 2].min()  # robust to rounding
                vals.append((centre, np.median(grey[y - 20 : y + 21, x - 20 : x + 21])))
    vals = np.array(vals)
    assert len(vals) > 20
    # Not every one: strong blur plus low contrast can wash a pupil out.
    assert (vals[:, 0] < 90).mean() > 0.9, vals
    assert (vals[:, 0] < 0.6 * vals[:, 1]).mean() > 0.85, vals


def test_warp_maps_landmarks_consistently() -> None:
    # A blob drawn at a source point, warped by cv2.remap with the render's maps,
    # lands where _warp_points (fixed-point inversion) says: the landmark path and
    # the image path use the same deformation.
    size = 128
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    moved = []
    for i in range(3):
        p = syn._sample_params(np.random.default_rng([2, i]))
        mx, my = syn._warp_maps(p, size)
        pts = np.random.default_rng(i).uniform(25, 103, (6, 2))
        warped = syn._warp_points(p, pts, size)
        for q, f in zip(pts, warped):
            blob = np.exp(-((xx - q[0]) ** 2 + (yy - q[1]) ** 2) / (2 * 1.5**2)).astype(np.float32)
            out = cv2.remap(blob, mx, my, cv2.INTER_LINEAR)
            c = np.array([(out * xx).sum(), (out * yy).sum()]) / out.sum()
            assert np.hypot(*(c - f)) < 0.1, (c, f)
            moved.append(np.hypot(*(f - q)))
    assert max(moved) > 1.0  # the warp is not trivially the identity


def test_some_landmarks_self_occluded_but_mostly_visible() -> None:
    vis = np.array([render(i, 8, 48).visible for i in range(100)])
    assert 0.8 < vis.mean() < 0.99
    assert (~vis).any(axis=1).mean() > 0.2  # many images hide at least one part
    assert vis[:, EYE_INDICES].mean() > 0.95  # eyes are (almost) always in view
    assert (~vis[:, 2]).sum() > 0 and (~vis[:, 3]).sum() > 0  # both ears hide sometimes


def test_raw_orb_keypoints_are_not_the_landmarks() -> None:
    # Generic keypoints must fire on clutter too: a large share lies far from
    # every landmark, so raw ORB does not solve the task by itself.
    orb = cv2.ORB_create(500)
    far = total = 0
    for i in range(30):
        s = render(i, 21, 128)
        kps = orb.detect(cv2.cvtColor(s.image, cv2.COLOR_BGR2GRAY), None)
        pts = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
        d = np.linalg.norm(pts[:, None] - s.landmarks[None], axis=2).min(axis=1)
        far += int((d > 8.0).sum())
        total += len(pts)
    assert total > 30 * 20
    share = far / total
    print(f"ORB keypoints > 8 px from every landmark: {share:.1%} of {total}")
    assert share > 0.3
