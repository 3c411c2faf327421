"""`k2l prepare`: a dataset → WebDataset shards with crops, landmarks and initial keypoints.

Two passes over the images, both parallel over ``data.workers`` processes:

1. decode, check, crop and detect generic keypoints (compact descriptors kept in memory);
   then the outlier removal of the paper (Sec. 4.2) over *all* descriptors at once;
2. decode and crop again, encode JPEG and write the shards (each atomically).

Decoding twice keeps memory bounded by the keypoints, not the images. Bad inputs are
skipped with a counted, named reason, or raise under ``data.strict``.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from k2l_dist.config import Config, DataConfig, KeypointConfig, save_config, validate
from k2l_dist.data import crop as crops
from k2l_dist.data.readers import FACE5_NAMES, LSP_JOINTS, Skip, SourceItem, read_box_file, read_items
from k2l_dist.data.shards import SHARD_PATTERN, TEST_IDS, TRAIN_IDS, Sample, write_index, write_shard
from k2l_dist.utils.images import read_image
from k2l_dist.utils.io import atomic_write_text


class PrepareError(ValueError):
    """Bad input under ``--strict``, or a configuration that cannot be prepared."""


@dataclass
class Detected:
    """Pass-1 result for one kept image (crop coordinates)."""

    id: int
    path: str
    box: tuple[float, float, float]
    orig_size: tuple[int, int]
    keypoints: np.ndarray
    descriptors: np.ndarray
    landmarks: np.ndarray | None
    visible: np.ndarray | None
    video: str = ""  # the video of a frame ("" for a still image)
    frame: int = -1


@dataclass
class Summary:
    written: int = 0
    listed: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)  # reason → first few "path: detail"
    skips: list[Skip] = field(default_factory=list)  # every skip, for callers that name them all
    keypoints_before: int = 0
    keypoints_after: int = 0
    seconds: float = 0.0

    def skip(self, s: Skip) -> None:
        self.skips.append(s)
        self.skipped[s.reason] += 1
        ex = self.examples.setdefault(s.reason, [])
        if len(ex) < 5:
            ex.append(f"{s.path}: {s.detail}" if s.detail else s.path)

    def to_dict(self) -> dict:
        return {
            "written": self.written,
            "listed": self.listed,
            "skipped": dict(self.skipped),
            "skip_examples": self.examples,
            "keypoints_before_outlier_removal": self.keypoints_before,
            "keypoints_after_outlier_removal": self.keypoints_after,
            "seconds": round(self.seconds, 1),
        }

    def text(self) -> str:
        lines = [f"prepared {self.written} of {self.listed} images in {self.seconds:.1f}s"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n:6d}  {reason}  (e.g. {self.examples[reason][0]})")
        if self.keypoints_before:
            kept = self.keypoints_after / max(self.keypoints_before, 1)
            lines.append(f"  keypoints: {self.keypoints_before} detected, {self.keypoints_after} kept "
                         f"after outlier removal ({kept:.0%}), "
                         f"{self.keypoints_after / max(self.written, 1):.1f} per image")
        return "\n".join(lines)


# --------------------------------------------------------------------------- per image


class _Worker:
    """Per-process state: the keypoint detector is built once per worker."""

    data: DataConfig
    detector = None
    min_keypoints: int = 1
    rects: dict | None = None

    @classmethod
    def init(cls, data: DataConfig, keypoints: KeypointConfig | None) -> None:
        cv2.setNumThreads(1)
        cls.data = data
        cls.rects = read_box_file(data.box_file) if data.box == "file" else None
        if keypoints is not None and keypoints.method != "none":
            from k2l_dist.keypoints import KeypointDetector

            if keypoints.method == "superpoint":
                import torch

                torch.set_num_threads(1)  # one process per core already
            cls.detector = KeypointDetector(keypoints)
            cls.min_keypoints = max(1, keypoints.min_keypoints)


def _load(item: SourceItem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | Skip:
    """The original image with its landmarks (synthetic images are rendered here)."""
    data = _Worker.data
    if data.format == "synthetic":
        from k2l_dist.data import synthetic

        out = synthetic.render(item.id, data.synthetic_seed, data.synthetic_render_size or data.size,
                               data.synthetic_object_scale)
        return out.image, out.landmarks.astype(np.float32), out.visible
    if data.format == "synthetic_video":
        from k2l_dist.data import synthetic_video

        out = synthetic_video.render_frame(int(item.video), item.frame, data.synthetic_seed,
                                           data.synthetic_render_size or data.size, data.synthetic_frames,
                                           data.synthetic_object_scale)
        return out.image, out.landmarks.astype(np.float32), out.visible
    path = Path(data.root) / item.path
    if not path.is_file():
        return Skip(item.path, "missing image file", str(path))
    image = read_image(path)
    reason = unreadable_reason(path, image is not None)
    if reason == "truncated image":
        return Skip(item.path, reason, f"{path}: the JPEG ends before its end-of-image marker")
    if reason is not None:
        return Skip(item.path, reason, str(path))
    return image, item.landmarks, item.visible


_STANDALONE_MARKERS = frozenset([0x00, 0x01, 0xD8, *range(0xD0, 0xD8)])  # stuffing, TEM, SOI, RSTn: no length


def jpeg_walk(data: bytes) -> str:
    """How far a JPEG's marker walk gets: ``complete`` (its end-of-image marker, FF D9),
    ``cut`` (into the image data, FF DA, but not to its end) or ``broken`` (not that far).

    Segments are skipped by their length and entropy-coded data up to the next marker, so an
    EOI inside a segment (an EXIF thumbnail) does not count, and bytes after the real EOI
    (a phone's appended video) are allowed.
    """
    if data[:2] != b"\xff\xd8":
        return "broken"
    pos, scanned = 2, False
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return "cut" if scanned else "broken"
        marker = data[pos + 1]
        if marker == 0xD9:
            return "complete"
        scanned |= marker == 0xDA
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        elif pos + 4 > len(data):
            return "cut" if scanned else "broken"
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's marker walk reaches its end-of-image marker (:func:`jpeg_walk`)."""
    return jpeg_walk(data) == "complete"


def _jpeg_state(path: Path) -> str:
    """:func:`jpeg_walk` of a file; ``other`` for a file that is not a JPEG, whatever its name."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"\xff\xd8":
            return "other"
        return jpeg_walk(b"\xff\xd8" + handle.read())


def unreadable_reason(path: Path, decoded: bool) -> str | None:
    """Why an image file cannot be used (None when it can): a JPEG cut short is ``truncated
    image`` whether or not it decodes (it would be grey-filled), other failures ``unreadable image``."""
    state = _jpeg_state(path)
    if state == "cut" or (decoded and state == "broken"):
        return "truncated image"
    return None if decoded else "unreadable image"


def _box(item: SourceItem, width: int, height: int, landmarks: np.ndarray | None):
    data = _Worker.data
    if data.box == "whole":
        return crops.whole_image_box(width, height)
    if data.box == "landmarks":
        return crops.box_around_points(landmarks, data.box_scale)
    rect = (_Worker.rects or {}).get(item.path)
    if rect is None:
        return Skip(item.path, "no box in box file", data.box_file)
    return crops.box_around_rect(*rect, data.box_scale)


def _crop(item: SourceItem):
    """Load, check, crop. Returns (crop, box, (w, h), landmarks_in_crop, visible) or a Skip."""
    loaded = _load(item)
    if isinstance(loaded, Skip):
        return loaded
    image, landmarks, visible = loaded
    height, width = image.shape[:2]
    if landmarks is not None:
        finite = np.isfinite(landmarks).all(1)
        x, y = landmarks[finite, 0], landmarks[finite, 1]
        outside = (x < -0.5) | (x >= width - 0.5) | (y < -0.5) | (y >= height - 0.5)
        if outside.any():
            i = int(np.flatnonzero(finite)[np.argmax(outside)])
            return Skip(item.path, "landmark outside the image",
                        f"landmark {i} at ({landmarks[i, 0]:.1f}, {landmarks[i, 1]:.1f}) in a {width}x{height} image")
    box = _box(item, width, height, landmarks)
    if isinstance(box, Skip):
        return box
    size = _Worker.data.size
    already_cropped = box == (0.0, 0.0, float(size)) and image.shape[:2] == (size, size)
    cropped = image if already_cropped else crops.crop_image(image, box, size)
    lm = None if landmarks is None else crops.to_crop(landmarks.astype(np.float64), box, size).astype(np.float32)
    return cropped, box, (width, height), lm, visible


def _detect(item: SourceItem) -> Detected | Skip:
    out = _crop(item)
    if isinstance(out, Skip):
        return out
    cropped, box, orig_size, landmarks, visible = out
    if _Worker.detector is None:  # keypoints.method=none: images for inference only
        empty = np.zeros((0, 2), np.float32)
        return Detected(item.id, item.path, box, orig_size, empty, np.zeros((0, 0), np.uint8), landmarks, visible,
                        item.video, item.frame)
    region = crops.valid_rects(np.array([box]), np.array([orig_size]), cropped.shape[0])[0]
    keypoints, descriptors = _Worker.detector(cropped, region)
    if len(keypoints) < _Worker.min_keypoints:
        return Skip(item.path, "too few keypoints found", f"{len(keypoints)} keypoints")
    return Detected(item.id, item.path, box, orig_size, keypoints, descriptors, landmarks, visible, item.video,
                    item.frame)


def _encode(item: SourceItem) -> bytes | Skip:
    out = _crop(item)
    if isinstance(out, Skip):
        return out
    ok, buf = cv2.imencode(".jpg", out[0], [cv2.IMWRITE_JPEG_QUALITY, _Worker.data.jpeg_quality])
    if not ok:
        return Skip(item.path, "JPEG encoding failed")
    return buf.tobytes()


def _parallel(fn, items: list, data: DataConfig, keypoints: KeypointConfig | None, desc: str,
              progress: bool = True) -> Iterator:
    """Ordered map over worker processes (in-process when data.workers <= 1)."""
    bar = dict(total=len(items), desc=desc, unit="img", smoothing=0.05, mininterval=1.0, disable=not progress)
    if data.workers <= 1:
        _Worker.init(data, keypoints)
        yield from tqdm(map(fn, items), **bar)
        return
    ctx = mp.get_context("spawn")  # torch/OpenCV threads make fork unsafe
    with ctx.Pool(data.workers, initializer=_Worker.init, initargs=(data, keypoints)) as pool:
        yield from tqdm(pool.imap(fn, items, chunksize=16), **bar)


# --------------------------------------------------------------------------- driver


def _check(data: DataConfig) -> None:
    if data.size < 16:
        raise PrepareError(f"data.size: {data.size} is too small (at least 16 pixels)")
    if data.box not in ("whole", "landmarks", "file"):
        raise PrepareError(f"data.box: unknown box '{data.box}' (whole | landmarks | file)")
    if data.box == "landmarks" and data.format in ("folder", "video"):
        raise PrepareError(f"data.box: 'landmarks' needs annotated landmarks; format '{data.format}' has none")
    if data.box == "file" and not data.box_file:
        raise PrepareError("data.box_file: required when data.box is 'file'")
    if data.samples_per_shard < 1:
        raise PrepareError(f"data.samples_per_shard: must be positive, got {data.samples_per_shard}")
    if data.test_list and data.format not in ("mafl", "aflw"):
        raise PrepareError(f"data.test_list: only formats mafl and aflw read one, not '{data.format}' "
                           f"(hold out listed images with eval.split=file)")
    if data.partition_file and data.format != "mafl":
        raise PrepareError(f"data.partition_file: only format mafl reads one, not '{data.format}'")
    if data.train_list and data.format != "mafl":
        raise PrepareError(f"data.train_list: only format mafl reads one, not '{data.format}'")


def is_prepared(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "index.json").is_file()


def prepare(cfg: Config, out_dir: str | Path, overwrite: bool = False) -> Summary:
    """Write the shards of ``cfg.data`` with ``cfg.keypoints`` into ``out_dir``."""
    data = cfg.data
    out_dir = Path(out_dir)
    validate(cfg)  # the values training would refuse, refused before the work
    _check(data)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"--out {out_dir} is a file, not a folder: give a folder for the shards")
    if is_prepared(out_dir) and not overwrite:
        raise PrepareError(f"{out_dir} already holds a prepared dataset (index.json); pass --overwrite to replace it")
    start = time.time()
    summary = Summary()
    items = _listed_items(data, summary, out_dir)
    detected = _detected(cfg, items, summary)  # pass 1: crop + detect
    _drop_outliers(cfg, detected, summary)
    by_id = {item.id: item for item in items}
    shards, kept = _write_shards(cfg, out_dir, detected, by_id, summary)  # pass 2: encode and write
    summary.written = len(kept)
    summary.seconds = time.time() - start

    manifest = _manifest(cfg, shards, kept, summary)
    manifest.update(_write_protocol(out_dir, [by_id[d.id] for d in kept]))
    write_index(out_dir, manifest, _samples_meta(kept))
    save_config(cfg, out_dir / "config.yaml")
    return summary


def _listed_items(data: DataConfig, summary: Summary, out_dir: Path) -> list[SourceItem]:
    """The dataset's images (``data.limit`` of them at most); unreadable entries counted.
    Frames decoded from video files go to ``out_dir/frames``."""
    items, skips = read_items(data.format, data.root, data.annotations, data.synthetic_count, data.pts_one_based,
                              test_list=data.test_list, train_list=data.train_list, partition=data.partition_file,
                              frame_every=data.frame_every, decode_dir=str(out_dir / "frames"),
                              synthetic_frames=data.synthetic_frames)
    if data.limit > 0:
        items = items[: data.limit]
    summary.listed = len(items) + len(skips)
    if data.strict and skips:
        raise PrepareError(f"{skips[0].path}: {skips[0].reason} ({skips[0].detail})")
    for s in skips:
        summary.skip(s)
    if not items:
        raise PrepareError(f"no images found for format '{data.format}' under '{data.root}'")
    return items


def _detected(cfg: Config, items: list[SourceItem], summary: Summary) -> list[Detected]:
    """Every image cropped and its generic keypoints detected (in ``data.workers`` processes)."""
    data = cfg.data
    detected: list[Detected] = []
    for result in _parallel(_detect, items, data, cfg.keypoints, "keypoints", cfg.progress):
        if isinstance(result, Skip):
            if data.strict:
                raise PrepareError(f"{result.path}: {result.reason}" + (f" ({result.detail})" if result.detail else ""))
            summary.skip(result)
        else:
            detected.append(result)
    if not detected:
        raise PrepareError(f"every image was skipped: {dict(summary.skipped)}")
    return detected


def _drop_outliers(cfg: Config, detected: list[Detected], summary: Summary) -> None:
    """Outlier removal over the whole dataset's descriptors (Sec. 5.1), in place."""
    from k2l_dist.keypoints import outlier_keep_masks

    kcfg = cfg.keypoints
    summary.keypoints_before = sum(len(d.keypoints) for d in detected)
    fraction = kcfg.outlier_fraction if kcfg.method != "none" else 0.0
    masks = outlier_keep_masks([d.descriptors for d in detected], fraction,
                               kcfg.outlier_neighbours, max_reference=kcfg.outlier_reference,
                               seed=cfg.seed, progress=cfg.progress)
    for d, keep in zip(detected, masks):
        d.keypoints, d.descriptors = d.keypoints[keep], d.descriptors[keep]
    summary.keypoints_after = sum(len(d.keypoints) for d in detected)


def _write_shards(cfg: Config, out_dir: Path, detected: list[Detected], by_id: dict[int, SourceItem],
                  summary: Summary) -> tuple[list[dict], list[Detected]]:
    """The crops encoded and written ``data.samples_per_shard`` to a shard; returns the
    shards' entries and the samples written. The old index goes first: a prepare killed
    while replacing a dataset must not leave a folder that looks complete (index.json is
    written last and marks one)."""
    data = cfg.data
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("index.json", "samples.npz", TEST_IDS, TRAIN_IDS):
        (out_dir / name).unlink(missing_ok=True)
    for stale in list(out_dir.glob("shard-*.tar")) + list(out_dir.glob("shard-*.idx")):
        stale.unlink()
    shards: list[dict] = []
    encoded = _parallel(_encode, [by_id[d.id] for d in detected], data, None, "shards", cfg.progress)
    kept: list[Detected] = []
    batch: list[Sample] = []

    def flush() -> None:
        name = SHARD_PATTERN.format(len(shards))
        write_shard(out_dir / name, batch)
        shards.append({"name": name, "count": len(batch), "first_id": batch[0].id, "last_id": batch[-1].id})
        batch.clear()

    for d, jpeg in zip(detected, encoded):
        if isinstance(jpeg, Skip):  # the image changed between the passes
            summary.skip(jpeg)
            continue
        batch.append(Sample(d.id, d.path, jpeg, d.box, d.orig_size, d.keypoints, d.descriptors, d.landmarks, d.visible))
        kept.append(d)
        if len(batch) == data.samples_per_shard:
            flush()
    if batch:
        flush()
    return shards, kept


def _write_protocol(out_dir: Path, kept: list[SourceItem]) -> dict:
    """The dataset's own test (and regressor) images among the kept samples, as id lists
    beside the shards; a format without a protocol writes nothing."""
    test = [item.id for item in kept if item.split == "test"]
    train = [item.id for item in kept if item.split == "train"]
    if not test and not train:
        return {}
    for name, ids in ((TEST_IDS, test), (TRAIN_IDS, train)):
        if ids:
            atomic_write_text(out_dir / name, "".join(f"{i}\n" for i in ids))
    return {"protocol": {"test_images": len(test), "train_images": len(train),
                         "files": [name for name, ids in ((TEST_IDS, test), (TRAIN_IDS, train)) if ids]}}


def _manifest(cfg: Config, shards: list[dict], kept: list[Detected], summary: Summary) -> dict:
    data = cfg.data
    num_landmarks = next((len(d.landmarks) for d in kept if d.landmarks is not None), 0)
    manifest = {
        "format": data.format,
        "root": str(data.root),
        "size": data.size,
        "box": data.box,
        "box_scale": data.box_scale,
        "num_samples": len(kept),
        "num_landmarks": num_landmarks,
        "keypoints": {"method": cfg.keypoints.method, "descriptor_dim": int(kept[0].descriptors.shape[1]),
                      "descriptor_dtype": str(kept[0].descriptors.dtype)},
        "shards": shards,
        "summary": summary.to_dict(),
    }
    if data.format in ("synthetic", "synthetic_video"):
        from k2l_dist.data import synthetic

        manifest.update(landmark_names=list(synthetic.LANDMARK_NAMES),
                        flip_permutation=list(synthetic.FLIP_PERMUTATION), norm_indices=list(synthetic.EYE_INDICES))
    elif data.format in ("mtfl", "aflw", "mafl"):
        manifest.update(landmark_names=list(FACE5_NAMES), norm_indices=[0, 1])  # interocular: the eye centres
    elif data.format in ("lsp", "lspet"):
        # PCK's torso: left shoulder to right hip
        manifest.update(landmark_names=list(LSP_JOINTS), torso_indices=[LSP_JOINTS.index("left_shoulder"),
                                                                        LSP_JOINTS.index("right_hip")])
    elif data.format in ("penn_action", "bbcpose", "human36m"):
        from k2l_dist.data import video

        # the paper's body protocols normalise by the shoulder distance
        manifest.update(landmark_names=list(video.JOINT_NAMES[data.format]),
                        norm_indices=list(video.shoulder_indices(data.format)))
    return manifest


def _samples_meta(kept: list[Detected]) -> dict[str, np.ndarray]:
    counts = np.array([len(d.keypoints) for d in kept], np.int64)
    meta = {
        "ids": np.array([d.id for d in kept], np.int64),
        "paths": np.array([d.path for d in kept], dtype=str),
        "boxes": np.array([d.box for d in kept], np.float64).reshape(-1, 3),
        "orig_sizes": np.array([d.orig_size for d in kept], np.int64).reshape(-1, 2),
        "kp_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "keypoints": np.concatenate([d.keypoints for d in kept]).astype(np.float32).reshape(-1, 2),
    }
    if any(d.video for d in kept):  # video formats: splits keep a video's frames together
        meta["videos"] = np.array([d.video for d in kept], dtype=str)
        meta["frames"] = np.array([d.frame for d in kept], np.int64)
    if kept[0].landmarks is not None:
        meta["landmarks"] = np.stack([d.landmarks for d in kept]).astype(np.float32)
        meta["visible"] = np.stack([d.visible for d in kept]).astype(bool)
    return meta
