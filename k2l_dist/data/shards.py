"""The on-disk dataset: WebDataset tar shards plus an index, written atomically.

A prepared dataset is a folder::

    index.json              manifest: counts, shard names, image size, keypoint method,
                            landmark names, the prepare summary (written last)
    samples.npz             per-sample arrays for fast lookup without opening tars
    shard-000000.tar        WebDataset shard (samples in id order)
    shard-000000.idx        its DALI index (``wds2idx`` format v1.2), so readers need no scan
    config.yaml             the resolved config that produced it
    test_ids.txt            formats with their own test list (mafl, aflw): the held-out
                            sample ids, one per line (eval.split=protocol)
    train_ids.txt           the same formats: the ids their protocol fits regressors on

Each sample in a shard has these members, all named ``{id:09d}.<ext>``:

    jpg        the crop, ``size``×``size``, JPEG
    id         the stable integer id, 8 bytes little-endian int64 (DALI reads it as INT64)
    json       {"id", "path", "box", "orig_size", "landmarks", "visible"}
    kpts.npy   float32 (N, 2): initial generic keypoints, crop pixels (x, y)
    desc.npy   (N, D): their descriptors (uint8 for ORB/SIFT, float32 for SuperPoint)

Coordinates everywhere follow the pixel-centre convention: pixel (i, j) has centre
(x=j, y=i). ``box`` = [x0, y0, side] in original pixels, where the crop covers the
continuous square [x0, x0+side) × [y0, y0+side) in pixel-edge coordinates (see
:mod:`k2l_dist.data.crop`). ``.npy`` members are read with ``allow_pickle=False``: a
shard is never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from k2l_dist.utils.io import atomic_open, atomic_write_bytes, atomic_write_text

INDEX_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
TEST_IDS = "test_ids.txt"
TRAIN_IDS = "train_ids.txt"
KEY_FORMAT = "{:09d}"


class ShardError(ValueError):
    """A missing, truncated or malformed shard; the message names the file."""


@dataclass
class Sample:
    """One prepared image and what was measured on it (coordinates in crop pixels)."""

    id: int
    path: str  # relative to the dataset root, exactly as the annotation names it
    image_jpeg: bytes
    box: tuple[float, float, float]  # x0, y0, side in original pixels
    orig_size: tuple[int, int]  # width, height of the original image
    keypoints: np.ndarray  # (N, 2) float32
    descriptors: np.ndarray  # (N, D)
    landmarks: np.ndarray | None = None  # (K, 2) float32, NaN rows where missing
    visible: np.ndarray | None = None  # (K,) bool

    def image(self) -> np.ndarray:
        """Decode the crop to an (H, W, 3) uint8 BGR array."""
        import cv2

        image = cv2.imdecode(np.frombuffer(self.image_jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ShardError(f"sample {self.id} ({self.path}): image does not decode")
        return image


# --------------------------------------------------------------------------- encoding


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a bad member
        raise ShardError(f"{where}: not a valid .npy member ({err})") from None


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """The members (extension → bytes) of one sample."""
    meta: dict[str, Any] = {
        "id": int(sample.id),
        "path": sample.path,
        "box": [float(v) for v in sample.box],
        "orig_size": [int(v) for v in sample.orig_size],
        "landmarks": None,
        "visible": None,
    }
    if sample.landmarks is not None:
        meta["landmarks"] = [
            None if not np.all(np.isfinite(p)) else [float(p[0]), float(p[1])] for p in sample.landmarks
        ]
        vis = sample.visible if sample.visible is not None else np.isfinite(sample.landmarks).all(1)
        meta["visible"] = [bool(v) for v in vis]
    return {
        "jpg": sample.image_jpeg,
        "id": np.array([sample.id], "<i8").tobytes(),
        "json": json.dumps(meta).encode(),
        "kpts.npy": _npy_bytes(sample.keypoints.astype(np.float32).reshape(-1, 2)),
        "desc.npy": _npy_bytes(sample.descriptors),
    }


def decode_sample(members: dict[str, bytes], where: str) -> Sample:
    """Inverse of :func:`encode_sample`; ``where`` names the shard/key in errors."""
    missing = [ext for ext in ("jpg", "json", "kpts.npy", "desc.npy") if ext not in members]
    if missing:
        raise ShardError(f"{where}: missing member(s) {', '.join(missing)}")
    try:
        meta = json.loads(members["json"])
    except ValueError as err:
        raise ShardError(f"{where}: json member does not parse ({err})") from None
    landmarks = visible = None
    if meta.get("landmarks") is not None:
        landmarks = np.array(
            [[np.nan, np.nan] if p is None else p for p in meta["landmarks"]], np.float32
        ).reshape(-1, 2)
        visible = np.array(meta["visible"], bool)
    return Sample(
        id=int(meta["id"]),
        path=meta["path"],
        image_jpeg=members["jpg"],
        box=tuple(meta["box"]),
        orig_size=tuple(meta["orig_size"]),
        keypoints=_npy_load(members["kpts.npy"], f"{where}.kpts.npy"),
        descriptors=_npy_load(members["desc.npy"], f"{where}.desc.npy"),
        landmarks=landmarks,
        visible=visible,
    )


# --------------------------------------------------------------------------- writing


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000000012.kpts.npy' → ('dir/000000012', 'kpts.npy'), as WebDataset and DALI split."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def dali_index_text(tar_path: str | Path) -> str:
    """The DALI webdataset index (format v1.2) of a finished tar: one line per sample,
    ``ext data_offset size name`` for each of its members."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, ext = _split_name(member.name)
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if base != last:
                samples.append([entry])
                last = base
            else:
                samples[-1].append(entry)
    lines = [f"v1.2 {len(samples)}"] + [" ".join(s) for s in samples]
    return "\n".join(lines) + "\n"


def write_shard(path: str | Path, samples: list[Sample]) -> None:
    """Write one tar shard and its DALI index, each atomically (temp name, then rename).

    The index is written after the tar: a shard without an index is incomplete and is
    rebuilt by a rerun of prepare.
    """
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = KEY_FORMAT.format(sample.id)
                for ext, data in encode_sample(sample).items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
    atomic_write_text(path.with_suffix(".idx"), dali_index_text(path))


def content_digest(samples_meta: dict[str, np.ndarray], shards: list[dict]) -> str:
    """SHA-256 of what a dataset holds (samples, paths, boxes, keypoints, landmarks, and the
    shards' layout), not of when or where it was written: the same inputs prepared on two
    nodes give the same digest."""
    digest = hashlib.sha256()
    for key in sorted(samples_meta):
        array = np.ascontiguousarray(samples_meta[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(shards, sort_keys=True).encode())
    return digest.hexdigest()


def write_index(out_dir: str | Path, manifest: dict, samples_meta: dict[str, np.ndarray]) -> None:
    """Write ``samples.npz`` then ``index.json`` (the manifest, last: its presence means complete)."""
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    np.savez(buf, **samples_meta)
    atomic_write_bytes(out_dir / "samples.npz", buf.getvalue())
    manifest = dict(manifest, version=INDEX_VERSION, digest=content_digest(samples_meta, manifest["shards"]))
    atomic_write_text(out_dir / "index.json", json.dumps(manifest, indent=1))


def dataset_digest(shard_dir: str | Path) -> str:
    """The content digest of a prepared dataset (computed for an index written without one)."""
    manifest = load_manifest(shard_dir)
    return manifest.get("digest") or content_digest(load_samples_meta(shard_dir), manifest["shards"])


# --------------------------------------------------------------------------- reading


def load_manifest(shard_dir: str | Path) -> dict:
    shard_dir = Path(shard_dir)
    path = shard_dir / "index.json"
    if not shard_dir.is_dir():
        raise ShardError(f"shard folder not found: {shard_dir}")
    if not path.is_file():
        raise ShardError(f"{path} not found: {shard_dir} is not a finished `k2l prepare` output")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ShardError(f"{path}: does not parse ({err})") from None
    if manifest.get("version") != INDEX_VERSION:
        raise ShardError(f"{path}: index version {manifest.get('version')} is not {INDEX_VERSION}")
    return manifest


def load_samples_meta(shard_dir: str | Path) -> dict[str, np.ndarray]:
    """The per-sample arrays of ``samples.npz`` (never unpickled)."""
    path = Path(shard_dir) / "samples.npz"
    if not path.is_file():
        raise ShardError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # never unpickled: refused as it is
        raise ShardError(f"{path}: not a samples file `k2l prepare` wrote ({err}); prepare the folder again") from None


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """The tar shards listed in the manifest, checked to exist."""
    shard_dir = Path(shard_dir)
    paths = [shard_dir / s["name"] for s in load_manifest(shard_dir)["shards"]]
    for p in paths:
        if not p.is_file():
            raise ShardError(f"shard listed in {shard_dir / 'index.json'} is missing: {p}")
    return paths


def iter_tar_members(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar's members by sample key, in file order. A truncated tar raises ShardError."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"{path}: member {member.name} is truncated")
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: unreadable or truncated tar ({err})") from None
    if current is not None:
        yield current, members


def read_shard(path: str | Path) -> Iterator[Sample]:
    path = Path(path)
    for key, members in iter_tar_members(path):
        yield decode_sample(members, f"{path.name}:{key}")


def read_dataset(shard_dir: str | Path, skip_unreadable: bool = False) -> Iterator[Sample]:
    """Every sample of a prepared dataset, in id order.

    ``skip_unreadable``: a shard that cannot be read to its end (truncated, corrupt)
    yields what precedes the damage and a warning naming it, instead of raising.
    """
    for path in shard_paths(shard_dir):
        try:
            yield from read_shard(path)
        except ShardError as err:
            if not skip_unreadable:
                raise
            logging.getLogger(__name__).warning("%s; its remaining samples are skipped", err)
