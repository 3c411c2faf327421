"""Generic keypoint detectors that bootstrap Stage 1: ORB, SIFT (+ ANMS) or SuperPoint.

Coordinates are (x, y) in the pixel-centre convention: the pixel at row i, column j
has its centre at (x=j, y=i), OpenCV's keypoint convention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

import cv2
import numpy as np

from k2l_dist.config import KeypointConfig, KeypointMethod
from k2l_dist.data.crop import PADDING_MARGIN, inside_rects
from k2l_dist.keypoints.anms import anms

if TYPE_CHECKING:
    import torch

METHODS = tuple(m for m in get_args(KeypointMethod) if m != "none")  # the ones that detect
_DIMS = {
    "orb": (32, np.dtype(np.uint8)),  # 256 packed bits
    "sift": (128, np.dtype(np.uint8)),
    "superpoint": (256, np.dtype(np.float32)),
}

# ORB: a FAST threshold below OpenCV's default 20 so low-contrast crops (faces at
# 64-128 px) still yield a candidate pool; Harris ranking + ANMS pick the good ones.
_ORB_FAST_THRESHOLD = 10
_ORB_SCALE = 1.2
_ORB_MAX_LEVELS = 8


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), BGR (H, W, 3) or BGRA (H, W, 4) image → contiguous (H, W) uint8.

    Float images with values in [0, 1] are scaled by 255; other dtypes are clipped to 0..255.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != np.uint8:
        is_float = np.issubdtype(img.dtype, np.floating)
        img = img.astype(np.float32)
        if is_float and img.size and float(img.max()) <= 1.0:
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"expected a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {np.shape(image)}")


def orb_params(height: int, width: int) -> tuple[int, int]:
    """(patchSize = edgeThreshold, nlevels) for an image of this size.

    OpenCV's defaults (31-px patch, 31-px border, 8 levels) exclude most of a 64-px
    crop; the patch scales with the image (min side / 8, odd, 7..31) and the pyramid
    stops before a level gets too small to hold any patch.
    """
    side = max(1, min(height, width))
    patch = int(np.clip(side // 8, 7, 31)) | 1
    levels = 1
    # A level is worth computing while its side still leaves room inside the border.
    while levels < _ORB_MAX_LEVELS and side / _ORB_SCALE**levels >= 2 * patch + 8:
        levels += 1
    return patch, levels


class KeypointDetector:
    """Detect ``cfg.count`` spatially spread keypoints + descriptors in one image.

    ``cfg.candidates`` raw detections (strongest first) are thinned by ANMS to
    ``cfg.count``; descriptors are computed for the kept points only. An image with
    no detection gives empty arrays of shapes (0, 2) and (0, descriptor_dim).
    """

    def __init__(self, cfg: KeypointConfig, device: str | torch.device = "cpu") -> None:
        method = cfg.method.lower()
        if method not in METHODS:
            raise ValueError(f"keypoints.method: expected one of {', '.join(METHODS)}, got {cfg.method!r}")
        if cfg.count < 1:
            raise ValueError(f"keypoints.count must be >= 1, got {cfg.count}")
        self.cfg = cfg
        self.method = method
        self.count = int(cfg.count)
        self.candidates = max(int(cfg.candidates), self.count)
        self.descriptor_dim, self.descriptor_dtype = _DIMS[method]
        self._orb: dict[tuple[int, int], cv2.ORB] = {}  # ORB parameters depend on the image size
        self._sift = None
        self._net = None
        if method == "sift":
            # Precise upscaling removes OpenCV's ~0.25 px localisation bias from the
            # doubled first octave; CV_8U descriptors are the same 0..255 integers.
            self._sift = cv2.SIFT_create(
                self.candidates, 3, 0.04, 10, 1.6, cv2.CV_8U, enable_precise_upscale=True
            )
        elif method == "superpoint":
            if not cfg.superpoint_weights:
                raise ValueError(
                    "keypoints.superpoint_weights is empty: SuperPoint needs a state-dict file "
                    "(none ship with k2l-dist); or use keypoints.method=orb|sift"
                )
            from k2l_dist.keypoints.superpoint import load_superpoint  # torch only when needed

            self._net = load_superpoint(cfg.superpoint_weights).to(device)

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((0, 2), np.float32), np.zeros((0, self.descriptor_dim), self.descriptor_dtype)

    def _orb_for(self, height: int, width: int) -> cv2.ORB:
        key = (height, width)
        if key not in self._orb:
            if len(self._orb) >= 32:  # uncropped inputs of many sizes: keep the cache bounded
                self._orb.clear()
            patch, levels = orb_params(height, width)
            self._orb[key] = cv2.ORB_create(
                nfeatures=self.candidates,
                scaleFactor=_ORB_SCALE,
                nlevels=levels,
                edgeThreshold=patch,
                firstLevel=0,
                WTA_K=2,
                scoreType=cv2.ORB_HARRIS_SCORE,
                patchSize=patch,
                fastThreshold=_ORB_FAST_THRESHOLD,
            )
        return self._orb[key]

    def __call__(self, image_bgr: np.ndarray, region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (N, 2) float32 (x, y), N <= cfg.count, and descriptors (N, descriptor_dim).

        ``region`` ``(x0, y0, x1, y1)``: only points at least ``PADDING_MARGIN`` pixels inside
        it (a crop's padding repeats border pixels; its stripes are not the object).
        """
        gray = to_gray_uint8(image_bgr)
        h, w = gray.shape
        if h < 2 or w < 2:
            return self._empty()
        if self._net is not None:
            from k2l_dist.keypoints.superpoint import superpoint_detect

            pts, desc = superpoint_detect(self._net, gray, self.count, self.candidates)
            keep = _inside(pts, region)
            return pts[keep], desc[keep]

        detector = self._orb_for(h, w) if self.method == "orb" else self._sift
        kps = detector.detect(gray, None)
        if not kps:
            return self._empty()
        pts = np.array([k.pt for k in kps], dtype=np.float64)
        inside = np.flatnonzero(_inside(pts, region))
        if inside.size == 0:
            return self._empty()
        kps, pts = [kps[i] for i in inside], pts[inside]
        resp = np.array([k.response for k in kps], dtype=np.float64)
        # SIFT reports one keypoint per dominant orientation at the same location:
        # keep the strongest per location so duplicates do not use up the budget.
        order = np.argsort(-resp, kind="stable")
        _, first = np.unique(np.round(pts[order] * 100), axis=0, return_index=True)
        unique = order[np.sort(first)]
        kept = unique[anms(pts[unique], resp[unique], self.count)]
        chosen, desc = detector.compute(gray, [kps[i] for i in kept])
        if desc is None or len(chosen) == 0:
            return self._empty()
        out = np.array([k.pt for k in chosen], dtype=np.float64).reshape(-1, 2)
        if self.method == "orb":
            out = _orb_to_pixel_centres(out, np.array([k.octave for k in chosen]), h, w)
        else:
            desc = np.clip(np.rint(desc), 0, 255) if desc.dtype != np.uint8 else desc
        out[:, 0] = np.clip(out[:, 0], 0, w - 1)
        out[:, 1] = np.clip(out[:, 1], 0, h - 1)
        return out.astype(np.float32), np.ascontiguousarray(desc, dtype=self.descriptor_dtype)


def _inside(points: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    if region is None:
        return np.ones(len(points), bool)
    return inside_rects(points, np.asarray(region, np.float64), PADDING_MARGIN)


def _orb_to_pixel_centres(pts: np.ndarray, levels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo ORB's ``pt = u * scale`` for pyramid levels > 0.

    Level L is the image resized to round(W / 1.2^L) x round(H / 1.2^L) with
    pixel-centre sampling, so its pixel u sits at (u + 0.5) * W / W_L - 0.5 in the
    input; OpenCV's plain ``u * 1.2^L`` is up to ~1.7 px off towards the origin.
    """
    scale = _ORB_SCALE ** levels.astype(np.float64)
    out = pts.copy()
    for axis, size in ((0, width), (1, height)):
        level_size = np.maximum(np.round(size / scale), 1)
        out[:, axis] = (pts[:, axis] / scale + 0.5) * size / level_size - 0.5
    return out


def descriptors_to_float(desc: np.ndarray, method: str | None = None) -> np.ndarray:
    """float32 descriptors for faiss / k-means.

    - ORB (uint8, 32 bytes of packed bits): unpacked to 256 values in {0, 1}, so the
      squared L2 distance equals the Hamming distance;
    - SIFT (uint8, 128): cast to float32 and L2-normalised (unit norm, like SuperPoint,
      so distance scales are comparable across methods);
    - SuperPoint (float, 256): returned as float32 unchanged.

    ``method`` (orb | sift | superpoint) resolves the type; by default uint8 with 32
    columns is ORB, uint8 with 128 columns is SIFT and floating point is SuperPoint.
    """
    desc = np.asarray(desc)
    if desc.ndim != 2:
        raise ValueError(f"descriptors must be 2-D (N, D), got shape {desc.shape}")
    if method is None:
        if desc.dtype == np.uint8 and desc.shape[1] == 32:
            method = "orb"
        elif desc.dtype == np.uint8 and desc.shape[1] == 128:
            method = "sift"
        elif np.issubdtype(desc.dtype, np.floating):
            method = "superpoint"
        else:
            raise ValueError(f"cannot tell the descriptor type of {desc.dtype} (N, {desc.shape[1]}); pass method=")
    if method == "orb":
        if desc.dtype != np.uint8:
            raise ValueError(f"ORB descriptors must be packed uint8 bits, got {desc.dtype}")
        return np.unpackbits(desc, axis=1).astype(np.float32)
    if method == "sift":
        out = desc.astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
    if method == "superpoint":
        return np.ascontiguousarray(desc, dtype=np.float32)
    raise ValueError(f"unknown descriptor method {method!r}")
