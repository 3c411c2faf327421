"""A trained landmark detector for Python callers: images in, K landmarks out, both in
original pixels.

    from k2l_dist import load_detector
    detector = load_detector("runs/mtfl_cpu/model.pt")
    points = detector.predict(image)            # (K, 2) x, y in the image's pixels
    points, confidence = detector.predict([a, b], with_confidence=True)  # (2, K, 2), (2, K)

Crop policy (the same as ``k2l detect --images``): each image is cropped to the square
around the whole image, its short side padded by repeating the border pixels, and resized
to the model's input size. Works best on images framed as the training crops were (for
the face configs: a face filling about half the square).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from k2l_dist.config import Config, run_config
from k2l_dist.data.crop import crop_image, whole_image_box
from k2l_dist.eval.names import NAMES_FILE, LandmarkNames, load_names
from k2l_dist.models import STRIDE, LandmarkNet
from k2l_dist.models.points import heatmap_peaks, to_image_coords
from k2l_dist.utils.checkpoint import load_checkpoint, model_file
from k2l_dist.utils.devices import resolve_device
from k2l_dist.utils.images import read_image


@torch.no_grad()
def landmarks_in_views(psi: torch.nn.Module, views: torch.Tensor,
                       perm: torch.Tensor | np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ψ's K sub-pixel peaks in view pixels ``(B,K,2)`` and their confidence ``(B,K)``; with
    ``perm``, flip-test averaging: the mirrored image's heatmaps, mirrored back and
    channel-permuted, are averaged in."""
    heat = psi(views).float()
    if perm is not None:
        mirrored = torch.flip(psi(torch.flip(views, dims=[-1])).float(), dims=[-1])
        heat = (heat + mirrored[:, torch.as_tensor(perm, device=heat.device)]) / 2
    peaks, conf = heatmap_peaks(heat)
    return to_image_coords(peaks, STRIDE), conf


class DetectorGraph(nn.Module):
    """Ψ between model-input crops and landmarks in original pixels, as one traceable graph
    (what :class:`Detector` runs and ``k2l export`` writes).

    ``forward(crops, boxes)``: ``crops`` ``(B, S, S, 3)`` uint8 RGB, each the square
    ``box`` of its image resampled to ``S = crop_size`` pixels; ``boxes`` ``(B, 3)`` float32
    ``x0, y0, side`` in the image's pixels (edge coordinates, see ``k2l_dist.data.crop``).
    Returns landmarks ``(B, K, 2)`` x, y in the image's pixels (0-based pixel centres) and
    their heatmap peak values ``(B, K)``.
    """

    def __init__(self, psi: LandmarkNet, flip_permutation: np.ndarray | None, crop_size: int,
                 view_size: int) -> None:
        super().__init__()
        self.psi = psi.eval()
        self.crop_size, self.view_size = int(crop_size), int(view_size)
        self.flip_test = flip_permutation is not None
        perm = np.arange(psi.num_landmarks) if flip_permutation is None else np.asarray(flip_permutation)
        self.register_buffer("perm", torch.as_tensor(perm, dtype=torch.long), persistent=False)

    def forward(self, crops: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = crops.permute(0, 3, 1, 2).float() / 255.0
        if self.view_size != self.crop_size:  # as the loader does: one bilinear resample of the crop
            views = nn.functional.interpolate(views, size=(self.view_size, self.view_size), mode="bilinear",
                                              align_corners=False, antialias=False)
        pts, conf = landmarks_in_views(self.psi, views, self.perm if self.flip_test else None)
        # view → crop → image in one step: the view is the box at view_size pixels
        boxes = boxes.to(pts.dtype).unsqueeze(1)
        image_pts = (pts + 0.5) * (boxes[..., 2:3] / self.view_size) - 0.5 + boxes[..., :2]
        return image_pts, conf


def _rgb(image: Any) -> np.ndarray:
    """An HWC RGB uint8 array from what :meth:`Detector.predict` accepts (see there)."""
    if isinstance(image, (str, Path)):
        rgb = read_rgb(image)
        if rgb is None:
            raise ValueError(f"{image}: not a readable image file")
        return rgb
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.dim() == 3 and shape[0] not in (1, 3) and shape[2] in (1, 3, 4):
            raise ValueError(f"a torch image is CHW, got shape {shape} (HWC?): pass image.permute(2, 0, 1), "
                             f"or the numpy array")
        if image.dim() not in (2, 3):
            raise ValueError(f"a torch image is CHW (or HW), got shape {shape}")
        image = image.detach().cpu()
        image = (image.permute(1, 2, 0) if image.dim() == 3 else image).numpy()
    elif not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image.convert("RGB"))  # PIL
        except AttributeError:
            raise TypeError(f"cannot read an image from {type(image).__name__}: give a path, numpy, PIL or "
                            f"torch") from None
    shape = image.shape
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an RGB (HWC) or gray (HW) image, got shape {shape}")
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]  # gray; RGBA's alpha
    return np.ascontiguousarray(_eight_bits(image))


def _eight_bits(image: np.ndarray) -> np.ndarray:
    """uint8 as every training image was: floats in [0, 1] rounded; anything else refused or
    warned about with the fix."""
    if image.dtype == np.uint8:
        return image
    if image.dtype in (np.uint16, np.int32, np.uint32, np.int64):
        raise ValueError(f"a {image.dtype} image (16 bits?): give 8 bits, e.g. (image >> 8).astype(np.uint8) for "
                         f"16-bit data, or floats in [0, 1]")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"an image of dtype {image.dtype}: give uint8, or floats in [0, 1]")
    top = float(np.nanmax(image)) if image.size else 0.0
    if top > 1.0 + 1e-6:
        warnings.warn(f"float image with values up to {top:g}: read as 0..255 (pass uint8, or floats in [0, 1], "
                      f"to say so)", stacklevel=2)
        image = image / 255.0
    return np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


class Detector:
    """Ψ with its pre- and post-processing. ``device``: where Ψ runs; ``flip_test``:
    average with the mirrored image (default: as the run was configured)."""

    def __init__(self, psi: LandmarkNet, cfg: Config, flip_permutation: np.ndarray, device: str | torch.device = "auto",
                 flip_test: bool | None = None) -> None:
        self.device = resolve_device(device)
        self.psi = psi.to(self.device).eval()
        self.cfg = cfg
        self.flip_permutation = np.asarray(flip_permutation, np.int64)
        self._flip_test = bool(cfg.stage2.flip_test if flip_test is None else flip_test)
        self.crop_size = int(cfg.data.size)
        self.view_size = int(cfg.augment.size or cfg.data.size)
        self.graph = DetectorGraph(self.psi, self.flip_permutation if self._flip_test else None, self.crop_size,
                                   self.view_size).to(self.device)
        self.names: LandmarkNames | None = None  # set: predict returns the annotated landmarks instead

    @property
    def landmark_names(self) -> list[str]:
        """What each returned point is: the annotated names when named, else ``landmark_k``."""
        if self.names is not None:
            return list(self.names.names)
        return [f"landmark_{k}" for k in range(self.num_landmarks)]

    def name_landmarks(self, points: np.ndarray, conf: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Discovered landmarks ``(B, K, 2)`` in the pixels of images whose crops are ``boxes``
        → the named ones ``(B, L, 2)`` there, each with the confidence of the discovered
        landmark weighing most in it. The names' map works in crop pixels."""
        xy, side = boxes[:, None, :2].astype(np.float64), boxes[:, None, 2:3].astype(np.float64)
        scale = self.crop_size / side
        named = self.names.apply((points + 0.5 - xy) * scale - 0.5)
        return (named + 0.5) / scale - 0.5 + xy, conf[:, self.names.sources]

    @property
    def flip_test(self) -> bool:
        """Whether the mirrored image's heatmaps are averaged in (fixed when the graph is built:
        pass ``flip_test`` to :func:`load_detector` to change it)."""
        return self._flip_test

    @property
    def num_landmarks(self) -> int:
        return len(self.flip_permutation)

    def crop(self, image: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The model's input crop (HWC RGB, crop_size²) and its box in the image's pixels."""
        rgb = _rgb(image)
        box = whole_image_box(rgb.shape[1], rgb.shape[0])
        return crop_image(rgb, box, self.crop_size), box

    def crop_batch(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(B, S, S, 3)`` uint8 crops and their ``(B, 3)`` float32 boxes: the inputs of
        :class:`DetectorGraph` and of an exported detector."""
        crops, boxes = zip(*(self.crop(image) for image in images))
        return np.stack(crops), np.asarray(boxes, np.float32)

    def predict(self, images: Any, *, batch_size: int = 32, with_confidence: bool = False):
        """Landmarks in original pixels: (K, 2) for one image, (N, K, 2) for a list (x, y;
        0-based pixel centres). ``with_confidence``: also the heatmap peaks' values.

        An image is a file path, a numpy array (HWC **RGB** or HW gray; uint8, or floats in
        [0, 1]), a PIL image or a torch CHW tensor (uint8 or [0, 1]); a batch is a list of
        them or an NCHW tensor. OpenCV reads BGR: pass ``cv2.cvtColor(img, cv2.COLOR_BGR2RGB)``.
        Floats above 1 are read as 0..255 with a warning; 16-bit images are refused.
        """
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.dim() == 4)
        items: Sequence[Any] = [images] if single else list(images)
        points, conf = [], []
        for start in range(0, len(items), batch_size):
            p, c = self.predict_crops(*self.crop_batch(items[start:start + batch_size]))
            points.append(p)
            conf.append(c)
        pts = np.concatenate(points) if points else np.zeros((0, self.num_landmarks, 2))
        cs = np.concatenate(conf) if conf else np.zeros((0, self.num_landmarks))
        if single:
            pts, cs = pts[0], cs[0]
        return (pts, cs) if with_confidence else pts

    @torch.no_grad()
    def predict_crops(self, crops: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image-pixel landmarks of ``(B, S, S, 3)`` uint8 crops of the ``(B, 3)`` boxes."""
        pts, conf = self.graph(torch.from_numpy(np.ascontiguousarray(crops)).to(self.device),
                               torch.from_numpy(np.asarray(boxes, np.float32)).to(self.device))
        pts, conf = pts.cpu().numpy().astype(np.float64), conf.cpu().numpy()
        if self.names is not None:
            pts, conf = self.name_landmarks(pts, conf, np.asarray(boxes, np.float64))
        return pts, conf


def load_detector(path: str | Path, device: str | torch.device = "auto", flip_test: bool | None = None,
                  config: str | Path | None = None, overrides: Sequence[str] = (), named: bool = False) -> Detector:
    """The Stage-2 detector of a run: the run folder, its ``model.pt`` or its ``checkpoint.pt``;
    ``device`` auto = the GPU when there is one. The run's saved config ← ``config`` (a YAML
    file) ← ``overrides`` (``key=value``) decide the flip test and the input sizes.
    ``named``: ``predict`` returns the annotated landmarks (``detector.landmark_names``) through
    the run's ``names.json`` (written by evaluation, or ``k2l fit-names``)."""
    path = model_file(path)
    ck = load_checkpoint(path)
    if "psi" not in ck:
        raise ValueError(f"{path}: holds no Stage-2 model (expected a run's model.pt)")
    cfg = run_config(ck["config"], config, tuple(overrides))
    psi = LandmarkNet(cfg.model, int(ck["num_landmarks"]))
    psi.load_state_dict(ck["psi"])
    detector = Detector(psi, cfg, ck["flip_permutation"].numpy(), device=device, flip_test=flip_test)
    if named:
        detector.names = _checked_names(load_names(path.parent), detector, path.parent)
    return detector


def _checked_names(names: LandmarkNames, detector: Detector, run_dir: Path) -> LandmarkNames:
    """``names`` when they fit this detector's landmarks and crops, else a one-line error."""
    inputs = names.map.W.shape[0] // 2
    if inputs != detector.num_landmarks or names.crop_size != detector.crop_size:
        raise ValueError(f"{run_dir / NAMES_FILE} maps {inputs} landmarks of {names.crop_size}-px crops, the model "
                         f"has {detector.num_landmarks} at {detector.crop_size} px: fit it again with "
                         f"k2l fit-names {run_dir} --data ANNOTATED_SHARDS")
    return names


def read_rgb(path: str | Path) -> np.ndarray | None:
    """An image file as HWC RGB uint8 (None when OpenCV cannot read it)."""
    image = read_image(path)
    return None if image is None else image[:, :, ::-1].copy()
