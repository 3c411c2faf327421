"""Synthetic "toy cat head" category: the embedded default dataset.

Each image shows one instance of a deformable, textured object category with
``NUM_LANDMARKS`` = 10 ground-truth landmarks, drawn on a cluttered background.

What is drawn:

* **Object.** An ellipsoidal head, ray-cast orthographically (vectorised over
  pixels) with random radii. Ten surface parts sit at fixed, left/right symmetric
  template positions on the unit sphere (jittered per instance): two tilted
  almond eyes with slit pupils and a highlight on the outer side, two triangular
  ears with pink insides, two pink whisker pads, two dark mouth corners joined by
  a mouth line, a shaded nose bump and a diamond mark on the forehead. Symmetric
  parts are drawn in mirrored local frames, so they look mirrored (eye tilt, eye
  highlight), not copied. The landmark of a part is the exact projection of its
  centre on the surface.
* **Pose.** Out-of-plane rotation (yaw within ±60°, pitch within ±25°), in-plane
  rotation, scale and translation. A landmark is ``visible`` when its surface
  normal faces the camera; the far ear and, at strong yaw, a far whisker pad turn
  away.
* **Non-rigid deformation.** A smooth random displacement field (a sum of
  Gaussian radial basis functions) warps the object with ``cv2.remap``; the
  landmarks are pushed through the same warp exactly (fixed-point inversion of the
  backward map).
* **Appearance.** Random fur colour, stripes / spots / mottled / plain texture
  evaluated at the surface point in object coordinates, a lighter muzzle, Lambert
  plus specular shading from a random light, global contrast/brightness jitter,
  mild blur and noise.
* **Background.** Colour gradients, blocky texture, and random polygons,
  rectangles, ellipses, lines and zig-zags, so generic corner detectors such as
  ORB fire on the clutter at least as much as on the object.

Conventions. Images are ``uint8`` BGR. Landmarks are ``(x, y)`` in the pixel-centre
convention: pixel (row i, col j) has centre (x=j, y=i). "Left" means the viewer's
left in the canonical frontal pose, so mirroring the image horizontally turns
landmark ``i`` into landmark ``FLIP_PERMUTATION[i]``. Rendering is deterministic
in ``(index, seed, size)``, and the instance (pose, shape, colours, background
layout) does not depend on ``size``: only sampling resolution and pixel noise do.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "NUM_LANDMARKS",
    "LANDMARK_NAMES",
    "FLIP_PERMUTATION",
    "EYE_INDICES",
    "SyntheticImage",
    "render",
]

LANDMARK_NAMES: tuple[str, ...] = (
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_cheek",
    "right_cheek",
    "left_mouth",
    "right_mouth",
    "nose",
    "forehead",
)
NUM_LANDMARKS: int = len(LANDMARK_NAMES)
FLIP_PERMUTATION: tuple[int, ...] = (1, 0, 3, 2, 5, 4, 7, 6, 8, 9)
EYE_INDICES: tuple[int, int] = (0, 1)

# Template part centres as (x, y) on the front of the unit sphere (object frame:
# x right, y down, z towards the viewer); z = +sqrt(1 - x^2 - y^2).
_TEMPLATE_XY = np.array(
    [
        [-0.36, -0.22], [0.36, -0.22],  # eyes
        [-0.70, -0.58], [0.70, -0.58],  # ears (far to the side: self-occlude under yaw)
        [-0.58, 0.15], [0.58, 0.15],  # whisker pads
        [-0.26, 0.42], [0.26, 0.42],  # mouth corners
        [0.0, 0.12],  # nose
        [0.0, -0.62],  # forehead mark
    ],
    dtype=np.float64,
)
# Angular radius of each part on the unit sphere: the part's mask is centrally
# symmetric in its tangent frame, so its projected centroid is the landmark.
_RADIUS = np.array([0.2, 0.2, 0.26, 0.26, 0.16, 0.16, 0.08, 0.08, 0.13, 0.15])
_EYE, _EAR, _CHEEK, _MOUTH, _NOSE, _FOREHEAD = range(6)
_KIND = (_EYE, _EYE, _EAR, _EAR, _CHEEK, _CHEEK, _MOUTH, _MOUTH, _NOSE, _FOREHEAD)
# Sign of each part's local s axis: left parts use a mirrored frame so that one
# shape description yields mirror-image left/right parts.
_SIDE = np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
# Base BGR colours of the parts (category-consistent; jittered per instance).
_PINK = np.array([0.62, 0.55, 0.92])
_NOSE_COL = np.array([0.45, 0.35, 0.78])
_MOUTH_COL = np.array([0.10, 0.06, 0.40])

_MARGIN = 0.05  # free border around the object, fraction of the image side
_N_RBF = 5
_N_SPOT_PAIRS = 5
_MIRROR = np.diag([-1.0, 1.0, 1.0])


@dataclass
class SyntheticImage:
    """One rendered sample."""

    image: np.ndarray  # (size, size, 3) uint8, BGR
    landmarks: np.ndarray  # (K, 2) float32, (x, y), pixel-centre convention
    visible: np.ndarray  # (K,) bool, False when the part faces away


@dataclass
class _Params:
    """Everything that defines one instance, in size-independent units.

    Lengths are fractions of the image side; positions are in normalised
    pixel-edge coordinates (0 = left/top edge, 1 = right/bottom edge).
    """

    yaw: float
    pitch: float
    roll: float
    radii: np.ndarray  # (3,) ellipsoid semi-axes
    centre: np.ndarray  # (2,) projected ellipsoid centre
    dirs: np.ndarray  # (K, 3) unit part directions, object frame
    rbf_centres: np.ndarray  # (J, 2)
    rbf_sigmas: np.ndarray  # (J,)
    rbf_weights: np.ndarray  # (J, 2) displacement vectors
    fur: np.ndarray  # (3,) BGR
    muzzle: float  # blend strength towards a lighter muzzle
    eye_col: np.ndarray  # (3,) BGR
    part_jitter: np.ndarray  # (K, 3) additive colour jitter per part
    tex_kind: int  # 0 stripes, 1 spots, 2 mottled, 3 plain
    tex_freq: float
    tex_phase: float
    tex_curve: float
    tex_contrast: float
    spot_dirs: np.ndarray  # (2 * pairs, 3), mirror-symmetric set
    spot_cos: float
    light: np.ndarray  # (3,) unit, world frame
    ambient: float
    specular: float
    eye_tilt: float
    mouth_curve: float
    contrast: float
    brightness: float
    blur: float  # Gaussian sigma at 128 px
    noise: float  # grey levels


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Object-to-world rotation: yaw about y, then pitch about x, then roll about z."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def _bgr(h: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return np.array([b, g, r])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _sample_params(rng: np.random.Generator, object_scale: float = 1.0) -> _Params:
    """Draw one instance. The number of draws is fixed, so it never depends on size.

    ``object_scale`` enlarges the head relative to the frame (it still fits: the fit below
    shrinks it if needed and leaves less room for translation).
    """
    geometry = _sample_geometry(rng, object_scale)
    return _Params(**geometry, **_sample_appearance(rng))


def _sample_geometry(rng: np.random.Generator, object_scale: float) -> dict:
    """Shape, pose, position and the smooth warp (the first draws of an instance)."""
    k = NUM_LANDMARKS
    a = rng.uniform(0.17, 0.26) * object_scale
    radii = np.array([a, a * rng.uniform(0.95, 1.25), a * rng.uniform(0.8, 1.05)])
    xy = _TEMPLATE_XY + rng.normal(0.0, 0.025, (k, 2))
    z = np.sqrt(np.clip(1.0 - (xy**2).sum(1), 0.05, None))
    dirs = _unit(np.column_stack([xy, z]))

    yaw = np.deg2rad(rng.uniform(-60.0, 60.0))
    pitch = np.deg2rad(rng.uniform(-25.0, 25.0))
    roll = np.deg2rad(float(np.clip(rng.normal(0.0, 12.0), -35.0, 35.0)))
    rot = _rotation(yaw, pitch, roll)

    # Fit the whole projected ellipsoid (plus the largest warp displacement) in frame.
    amp = rng.uniform(0.04, 0.09)
    shape = rot @ np.diag(radii**2) @ rot.T
    half = np.sqrt(np.diag(shape)[:2])
    room = 0.5 - _MARGIN - amp
    f = min(1.0, room / half.max())
    radii, half = radii * f, half * f
    u = rng.uniform(0.0, 1.0, 2)
    centre = (_MARGIN + amp + half) + u * (1.0 - 2.0 * (_MARGIN + amp + half))

    rbf_centres = centre + rng.uniform(-0.25, 0.25, (_N_RBF, 2))  # on the object
    rbf_sigmas = rng.uniform(0.08, 0.2, _N_RBF)
    w = rng.normal(0.0, 1.0, (_N_RBF, 2))
    # sum |w_j| = amp bounds the displacement by amp and its Jacobian by
    # amp * exp(-1/2) / min(sigma) < 0.7, which keeps the warp invertible and the
    # fixed-point inversion contracting.
    w *= amp / np.linalg.norm(w, axis=1).sum()
    return dict(yaw=float(yaw), pitch=float(pitch), roll=float(roll), radii=radii, centre=centre, dirs=dirs,
                rbf_centres=rbf_centres, rbf_sigmas=rbf_sigmas, rbf_weights=w)


def _sample_appearance(rng: np.random.Generator) -> dict:
    """Colours, texture, lighting, expression and camera effects (drawn after the geometry,
    in this order)."""
    appearance = dict(
        fur=_bgr(rng.uniform(), rng.uniform(0.15, 0.75), rng.uniform(0.35, 0.95)),
        muzzle=float(rng.uniform(0.3, 0.9)),
        eye_col=_bgr(rng.uniform(0.10, 0.38), rng.uniform(0.55, 0.9), rng.uniform(0.8, 1.0)),
        part_jitter=rng.uniform(-0.06, 0.06, (NUM_LANDMARKS, 3)),
        tex_kind=int(rng.integers(0, 4)),
        tex_freq=float(rng.uniform(9.0, 20.0)),
        tex_phase=float(rng.uniform(0.0, 2 * np.pi)),
        tex_curve=float(rng.uniform(-1.5, 1.5)),
        tex_contrast=float(rng.uniform(0.15, 0.6)),
    )
    half_spots = _unit(rng.normal(0.0, 1.0, (_N_SPOT_PAIRS, 3)))
    return dict(
        appearance,
        spot_dirs=np.concatenate([half_spots, half_spots @ _MIRROR]),
        spot_cos=float(np.cos(rng.uniform(0.12, 0.3))),
        light=_unit(np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), 1.0])),
        ambient=float(rng.uniform(0.3, 0.55)),
        specular=float(rng.uniform(0.0, 0.3)),
        eye_tilt=float(np.deg2rad(rng.uniform(5.0, 25.0))),
        mouth_curve=float(rng.uniform(-1.2, 0.2)),
        contrast=float(rng.uniform(0.75, 1.15)),
        brightness=float(rng.uniform(-20.0, 20.0)),
        blur=float(rng.uniform(0.0, 0.9)),
        noise=float(rng.uniform(1.0, 6.0)),
    )


def _displacement(p: _Params, xn: np.ndarray, yn: np.ndarray) -> np.ndarray:
    """Warp displacement (normalised units), shape broadcast(xn, yn) + (2,)."""
    inv = -0.5 / p.rbf_sigmas**2
    # Gaussian RBFs are separable: exp over x times exp over y, then mix by weights.
    gx = np.exp((xn[..., None] - p.rbf_centres[:, 0]) ** 2 * inv)
    gy = np.exp((yn[..., None] - p.rbf_centres[:, 1]) ** 2 * inv)
    return (gx * gy) @ p.rbf_weights


def _warp_maps(p: _Params, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Backward maps for cv2.remap: output pixel q samples the source at q + d(q)."""
    c = np.arange(size, dtype=np.float64)
    cn = (c + 0.5) / size
    inv = -0.5 / p.rbf_sigmas**2
    gx = np.exp((cn[:, None] - p.rbf_centres[:, 0]) ** 2 * inv)  # (S, J)
    gy = np.exp((cn[:, None] - p.rbf_centres[:, 1]) ** 2 * inv)
    # Separable RBFs: d[y, x] = sum_j gy[y, j] w_j gx[x, j], one small matmul per axis.
    map_x = (size * (gy * p.rbf_weights[:, 0]) @ gx.T + c[None, :]).astype(np.float32)
    map_y = (size * (gy * p.rbf_weights[:, 1]) @ gx.T + c[:, None]).astype(np.float32)
    return map_x, map_y


def _warp_points(p: _Params, pts: np.ndarray, size: int) -> np.ndarray:
    """Forward-map source pixel points through the warp: solve q + d(q) = p.

    The displacement is a contraction (Jacobian norm < 0.7), so fixed-point
    iteration converges geometrically; stop once steps are far below a pixel.
    """
    pts = pts.astype(np.float64)
    q = pts.copy()
    for _ in range(60):
        new = pts - size * _displacement(p, (q[:, 0] + 0.5) / size, (q[:, 1] + 0.5) / size)
        step = np.abs(new - q).max()
        q = new
        if step < 1e-9:
            break
    return q


def _part_frames(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tangent axes (e1 ~ object x, e2 ~ object y) at each part, e1 mirrored on the left."""
    ex = np.array([1.0, 0.0, 0.0])
    ey = np.array([0.0, 1.0, 0.0])
    e1 = _unit(ex - (dirs @ ex)[:, None] * dirs) * _SIDE[:, None]
    e2 = ey - (dirs @ ey)[:, None] * dirs
    e2 = _unit(e2 - (e2 * e1).sum(1, keepdims=True) * e1)
    return e1, e2


def _landmarks(p: _Params, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Projected (then warped) part centres in pixels, and their facing flags."""
    rot = _rotation(p.yaw, p.pitch, p.roll)
    world = (p.dirs * p.radii) @ rot.T  # surface points, normalised units
    pts = (p.centre + world[:, :2]) * size - 0.5
    normals = (p.dirs / p.radii) @ rot.T  # ellipsoid normal is grad of sum (P_i/r_i)^2
    visible = normals[:, 2] > 0.0
    return _warp_points(p, pts, size), visible


def _texture(p: _Params, u: np.ndarray) -> np.ndarray:
    """Fur pattern in [0, 1] at unit-sphere object points u (3, n); mirror symmetric in x."""
    ux, uy, uz = u
    if p.tex_kind == 0:  # curved stripes
        ph = p.tex_freq * (uy + p.tex_curve * ux**2 + 0.3 * uz) + p.tex_phase
        return np.clip((np.sin(ph) - 0.15) * 3.0, 0.0, 1.0)
    if p.tex_kind == 1:  # spots
        best = (p.spot_dirs.astype(np.float32) @ u).max(0)
        return np.clip((best - p.spot_cos) / 0.02, 0.0, 1.0)
    if p.tex_kind == 2:  # mottled
        v = np.sin(p.tex_freq * uy + p.tex_phase) * np.cos(p.tex_freq * 0.8 * ux)
        return np.clip(v * 1.5, 0.0, 1.0)
    return np.zeros_like(ux)


def _shade_parts(
    p: _Params,
    u: np.ndarray,
    col: np.ndarray,
    normal_obj: np.ndarray,
    part: np.ndarray,
) -> None:
    """Paint the K parts into col (n, 3) in place; record ids in part, bump normals."""
    e1, e2 = (e.astype(np.float32) for e in _part_frames(p.dirs))
    dirs = p.dirs.astype(np.float32)
    cd = dirs @ u  # (K, n) cosine to each part centre
    lim = np.cos(_RADIUS * 1.6)
    dark = np.array([0.07, 0.07, 0.07])
    for k in range(NUM_LANDMARKS):
        sel = np.nonzero(cd[k] > lim[k])[0]
        if sel.size == 0:
            continue
        uk = u[:, sel]
        inv_r = float(1.0 / _RADIUS[k])  # python float: keeps float32 math
        s = (e1[k] @ uk) * inv_r
        t = (e2[k] @ uk) * inv_r
        jit = p.part_jitter[k]
        kind = _KIND[k]
        c = col[sel]
        if kind == _EYE:
            ct, st = float(np.cos(p.eye_tilt)), float(np.sin(p.eye_tilt))
            sr, tr = ct * s + st * t, -st * s + ct * t  # outer corner tilts up
            q = np.sqrt(sr**2 + (tr / 0.62) ** 2)
            mask = q < 1.0
            c[:] = np.clip(p.eye_col + jit, 0, 1)
            c[q > 0.78] = dark
            c[(s / 0.28) ** 2 + (t / 0.58) ** 2 < 1.0] = 0.02  # slit pupil
            c[(s - 0.4) ** 2 + (t + 0.2) ** 2 < 0.15**2] = 0.97  # highlight, outer side
        elif kind == _EAR:
            ca, sa = 0.966, 0.259  # cos/sin 15 deg: ears lean outwards
            sr, tr = ca * s - sa * t, sa * s + ca * t
            # Equilateral triangle (apex up, centroid at 0): max over edge normals.
            tri = np.maximum(np.maximum(tr, -0.866 * sr - 0.5 * tr), 0.866 * sr - 0.5 * tr)
            mask = tri < 0.5
            c[:] = p.fur * 0.4 + jit
            c[tri < 0.3] = np.clip(_PINK + jit, 0, 1)
        elif kind == _CHEEK:
            mask = s**2 + t**2 < 1.0
            c[:] = np.clip(0.55 * _PINK + 0.45 * c + jit, 0, 1)
            for ds, dt in ((-0.4, -0.3), (0.4, -0.3), (0.0, 0.35)):
                c[(s - ds) ** 2 + (t - dt) ** 2 < 0.2**2] = dark
        elif kind == _MOUTH:
            mask = s**2 + t**2 < 1.0
            c[:] = np.clip(_MOUTH_COL + jit, 0, 1)
        elif kind == _NOSE:
            rho2 = s**2 + (t / 0.75) ** 2
            mask = rho2 < 1.0
            c[:] = np.clip(_NOSE_COL + jit, 0, 1)
            # Hemispherical bump: the normal tilts away from the nose centre.
            h = 0.8
            nz = np.sqrt(np.clip(1.0 - h * h * rho2, 0.0, None))
            n = np.outer(e1[k], h * s) + np.outer(e2[k], h * t / 0.75) + np.outer(dirs[k], nz)
            normal_obj[:, sel[mask]] = n[:, mask]
        else:  # forehead diamond: dark rim, light core
            l1 = np.abs(s) / 0.75 + np.abs(t)
            mask = l1 < 1.0
            c[:] = np.clip(np.array([0.85, 0.92, 0.97]) + jit, 0, 1)
            c[l1 > 0.7] = p.fur * 0.3
        col[sel[mask]] = c[mask]
        part[sel[mask]] = k


def _render_object(p: _Params, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast the head: premultiplied BGR (0..255), alpha, and part-id map (-1 = none)."""
    f32 = np.float32
    rot = _rotation(p.yaw, p.pitch, p.roll)
    r = p.radii * size
    cx, cy = p.centre * size - 0.5
    shape = rot @ np.diag(r**2) @ rot.T
    hx, hy = np.sqrt(shape[0, 0]), np.sqrt(shape[1, 1])
    x0, x1 = max(int(np.floor(cx - hx - 2)), 0), min(int(np.ceil(cx + hx + 2)), size - 1)
    y0, y1 = max(int(np.floor(cy - hy - 2)), 0), min(int(np.ceil(cy + hy + 2)), size - 1)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    gx = np.tile(np.arange(x0, x1 + 1, dtype=f32) - f32(cx), h)
    gy = np.repeat(np.arange(y0, y1 + 1, dtype=f32) - f32(cy), w)

    # World offset (dx, dy, z) maps to unit-sphere coords A + z B; the ray hits
    # the ellipsoid where |A + z B| = 1 (orthographic camera looking down -z).
    minv = rot.T / r[:, None]
    b = minv[:, 2]
    bb = b @ b
    # rho = |A_perp| is the normalised silhouette radius: a quadratic form in (dx, dy).
    g = (minv[:, :2].T @ (np.eye(3) - np.outer(b, b) / bb) @ minv[:, :2]).astype(f32)
    qx = g[0, 0] * gx + g[0, 1] * gy
    qy = g[0, 1] * gx + g[1, 1] * gy
    rho2 = qx * gx + qy * gy
    rho = np.sqrt(rho2)
    # Signed pixel distance to the silhouette ~ (1 - rho) / |grad rho|: a 1-px AA edge.
    alpha = (1.0 - rho) * rho / np.maximum(np.sqrt(qx * qx + qy * qy), f32(1e-9)) + f32(0.5)
    alpha[rho < 0.5] = 1.0  # deep inside (and the 0/0 at the very centre)
    idx = np.nonzero(alpha > 0)[0]
    gx, gy, rho2 = gx[idx], gy[idx], rho2[idx]
    alpha = np.minimum(alpha[idx], f32(1.0))
    m = minv.astype(f32)
    ab = (b @ m[:, :2]).astype(f32)  # B . A is linear in (dx, dy) too
    z = (np.sqrt(f32(bb) * np.maximum(1.0 - rho2, f32(0.0))) - (ab[0] * gx + ab[1] * gy)) / f32(bb)
    u = np.empty((3, idx.size), f32)
    for i in range(3):
        u[i] = m[i, 0] * gx + m[i, 1] * gy + m[i, 2] * z
    u /= np.sqrt((u * u).sum(0))  # exact on the surface; fixes the AA fringe
    normal_obj = u / p.radii.astype(f32)[:, None]

    col = _fur_colours(p, u)
    part = np.full(idx.size, -1, dtype=np.int32)
    _shade_parts(p, u, col, normal_obj, part)
    rgb = np.clip(_lit(p, rot, col, normal_obj), 0.0, 1.0) * (alpha * 255.0)[:, None]
    return _scatter(size, (y0, y1, x0, x1), idx, rgb, alpha, np.where(rho2 < 1.0, part, -1))


def _fur_colours(p: _Params, u: np.ndarray) -> np.ndarray:
    """``(n, 3)`` colours of the surface points ``u``: fur texture, then a lighter muzzle
    around the mouth, and the mouth line between the two (jittered) corners, bowed by
    ``mouth_curve``."""
    f32 = np.float32
    tex = _texture(p, u)
    col = p.fur.astype(f32)[None, :] * (1.0 - f32(p.tex_contrast) * tex)[:, None]
    mdir = _unit(np.array([0.0, 0.3, 0.95])).astype(f32)
    wm = np.clip((mdir @ u - f32(np.cos(0.5))) * f32(12.5 * p.muzzle), 0.0, p.muzzle)[:, None]
    light_fur = (p.fur + (1.0 - p.fur) * 0.7).astype(f32)
    col += (light_fur - col) * wm

    (xl, yl), (xr, yr) = p.dirs[6, :2], p.dirs[7, :2]
    ux, uy = u[0], u[1]
    band = (ux > xl) & (ux < xr) & (u[2] > 0)
    bi = np.nonzero(band)[0]
    bx = ux[bi]
    yline = yl + (yr - yl) * (bx - xl) / (xr - xl) + p.mouth_curve * (bx - xl) * (bx - xr)
    col[bi[np.abs(uy[bi] - yline) < 0.02]] = 0.12
    return col


def _lit(p: _Params, rot: np.ndarray, col: np.ndarray, normal_obj: np.ndarray) -> np.ndarray:
    """Ambient + diffuse shading of ``col`` and, when the instance has one, a specular highlight."""
    f32 = np.float32
    nw = rot.astype(f32) @ normal_obj  # world normals (3, n)
    nw /= np.sqrt((nw * nw).sum(0))
    light = p.light.astype(f32)
    half = _unit(p.light + np.array([0.0, 0.0, 1.0])).astype(f32)
    shade = f32(p.ambient) + f32(1.0 - p.ambient) * np.maximum(light @ nw, 0.0)
    rgb = col * shade[:, None]
    if p.specular > 0.0:
        rgb += (f32(p.specular) * np.maximum(half @ nw, 0.0) ** 20)[:, None]
    return rgb


def _scatter(size: int, box: tuple[int, int, int, int], idx: np.ndarray, rgb: np.ndarray, alpha: np.ndarray,
             part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bounding box's points (flat indices ``idx`` into it) as full-size images:
    premultiplied BGR, alpha and part id (bbox-sized flat buffers: 1-D fancy indexing is
    the cheap kind)."""
    f32 = np.float32
    y0, y1, x0, x1 = box
    h, w = y1 - y0 + 1, x1 - x0 + 1
    premult = np.zeros((size, size, 3), f32)
    alpha_img = np.zeros((size, size), f32)
    part_img = np.full((size, size), -1.0, f32)
    flat = np.zeros((h * w, 3), f32)
    flat[idx] = rgb
    premult[y0 : y1 + 1, x0 : x1 + 1] = flat.reshape(h, w, 3)
    flat1 = np.zeros(h * w, f32)
    flat1[idx] = alpha
    alpha_img[y0 : y1 + 1, x0 : x1 + 1] = flat1.reshape(h, w)
    flat1[:] = -1.0
    flat1[idx] = part
    part_img[y0 : y1 + 1, x0 : x1 + 1] = flat1.reshape(h, w)
    return premult, alpha_img, part_img


def _render_layers(
    p: _Params, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Warped object layers: premultiplied colour, alpha, part ids, landmarks, visible."""
    premult, alpha, part = _render_object(p, size)
    mx, my = _warp_maps(p, size)
    premult = cv2.remap(premult, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.remap(alpha, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    part = cv2.remap(
        part, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0
    )
    lms, vis = _landmarks(p, size)
    return premult, alpha, part.astype(np.int32), lms, vis


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clutter full of corners and edges: gradient, blocks, polygons, lines, ellipses."""
    s = size
    grad = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    img = cv2.resize(grad, (s, s), interpolation=cv2.INTER_LINEAR)
    g = int(rng.integers(3, 10))
    blocks = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
    blocks = cv2.resize(blocks, (s, s), interpolation=cv2.INTER_NEAREST)
    wb = float(rng.uniform(0.15, 0.6)) * float(rng.random() < 0.75)
    img = cv2.addWeighted(img, 1.0 - wb, blocks, wb, 0.0)

    # All randomness in a few array draws (the count depends only on n and m), and
    # all vertex geometry computed at once: the Python loop only calls cv2.
    n = int(rng.integers(25, 45))
    m = int(rng.integers(20, 40))
    sh = rng.random((n, 12))
    vt = rng.random((n, 7, 2))
    cf = rng.random((m, 11))
    fs = 16.0 * s  # normalised -> cv2 fixed point (shift=4)

    def fixed(pts: np.ndarray) -> np.ndarray:  # normalised edge coords -> cv2 shift=4 ints
        return np.round(pts * fs - 8.0).astype(np.int32)

    kind = (sh[:, 0] * 5).astype(int)
    colour = sh[:, 1:4] * 255.0
    aa = sh[:, 4] < 0.5
    thick = np.maximum(1, np.round((0.006 + 0.024 * sh[:, 5]) * s)).astype(int)
    ctr = -0.05 + 1.1 * sh[:, 6:8]
    rad = 0.03 + 0.12 * sh[:, 8]
    fill, e0, e1 = sh[:, 9], sh[:, 10], sh[:, 11]
    # Star-ish polygons (3-7 vertices), rotated rectangles, zig-zags, line ends.
    nvert = 3 + (e0 * 5).astype(int)
    ang = np.sort(vt[:, :, 0], axis=1) * (2 * np.pi)
    rr = rad[:, None] * (0.4 + 0.6 * vt[:, :, 1])
    poly = fixed(ctr[:, None] + np.stack([rr * np.cos(ang), rr * np.sin(ang)], -1))
    ra = e0[:, None] * np.pi + np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
    rect = np.stack([rad[:, None] * np.cos(ra), (rad * (0.3 + 0.7 * e1))[:, None] * np.sin(ra)], -1)
    rect = fixed(ctr[:, None] + rect)
    zig = fixed(ctr[:, None] + np.cumsum(0.24 * (vt[:, :6] - 0.5), axis=1))
    c_fx = fixed(ctr)
    end = fixed(ctr + 0.6 * vt[:, 0] - 0.3)
    axes = np.round(np.column_stack([rad, rad * (0.3 + 0.7 * e1)]) * fs).astype(int)
    for i in range(n):
        col = tuple(colour[i].tolist())
        line = cv2.LINE_AA if aa[i] else cv2.LINE_8
        k, th = kind[i], int(thick[i])
        if k == 2:
            cv2.line(img, tuple(c_fx[i].tolist()), tuple(end[i].tolist()), col, th, line, shift=4)
        elif k == 3:
            centre, ax = tuple(c_fx[i].tolist()), tuple(axes[i].tolist())
            width = -1 if fill[i] < 0.6 else th  # filled or ring
            cv2.ellipse(img, centre, ax, 180.0 * float(e0[i]), 0, 360, col, width, line, shift=4)
        elif k == 4:
            cv2.polylines(img, zig[i : i + 1, : 3 + int(e1[i] * 4)], False, col, th, line, shift=4)
        else:
            pts = poly[i : i + 1, : nvert[i]] if k == 0 else rect[i : i + 1]
            if fill[i] < 0.7:
                cv2.fillPoly(img, pts, col, line, shift=4)
            else:
                cv2.polylines(img, pts, True, col, th, line, shift=4)

    # Confetti: many small sharp triangles/quads, dense corners everywhere, so that
    # corner detectors cannot lock onto the object alone.
    nv = 3 + (cf[:, 0] > 0.5).astype(int)
    ca = (np.arange(4) + 0.6 * cf[:, 1:5]) * (2 * np.pi / nv[:, None])
    cr = (0.01 + 0.025 * cf[:, 5])[:, None]
    conf = fixed(cf[:, None, 6:8] + np.stack([cr * np.cos(ca), cr * np.sin(ca)], -1))
    ccol = cf[:, 8:11] * 255.0
    for i in range(m):
        cv2.fillPoly(img, conf[i : i + 1, : nv[i]], tuple(ccol[i].tolist()), cv2.LINE_8, shift=4)
    return img


def _check(size: int, object_scale: float) -> None:
    if not 16 <= size <= 1024:
        raise ValueError(f"size must be in [16, 1024], got {size}")
    if not 0.25 <= object_scale <= 2.5:
        raise ValueError(f"object_scale must be in [0.25, 2.5], got {object_scale}")


def _compose(p: _Params, background: np.ndarray, premult: np.ndarray, alpha: np.ndarray,
             noise_rng: np.random.Generator) -> np.ndarray:
    """Object over background, then blur, contrast/brightness and noise (uint8 BGR)."""
    size = background.shape[0]
    img = background.astype(np.float32)
    img *= 1.0 - alpha[..., None]
    img += premult
    sigma = p.blur * size / 128.0
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    # Uniform noise with the requested std, from raw bytes: ~8x cheaper than normals.
    noise = np.frombuffer(noise_rng.bytes(size * size * 3), np.uint8).reshape(size, size, 3)
    k = p.noise * np.sqrt(12.0) / 256.0
    # Contrast/brightness and noise in one affine pass: img * c + noise * k + offset.
    # cv2 rounds and saturates to uint8 itself.
    offset = 128.0 * (1.0 - p.contrast) + p.brightness - 127.5 * k
    return cv2.addWeighted(img, p.contrast, noise.astype(np.float32), k, offset, dtype=cv2.CV_8U)


def _render(index: int, seed: int, size: int, object_scale: float = 1.0) -> tuple[SyntheticImage, np.ndarray]:
    """Render one sample and also return its warped part-id map (for tests)."""
    _check(size, object_scale)
    rng = np.random.default_rng([seed, index])
    p = _sample_params(rng, object_scale)  # first: fixed draw count, so instance is size-independent
    bg = _background(rng, size)
    premult, alpha, part, lms, vis = _render_layers(p, size)
    image = _compose(p, bg, premult, alpha, rng)  # the noise is the rng's last draw
    return SyntheticImage(image=image, landmarks=lms.astype(np.float32), visible=vis), part


def render(index: int, seed: int, size: int, object_scale: float = 1.0) -> SyntheticImage:
    """Render sample ``index`` of the synthetic dataset ``seed`` at ``size`` × ``size`` px.

    Deterministic: the same ``(index, seed, size, object_scale)`` always gives identical
    arrays. ``object_scale`` > 1 draws larger heads (less room to translate).
    """
    return _render(int(index), int(seed), int(size), float(object_scale))[0]
