"""`k2l detect`: landmarks in original pixels for an image, a folder of images or prepared shards."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from k2l_dist.augment import build_loader
from k2l_dist.data.crop import to_original
from k2l_dist.data.prepare import is_truncated_jpeg
from k2l_dist.data.readers import Skip, read_folder
from k2l_dist.data.shards import load_manifest, load_samples_meta
from k2l_dist.eval.detector import Detector, load_detector, read_rgb
from k2l_dist.eval.evaluate import predict_landmarks
from k2l_dist.utils.io import atomic_open

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DetectResult:
    written: int  # JSON lines written
    skipped: list[Skip]  # every input image that got no line, with the reason


def _warn_size(shard_dir: Path, prepared: int, trained: int) -> None:
    if prepared != trained:  # the model still runs, but sees objects at another scale than in training
        log.warning("%s: shards hold %dx%d crops but the model was trained on data.size=%d; landmarks may be off "
                    "(prepare again with --size %d)", shard_dir, prepared, prepared, trained, trained)


def _unpredicted(meta: dict, ids: np.ndarray) -> list[Skip]:
    """Samples the loader left out as bad (its own warning names the shard and the problem)."""
    missing = ~np.isin(meta["ids"], ids)
    return [Skip(str(path), "left out by the shard check") for path in meta["paths"][missing]]


Row = tuple[str, np.ndarray, np.ndarray]  # image path (relative to the root), landmarks, confidence


def _image_rows(detector: Detector, root: Path, paths: list[str], skipped: list[Skip],
                batch_size: int = 32) -> Iterator[Row]:
    """Images ``root / path``, in memory: read, crop, Ψ."""
    for start in range(0, len(paths), batch_size):
        names, pictures = [], []
        for name in paths[start:start + batch_size]:
            picture = read_rgb(root / name)
            if picture is None:
                skipped.append(Skip(name, "unreadable image"))
            elif is_truncated_jpeg(root / name):
                skipped.append(Skip(name, "truncated image"))
            else:
                names.append(name)
                pictures.append(picture)
        if pictures:
            points, conf = detector.predict(pictures, batch_size=batch_size, with_confidence=True)
            yield from zip(names, points, conf)


def _shard_rows(detector: Detector, shard_dir: Path, skipped: list[Skip], cache: Path) -> Iterator[Row]:
    """Every sample of prepared shards, through the extraction loader (no augmentation)."""
    manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
    _warn_size(shard_dir, manifest["size"], detector.cfg.data.size)
    aug = dataclasses.replace(detector.cfg.augment, enabled=False)
    loader = build_loader(shard_dir, aug, device=detector.device, views=1, shuffle=False, padded="drop",
                          cache_dir=cache)
    ids, points, conf = predict_landmarks(detector.psi, loader, detector.flip_permutation if detector.flip_test
                                          else None)
    skipped += _unpredicted(meta, ids)
    for k, row in enumerate(np.searchsorted(meta["ids"], ids)):
        yield str(meta["paths"][row]), to_original(points[k], tuple(meta["boxes"][row]), manifest["size"]), conf[k]


def detect(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None,
           images: str | Path | None = None, draw: str | Path | None = None, min_confidence: float = 0.0,
           device: str = "auto", flip_test: bool | None = None) -> DetectResult:
    """Write one JSON line per image: ``{"image": path, "landmarks": [[x, y] | null, ...]}``.

    ``images``: an image file or a folder (every image under it, in memory, cropped as
    :class:`~k2l_dist.eval.detector.Detector` does); ``data``: prepared shards. Images
    that get no line are logged, one warning each, and returned in ``skipped``.
    """
    if (data is None) == (images is None):
        raise ValueError("give exactly one of --data SHARDS or --images DIR")
    if images is not None and not Path(images).exists():
        raise ValueError(f"--images {images}: no such file or folder")
    if draw is not None and images is not None and Path(draw).resolve() == Path(images).resolve():
        raise ValueError(f"--draw {draw} is the --images folder: drawings would replace the originals; "
                         f"pick another folder")
    detector = load_detector(checkpoint, device, flip_test)
    skipped: list[Skip] = []
    written = 0
    with tempfile.TemporaryDirectory(prefix="k2l-detect-") as tmp:
        if images is not None:
            images = Path(images)
            root = images.parent if images.is_file() else images
            paths = [images.name] if images.is_file() else [item.path for item in read_folder(images)[0]]
            rows = _image_rows(detector, root, paths, skipped)
        else:
            root = Path(load_manifest(Path(data)).get("root", ""))
            rows = _shard_rows(detector, Path(data), skipped, Path(tmp) / "check")
        with atomic_open(out, "wb") as handle:
            for path, orig, conf in rows:
                lms = [None if c < min_confidence else [round(float(x), 2), round(float(y), 2)]
                       for (x, y), c in zip(orig, conf)]
                handle.write((json.dumps({"image": path, "landmarks": lms}) + "\n").encode())
                written += 1
                if draw is not None:
                    _draw(root / path, orig, conf >= min_confidence, Path(draw) / path)
    for s in skipped:
        log.warning("%s: skipped, %s", root / s.path, s.reason)
    return DetectResult(written, skipped)


def _draw(src: Path, points: np.ndarray, keep: np.ndarray, dst: Path) -> None:
    from k2l_dist.eval.plots import draw_landmarks

    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        return
    if dst.with_suffix(".png").resolve() == src.resolve():  # never overwrite an input image
        raise ValueError(f"--draw would overwrite the input image {src}; pick another folder")
    pts = np.where(keep[:, None], points, np.nan)
    radius = max(2, round(max(image.shape[:2]) / 100))
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst.with_suffix(".png")), draw_landmarks(image, pts, radius=radius))
