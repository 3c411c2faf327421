"""`k2l detect`: landmarks in original pixels for an image, a folder of images, a video or
prepared shards."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from k2l_dist.augment import build_loader
from k2l_dist.data.crop import to_original
from k2l_dist.data.readers import IMAGE_EXTENSIONS, Skip, read_folder
from k2l_dist.data.shards import load_manifest, load_samples_meta
from k2l_dist.eval.detector import Detector, load_detector, read_rgb
from k2l_dist.eval.evaluate import predict_landmarks
from k2l_dist.prepare import unreadable_reason
from k2l_dist.utils.images import read_image, write_image
from k2l_dist.utils.io import atomic_open

# OpenCV writers by suffix of --draw for a video (both ship with opencv-python-headless)
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v"}

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
            reason = unreadable_reason(root / name, picture is not None)
            if reason is not None:
                skipped.append(Skip(name, reason))
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
    if detector.names is not None:  # the names' map works in these crop pixels
        points, conf = detector.names.apply(points), conf[:, detector.names.sources]
    skipped += _unpredicted(meta, ids)
    for k, row in enumerate(np.searchsorted(meta["ids"], ids)):
        yield str(meta["paths"][row]), to_original(points[k], tuple(meta["boxes"][row]), manifest["size"]), conf[k]


def _video_frames(path: Path) -> tuple[Iterator[np.ndarray], float, int]:
    """A video's frames (BGR), its frame rate and its frame count (0 when unknown)."""
    reader = cv2.VideoCapture(str(path))
    if not reader.isOpened():
        raise ValueError(f"--video {path}: OpenCV cannot open it as a video")
    fps = reader.get(cv2.CAP_PROP_FPS) or 25.0
    count = max(int(reader.get(cv2.CAP_PROP_FRAME_COUNT)), 0)

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = reader.read()
                if not ok:
                    return
                yield frame
        finally:
            reader.release()

    return frames(), fps, count


def _batches(items: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _video_drawing(draw: Path | None, fps: float) -> Iterator[Callable[[np.ndarray], None]]:
    """``write(frame)`` into ``draw`` (codec by suffix); the file takes its name only when
    every frame is written. Without ``draw``, ``write`` does nothing."""
    if draw is None:
        yield lambda frame: None
        return
    tmp = draw.with_name(f".{draw.stem}.tmp{draw.suffix}")
    writer: list[cv2.VideoWriter] = []

    def write(frame: np.ndarray) -> None:
        if not writer:  # the first frame gives the size
            draw.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[draw.suffix.lower()])
            writer.append(cv2.VideoWriter(str(tmp), fourcc, fps, (frame.shape[1], frame.shape[0])))
            if not writer[0].isOpened():
                raise ValueError(f"--draw {draw}: OpenCV cannot write this video format here")
        writer[0].write(frame)

    try:
        yield write
    except BaseException:
        if writer:
            writer[0].release()
        tmp.unlink(missing_ok=True)
        raise
    if writer:
        writer[0].release()
        tmp.replace(draw)


def _detect_video(detector: Detector, video: Path, out: str | Path, draw: str | Path | None,
                  min_confidence: float, batch_size: int = 16) -> int:
    """One JSON line per frame, ``{"frame": i, "time_s": t, "landmarks": [...]}``; with
    ``draw``, the video again with the landmarks drawn."""
    if draw is not None:
        draw = Path(draw)
        if draw.suffix.lower() not in VIDEO_CODECS:
            raise ValueError(f"--draw {draw}: for a video, give a {' or '.join(VIDEO_CODECS)} file")
        if draw.resolve() == video.resolve():
            raise ValueError(f"--draw {draw} is the input video; pick another file")
    frames, fps, count = _video_frames(video)
    names = detector.landmark_names if detector.names is not None else None
    written = 0
    with (atomic_open(out, "wb") as handle, _video_drawing(draw, fps) as write_frame,
          tqdm(total=count or None, unit="frame", desc="detect", disable=None) as bar):
        for batch in _batches(frames, batch_size):
            rgb = [frame[:, :, ::-1] for frame in batch]
            points, conf = detector.predict(rgb, batch_size=batch_size, with_confidence=True)
            for frame, pts, c in zip(batch, points, conf):
                landmarks = _json_points(pts, c, min_confidence, names)
                row = {"frame": written, "time_s": round(written / fps, 4), "landmarks": landmarks}
                handle.write((json.dumps(row) + "\n").encode())
                if draw is not None:
                    write_frame(_drawn(frame, pts, c >= min_confidence))
                written += 1
            bar.update(len(batch))
    if written == 0:
        log.warning("%s: no frame could be read", video)
    return written


def _json_points(points: np.ndarray, conf: np.ndarray, min_confidence: float,
                 names: list[str] | None = None) -> list | dict:
    """``[x, y]`` rounded to 0.01 px per landmark, ``None`` below ``min_confidence``; with
    ``names``, ``{name: [x, y] | None}``."""
    xy = [None if c < min_confidence else [round(float(x), 2), round(float(y), 2)] for (x, y), c in zip(points, conf)]
    return dict(zip(names, xy)) if names is not None else xy


def detect(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None,
           images: str | Path | None = None, video: str | Path | None = None, draw: str | Path | None = None,
           min_confidence: float = 0.0, device: str = "auto", flip_test: bool | None = None,
           config: str | Path | None = None, overrides: tuple[str, ...] = (), named: bool = False) -> DetectResult:
    """Write one JSON line per image: ``{"image": path, "landmarks": [[x, y] | null, ...]}``
    (per frame for a video: ``{"frame": i, "time_s": t, "landmarks": ...}``).

    ``images``: an image file or a folder (every image under it, in memory, cropped as
    :class:`~k2l_dist.eval.detector.Detector` does); ``video``: a video file OpenCV reads;
    ``data``: prepared shards. Images that get no line are logged, one warning each, and
    returned in ``skipped``. The run's config ← ``config`` ← ``overrides`` (e.g.
    ``stage2.flip_test=false``). ``named``: the annotated landmarks through the run's
    ``names.json``, as ``{"left_eye": [x, y] | null, …}``.
    """
    if sum(x is not None for x in (data, images, video)) != 1:
        raise ValueError("give exactly one of --data SHARDS, --images FILE_OR_DIR or --video FILE")
    for flag, value in (("--images", images), ("--video", video)):
        if value is not None and not Path(value).exists():
            raise ValueError(f"{flag} {value}: no such file or folder")
    if draw is not None and images is not None and Path(draw).resolve() == Path(images).resolve():
        raise ValueError(f"--draw {draw} is the --images folder: drawings would replace the originals; "
                         f"pick another folder")
    if Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder; give the file for the JSON lines, e.g. "
                         f"{Path(out) / 'landmarks.jsonl'}")
    detector = load_detector(checkpoint, device, flip_test, config=config, overrides=overrides, named=named)
    point_names = detector.landmark_names if named else None
    if video is not None:
        return DetectResult(_detect_video(detector, Path(video), out, draw, min_confidence), [])
    skipped: list[Skip] = []
    written = 0
    with tempfile.TemporaryDirectory(prefix="k2l-detect-") as tmp:
        if images is not None:
            images = Path(images)
            root = images.parent if images.is_file() else images
            paths = [images.name] if images.is_file() else [item.path for item in read_folder(images)[0]]
            if not paths:
                raise ValueError(f"--images {images}: no images found (files ending in "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
            rows = _image_rows(detector, root, paths, skipped)
        else:
            root = Path(load_manifest(Path(data)).get("root", ""))
            rows = _shard_rows(detector, Path(data), skipped, Path(tmp) / "check")
        names = drawing_names(paths) if images is not None else {}
        with atomic_open(out, "wb") as handle:
            for path, orig, conf in rows:
                row = {"image": path, "landmarks": _json_points(orig, conf, min_confidence, point_names)}
                handle.write((json.dumps(row) + "\n").encode())
                written += 1
                if draw is not None:
                    name = names.get(path) or Path(path).with_suffix(".png").as_posix()
                    _draw(root / path, orig, conf >= min_confidence, Path(draw) / name)
    for s in skipped:
        log.warning("%s: skipped, %s", root / s.path, s.reason)
    return DetectResult(written, skipped)


def fit_names_on_shards(checkpoint: str | Path, data: str | Path, device: str = "auto",
                        config: str | Path | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """``k2l fit-names``: the map from the run's K landmarks to the landmarks annotated in
    ``data`` (shards prepared at the model's crop size), fitted on every annotated sample and
    saved as the run's ``names.json``; returns its path."""
    from k2l_dist.eval.names import fit_names, save_names
    from k2l_dist.utils.checkpoint import model_file

    shard_dir = Path(data)
    detector = load_detector(checkpoint, device, config=config, overrides=overrides)
    manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
    if "landmarks" not in meta:
        raise ValueError(f"--data {shard_dir}: no annotated landmarks to name the model's landmarks after")
    if manifest["size"] != detector.crop_size:
        raise ValueError(f"--data {shard_dir}: {manifest['size']}-px crops, the model's are {detector.crop_size} px: "
                         f"prepare the annotated images with --size {detector.crop_size}")
    with tempfile.TemporaryDirectory(prefix="k2l-names-") as tmp:
        aug = dataclasses.replace(detector.cfg.augment, enabled=False)
        loader = build_loader(shard_dir, aug, device=detector.device, views=1, shuffle=False, padded="drop",
                              cache_dir=Path(tmp))
        ids, points, _ = predict_landmarks(detector.psi, loader, detector.flip_permutation if detector.flip_test
                                           else None)
    annotated = meta["landmarks"].astype(np.float64)[np.searchsorted(meta["ids"], ids)]
    names = manifest.get("landmark_names") or [f"lm{i}" for i in range(annotated.shape[1])]
    fitted = fit_names(points, annotated, list(names), detector.crop_size, detector.cfg.eval.ridge_alpha,
                       detector.cfg.eval.center)
    return save_names(fitted, model_file(checkpoint).parent)


def _drawn(image_bgr: np.ndarray, points: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The image with its kept landmarks drawn, dots sized to the image."""
    from k2l_dist.eval.plots import draw_landmarks

    radius = max(2, round(max(image_bgr.shape[:2]) / 100))
    return draw_landmarks(image_bgr, np.where(keep[:, None], points, np.nan), radius=radius)


def drawing_names(paths: list[str]) -> dict[str, str]:
    """Where each input's drawing goes, relative to the --draw folder: its name with ``.png``
    for its suffix (``a.jpg`` → ``a.png``), or, when two inputs would share that name
    (``a.jpg`` and ``a.png``), its whole name with ``.png`` added (``a.jpg.png``)."""
    plain = {p: Path(p).with_suffix(".png").as_posix() for p in paths}
    taken = collections.Counter(plain.values())
    return {p: name if taken[name] == 1 or p == name else f"{p}.png" for p, name in plain.items()}


def _draw(src: Path, points: np.ndarray, keep: np.ndarray, dst: Path) -> None:
    image = read_image(src)
    if image is None:
        return
    if dst.resolve() == src.resolve():  # never overwrite an input image
        raise ValueError(f"--draw would overwrite the input image {src}; pick another folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_image(dst, _drawn(image, points, keep))
