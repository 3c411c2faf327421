"""Synthetic video clips of the toy cat head, with exact landmark tracks.

Paper Sec. 4.2: on video datasets, training also pairs nearby frames whose keypoint
correspondence comes from sparse optical flow. This module makes such video for the embedded
synthetic category (``k2l_dist.data.synthetic``), with the true landmarks of every frame, so that
flow correspondence and temporal pairs can be checked against the truth.

A clip shows one instance (shape, part layout, colours, texture, lighting, warp centres and
widths, background layout: drawn with the still generator's own helpers) over ``frames`` frames,
while its geometry changes smoothly:

* **Pose.** Yaw, pitch, roll and the head size each follow a uniform cubic B-spline through
  keyframes ``KEYFRAME_SPACING`` frames apart. The keyframes are a bounded random walk with a
  persistent direction (the head sweeps one way, reverses at the range limits or now and then at
  random), inside the still generator's ranges (yaw ±60°, pitch ±25°, head radius 0.17-0.26 of the
  image side; roll ±30° where the still draws a clipped N(0, 12°)).
* **Position and camera.** The object's own translation and a camera pan are two more such walks;
  the background is rendered once on a larger canvas and each frame cuts a sub-pixel window from
  it at the pan offset, and the object moves with the background (image position = own position
  minus pan). Ranges keep the whole head, plus its largest warp displacement, in frame.
* **Deformation.** The RBF warp's centres move with the object and its weights follow a B-spline
  through independent keyframes ``_DEFORM_SPACING`` frames apart. Each keyframe has
  ``sum_j |w_j| = amp`` like a still image, and a B-spline value is a convex combination of
  keyframes, so the still generator's invertibility bound (Jacobian < 0.7) holds in every frame.
* **Sensor.** Blur, contrast and brightness are the instance's; pixel noise is drawn anew for
  every frame.

B-spline basis weights are non-negative and sum to one, so each trajectory stays in the convex hull
of its keyframes (the ranges) and changes between consecutive frames by at most the largest
keyframe step divided by the spacing. That gives a worst-case bound on the landmarks' frame-to-frame
motion, ``frame_motion_bound_px`` (``FRAME_MOTION_MAX_PX`` at ``REFERENCE_SIZE``).

Determinism. A clip is a function of ``(video, seed, size, object_scale)``: every trajectory draws
its keyframes one by one from its own random stream and each frame its own noise, so frame ``t``
does not depend on ``frames`` (a shorter clip is a prefix of a longer one) and ``render_frame``
renders one frame alone, e.g. in a worker process. Clips use random streams disjoint from the still
images', so video ``v`` is not still image ``v`` set in motion.

The compositing (background, blur, contrast, noise) is ``synthetic._compose``, with the
clip's camera window as the background.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from k2l_dist.data import synthetic
from k2l_dist.data.synthetic import _MARGIN, SyntheticImage, _background, _Params, _render_layers, _sample_params

__all__ = [
    "FRAME_MOTION_MAX_PX",
    "KEYFRAME_SPACING",
    "REFERENCE_SIZE",
    "frame_motion_bound_px",
    "render_clip",
    "render_frame",
]

REFERENCE_SIZE: int = 128
KEYFRAME_SPACING: int = 10  # frames between pose / position keyframes
_DEFORM_SPACING = 24  # frames between deformation keyframes: the warp changes more slowly than the pose

_TAG = 0x766964  # "vid": separates the clips' random streams from the still images' ([seed, index])
_TURN_PROB = 0.25  # chance that a walk reverses its direction at a keyframe


@dataclass(frozen=True)
class _Walk:
    """A keyframe random walk: keyframes stay in [lo, hi], consecutive ones differ by at most ``step``."""

    lo: float
    hi: float
    step: float


_YAW = _Walk(np.deg2rad(-60.0), np.deg2rad(60.0), np.deg2rad(24.0))
_PITCH = _Walk(np.deg2rad(-25.0), np.deg2rad(25.0), np.deg2rad(12.0))
_ROLL = _Walk(np.deg2rad(-30.0), np.deg2rad(30.0), np.deg2rad(10.0))
# Head size as a factor on the clip's base radius: base in [0.17 / 0.9, 0.26 / 1.1] keeps the
# radius within the still generator's [0.17, 0.26] (times object_scale).
_ZOOM = _Walk(0.9, 1.1, 0.04)
_BASE_RADIUS = (0.17 / 0.9, 0.26 / 1.1)
_OWN_STEP = 0.06  # the object's own translation, fraction of the image side per keyframe and axis
_PAN_STEP = 0.04  # camera pan, same units
_PAN_MAX = 0.1
# The still generator's warp ranges (synthetic._sample_geometry): amp <= 0.09, sigma >= 0.08, and
# its radii: [a, a * U(0.95, 1.25), a * U(0.8, 1.05)]. They enter the motion bound only.
_AMP_MAX = 0.09
_SIGMA_MIN = 0.08
_RATIO_MAX = 1.25
_ROOM_MAX = 0.5 - _MARGIN - 0.04  # half the frame minus margin and the smallest amp: caps the fitted radius

# Random streams of one clip, numbered: [seed, video, _TAG, stream] (+ frame for the noise).
_S_YAW, _S_PITCH, _S_ROLL, _S_ZOOM, _S_OWN_X, _S_OWN_Y, _S_PAN_X, _S_PAN_Y, _S_DEFORM, _S_NOISE, _S_START = range(11)


@dataclass
class _Clip:
    """Everything one clip's frames share; trajectories as keyframes, positions in image fractions."""

    base: _Params  # the instance; its pose, size, centre and warp weights are replaced per frame
    radii: np.ndarray  # (3,) fitted semi-axes at zoom 1
    rbf_offsets: np.ndarray  # (J, 2) warp centres relative to the object centre
    yaw: np.ndarray  # (K,) keyframes
    pitch: np.ndarray
    roll: np.ndarray
    zoom: np.ndarray
    own: np.ndarray  # (K, 2) object position before the pan
    pan: np.ndarray  # (K, 2) camera offset
    deform: np.ndarray  # (Kd, J, 2) warp weight keyframes
    canvas: np.ndarray  # (C, C, 3) float32 background, larger than a frame
    seed: int
    video: int


def _keyframe_count(frames: int, spacing: int) -> int:
    """Control points that a cubic B-spline over frames 0..frames-1 needs."""
    return (frames - 1) // spacing + 4


def _stream(seed: int, video: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, video, _TAG, *key])


def _walk(rng: np.random.Generator, start: float, walk: _Walk, count: int) -> np.ndarray:
    """``count`` keyframes of a bounded walk with a persistent direction, starting at ``start``.

    Steps are ``step * U(0.5, 1)``, so the value keeps moving; at a bound the step is reflected
    (which never lengthens it) and the direction turns. One fixed draw per keyframe: a walk with
    more keyframes extends the shorter one.
    """
    keys = np.empty(count)
    x = float(np.clip(start, walk.lo, walk.hi))
    direction = 1.0 if rng.random() < 0.5 else -1.0
    for k in range(count):
        keys[k] = x
        turn, size = rng.random(2)
        if turn < _TURN_PROB:
            direction = -direction
        x += direction * walk.step * (0.5 + 0.5 * size)
        if x > walk.hi:
            x, direction = 2.0 * walk.hi - x, -1.0
        elif x < walk.lo:
            x, direction = 2.0 * walk.lo - x, 1.0
        x = float(np.clip(x, walk.lo, walk.hi))  # a range narrower than a step
    return keys


def _deform_keys(rng: np.random.Generator, count: int, centres: int, amp: float) -> np.ndarray:
    """``count`` warp weight sets, each scaled like the still generator's: ``sum_j |w_j| = amp``."""
    keys = np.empty((count, centres, 2))
    for k in range(count):
        w = rng.normal(0.0, 1.0, (centres, 2))
        keys[k] = w * (amp / np.linalg.norm(w, axis=1).sum())
    return keys


def _bspline(keys: np.ndarray, t: float, spacing: int) -> np.ndarray:
    """Uniform cubic B-spline through ``keys`` (K, ...) at frame ``t``: a convex combination of 4 keys."""
    u = t / spacing
    i = int(np.floor(u))
    f = u - i
    w = np.array([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6.0
    return np.tensordot(w, keys[i : i + 4], axes=1)


def _placement(largest: float, amp: float) -> tuple[float, _Walk, _Walk]:
    """Fit factor for the head's semi-axes, and the walks of its own position and of the pan.

    ``largest`` is the largest semi-axis the clip reaches: the projected half extent is at most that
    in any pose, so fitting it plus the largest warp displacement in frame, as the still generator
    does for one pose, keeps the head in frame in every frame. The image centre (own position minus
    pan) then stays in [lo, 1 - lo] on both axes.
    """
    fit = min(1.0, (0.5 - _MARGIN - amp) / largest)
    lo = _MARGIN + amp + largest * fit
    pan_max = min(_PAN_MAX, max(1.0 - 2.0 * lo, 0.0) / 4.0)
    return fit, _Walk(lo + pan_max, 1.0 - lo - pan_max, _OWN_STEP), _Walk(-pan_max, pan_max, _PAN_STEP)


def _sample_clip(video: int, seed: int, size: int, frames: int, object_scale: float) -> _Clip:
    """Draw one clip's instance, background and keyframes (the count covers ``frames`` frames)."""
    rng = _stream(seed, video)
    base = _sample_params(rng, object_scale)  # shape, warp widths, appearance; fixed draw count
    amp = float(np.linalg.norm(base.rbf_weights, axis=1).sum())
    ratios = base.radii / base.radii[0]

    start = _stream(seed, video, _S_START)
    a = start.uniform(*_BASE_RADIUS) * object_scale
    fit, own, pan = _placement(ratios.max() * a * _ZOOM.hi, amp)
    starts = start.uniform(0.0, 1.0, 7)  # where the walks start, as fractions of their ranges
    roll0 = np.deg2rad(np.clip(start.normal(0.0, 12.0), -30.0, 30.0))  # the still generator's roll law
    count = _keyframe_count(frames, KEYFRAME_SPACING)

    def walk(stream: int, w: _Walk, first: float) -> np.ndarray:
        return _walk(_stream(seed, video, stream), first, w, count)

    def at(w: _Walk, u: float) -> float:
        return w.lo + u * (w.hi - w.lo)

    pan_px = int(np.ceil(pan.hi * size)) + 2  # canvas border: the window never leaves the canvas
    bg = _background(rng, size + 2 * pan_px)  # after the instance's draws, like a still image
    return _Clip(
        base=base,
        radii=ratios * a * fit,
        rbf_offsets=base.rbf_centres - base.centre,
        yaw=walk(_S_YAW, _YAW, at(_YAW, starts[0])),
        pitch=walk(_S_PITCH, _PITCH, at(_PITCH, starts[1])),
        roll=walk(_S_ROLL, _ROLL, roll0),
        zoom=walk(_S_ZOOM, _ZOOM, at(_ZOOM, starts[2])),
        own=np.column_stack([walk(_S_OWN_X, own, at(own, starts[3])), walk(_S_OWN_Y, own, at(own, starts[4]))]),
        pan=np.column_stack([walk(_S_PAN_X, pan, at(pan, starts[5])), walk(_S_PAN_Y, pan, at(pan, starts[6]))]),
        deform=_deform_keys(_stream(seed, video, _S_DEFORM), _keyframe_count(frames, _DEFORM_SPACING),
                            len(base.rbf_sigmas), amp),
        canvas=bg.astype(np.float32),
        seed=seed,
        video=video,
    )


def _frame_params(clip: _Clip, t: int) -> _Params:
    """The still generator's parameters of frame ``t``: the instance in this frame's pose and warp."""
    centre = _bspline(clip.own, t, KEYFRAME_SPACING) - _bspline(clip.pan, t, KEYFRAME_SPACING)
    return dataclasses.replace(
        clip.base,
        yaw=float(_bspline(clip.yaw, t, KEYFRAME_SPACING)),
        pitch=float(_bspline(clip.pitch, t, KEYFRAME_SPACING)),
        roll=float(_bspline(clip.roll, t, KEYFRAME_SPACING)),
        radii=clip.radii * float(_bspline(clip.zoom, t, KEYFRAME_SPACING)),
        centre=centre,
        rbf_centres=centre + clip.rbf_offsets,
        rbf_weights=_bspline(clip.deform, t, _DEFORM_SPACING),
    )


def _camera_window(clip: _Clip, t: int, size: int) -> np.ndarray:
    """The background of frame ``t``: a ``size`` × ``size`` window of the canvas at the pan offset.

    Sub-pixel offsets are resampled bilinearly (``WARP_INVERSE_MAP``: frame pixel (x, y) reads canvas
    pixel (x + ox, y + oy)); a pan of +d image sides moves the background by -d * size pixels.
    """
    ox, oy = (clip.canvas.shape[1] - size) / 2.0 + _bspline(clip.pan, t, KEYFRAME_SPACING) * size
    m = np.array([[1.0, 0.0, ox], [0.0, 1.0, oy]])
    return cv2.warpAffine(clip.canvas, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def _render_clip_frame(clip: _Clip, t: int, size: int) -> SyntheticImage:
    p = _frame_params(clip, t)
    premult, alpha, _, lms, vis = _render_layers(p, size)
    noise = _stream(clip.seed, clip.video, _S_NOISE, t)
    image = synthetic._compose(p, _camera_window(clip, t, size), premult, alpha, noise)
    return SyntheticImage(image=image, landmarks=lms.astype(np.float32), visible=vis)


def _check(size: int, frames: int, object_scale: float) -> None:
    synthetic._check(size, object_scale)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")


def render_clip(video: int, seed: int, size: int, frames: int, object_scale: float = 1.0) -> list[SyntheticImage]:
    """Render clip ``video`` of the synthetic video set ``seed``: ``frames`` frames of ``size`` × ``size`` px.

    Deterministic in its arguments; frame ``t`` equals ``render_frame(video, t, seed, size, frames,
    object_scale)`` and does not depend on ``frames``. Landmarks follow ``synthetic``'s conventions.
    """
    video, seed, size, frames, object_scale = int(video), int(seed), int(size), int(frames), float(object_scale)
    _check(size, frames, object_scale)
    clip = _sample_clip(video, seed, size, frames, object_scale)
    return [_render_clip_frame(clip, t, size) for t in range(frames)]


def render_frame(
    video: int, frame: int, seed: int, size: int, frames: int, object_scale: float = 1.0
) -> SyntheticImage:
    """Render frame ``frame`` of clip ``video`` alone: the same arrays as ``render_clip(...)[frame]``."""
    video, frame, seed, size, frames = int(video), int(frame), int(seed), int(size), int(frames)
    object_scale = float(object_scale)
    _check(size, frames, object_scale)
    if not 0 <= frame < frames:
        raise ValueError(f"frame must be in [0, {frames}), got {frame}")
    clip = _sample_clip(video, seed, size, frame + 1, object_scale)  # keyframes up to this frame suffice
    return _render_clip_frame(clip, frame, size)


def frame_motion_bound_px(size: int = REFERENCE_SIZE, object_scale: float = 1.0) -> float:
    """Worst-case distance a landmark moves between consecutive frames at ``size`` px (any clip).

    A B-spline changes per frame by at most (largest keyframe step) / spacing. The projected part
    centre v (relative to the object centre) then moves by at most r_max * (sum of the angle rates)
    + (radius rate); the warp solves l + D(l) = v with D Lipschitz below kappa = amp e^(-1/2) /
    sigma_min, so the warped point moves by at most (|dv| + sum_j |dw_j|) / (1 - kappa); the object
    centre's own motion and the pan add directly. The worst case multiplies extremes (largest head,
    warp and steps in the same direction), so real motion is several times smaller: over 300 clips
    x 40 frames at 128 px, the largest was 2.5 px, the 99th percentile 1.8 px and the median 0.75 px,
    against a bound of 15.8 px.
    """
    r_max = min(_RATIO_MAX * _BASE_RADIUS[1] * _ZOOM.hi * object_scale, _ROOM_MAX)
    angle_rate = (_YAW.step + _PITCH.step + _ROLL.step) / KEYFRAME_SPACING
    radius_rate = _RATIO_MAX * _BASE_RADIUS[1] * object_scale * _ZOOM.step / KEYFRAME_SPACING
    warp_rate = 2.0 * _AMP_MAX / _DEFORM_SPACING  # sum_j |w_j - w'_j| <= 2 amp between keyframes
    kappa = _AMP_MAX * np.exp(-0.5) / _SIGMA_MIN
    centre_rate = np.sqrt(2.0) * (_OWN_STEP + _PAN_STEP) / KEYFRAME_SPACING
    relative = (r_max * angle_rate + radius_rate + warp_rate) / (1.0 - kappa)
    return float(size * (centre_rate + relative))


FRAME_MOTION_MAX_PX: float = frame_motion_bound_px()  # at REFERENCE_SIZE, object_scale 1
