"""Temporal pairs: the second view of a Stage-1 pair from a nearby frame of the same video.

The paper boosts training on video (Sec. 4.2) with pairs of nearby frames whose point
correspondences come from sparse optical flow. Here a share (``temporal.share``) of the
samples a Stage-1 loader reads get a partner: another prepared frame of the same video at
most ``temporal.window`` frames away. The sample's points — the label table's rows for its
id, the ones the training step looks up — are tracked into the partner with pyramidal
Lucas-Kanade (:func:`k2l_dist.keypoints.flow.track_points`); a track that fails the
forward-backward check is marked, and the step leaves it out of both views. The other
samples are their own partner (two augmentations of one image, points unmoved).

:class:`TemporalPairs` runs inside the DALI graph (``fn.python_function``, on the
loader's CPU stage, ahead of the training step): per sample it takes the JPEG and id the
reader produced and returns the partner's JPEG, its id, the tracked points (crop pixels,
``max_points`` rows, NaN past the sample's points) and their kept flags. DALI then decodes
and augments the partner like any image, so the augmentation composes with the tracks
through the view's matrix. Each draw is seeded by (seed, sample id, how often this loader
has drawn for that id): it depends neither on the rank that reads the sample nor on the
order DALI hands samples over, so a loader rebuilt at a phase's start and drawn to the same
batch (a resumed run) draws the same partners.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from k2l_dist.augment.validate import CheckedDataset, _parse_index
from k2l_dist.config import TemporalConfig
from k2l_dist.keypoints.flow import track_points
from k2l_dist.utils.seeds import derive_seed


def jpeg_locations(data: CheckedDataset) -> dict[int, tuple[int, int, int]]:
    """Sample id → (tar number, byte offset, size) of its JPEG, from the (cleaned) indexes."""
    out: dict[int, tuple[int, int, int]] = {}
    for number, (tar, index) in enumerate(zip(data.tar_paths, data.index_paths)):
        with open(tar, "rb") as handle:
            for entry in _parse_index(Path(index).read_text(), str(index)):
                handle.seek(entry.members["id"][0])
                sample_id = int(np.frombuffer(handle.read(8), "<i8")[0])
                out[sample_id] = (number, *entry.members["jpg"][:2])
    return out


class FrameWindows:
    """Each usable frame's neighbours: the usable frames of its video at most ``window``
    positions away in frame order (itself excluded); still images (empty video name) have
    none. Kept as flat arrays, not one array per frame: a few bytes per frame however many
    frames the shards hold."""

    def __init__(self, ids: np.ndarray, videos: np.ndarray, frames: np.ndarray, usable: np.ndarray,
                 window: int) -> None:
        videos = np.asarray(videos).astype(str)
        keep = np.isin(ids, usable) & (videos != "")
        ids, videos, frames = np.asarray(ids)[keep], videos[keep], np.asarray(frames)[keep]
        order = np.lexsort((frames, videos))
        self.clip_order = ids[order]  # frames of each video together, in frame order
        videos = videos[order]
        starts = np.flatnonzero(np.r_[True, videos[1:] != videos[:-1]])
        ends = np.r_[starts[1:], len(videos)]
        lengths = ends - starts
        self.clip_start, self.clip_end = np.repeat(starts, lengths), np.repeat(ends, lengths)
        self.by_id = np.argsort(self.clip_order, kind="stable")  # position of the k-th smallest id
        self.sorted_ids = self.clip_order[self.by_id]
        self.window = int(window)

    def near(self, sample_id: int) -> np.ndarray | None:
        """The neighbours' ids, or None when the sample has none."""
        k = int(np.searchsorted(self.sorted_ids, sample_id))
        if k >= len(self.sorted_ids) or self.sorted_ids[k] != sample_id:
            return None
        at = int(self.by_id[k])
        lo, hi = max(int(self.clip_start[at]), at - self.window), min(int(self.clip_end[at]), at + self.window + 1)
        near = np.r_[self.clip_order[lo:at], self.clip_order[at + 1:hi]]
        return near if len(near) else None


class TemporalPairs:
    """The DALI-side partner draw and tracking (see the module docstring), called per batch.

    ``table``: the label table the loader's phase trains on (ids, offsets, points in crop
    pixels), read-only; ``max_points``: the rows the step looks up per image."""

    def __init__(self, data: CheckedDataset, meta: dict, table, max_points: int, cfg: TemporalConfig,
                 seed: int) -> None:
        self.tars: Sequence[Path] = list(data.tar_paths)
        self.locations = jpeg_locations(data)
        self.partners = FrameWindows(meta["ids"], meta["videos"], meta["frames"], data.ids, cfg.window)
        self.table_ids, self.offsets, self.points = table.ids, table.offsets, table.points
        self.max_points, self.cfg = int(max_points), cfg
        self.seed = derive_seed(seed, 0, "temporal")
        self.sample_ids = np.sort(np.asarray(data.ids, np.int64))
        self.draws = np.zeros(len(self.sample_ids), np.int64)  # partners drawn so far, per sample
        self._handles: dict[int, object] = {}

    def __call__(self, jpegs: list[np.ndarray], sample_ids: list[np.ndarray]) -> tuple[list, list, list, list]:
        """Per sample: partner JPEG, partner id (1,), tracks (max_points, 2) float32 (NaN
        where lost or past the sample's points) and kept flags (max_points,) uint8."""
        outs: tuple[list, list, list, list] = ([], [], [], [])
        for jpeg, sample_id in zip(jpegs, sample_ids):
            for out, value in zip(outs, self.pair(jpeg, int(np.asarray(sample_id).reshape(-1)[0]))):
                out.append(value)
        return outs

    def pair(self, jpeg: np.ndarray, own: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One sample's partner, drawn and tracked (see :meth:`__call__`)."""
        slot = int(np.searchsorted(self.sample_ids, own))
        count = int(self.draws[slot])
        self.draws[slot] += 1
        rng = np.random.default_rng([self.seed, own, count])
        points = self._points_of(own)
        tracks = np.full((self.max_points, 2), np.nan, np.float32)
        kept = np.zeros(self.max_points, np.uint8)
        near = self.partners.near(own)
        if near is None or rng.random() >= self.cfg.share:
            tracks[:len(points)], kept[:len(points)] = points, 1
            return np.array(jpeg), np.array([own], np.int64), tracks, kept
        partner = int(near[rng.integers(len(near))])
        partner_jpeg = self._read(partner)
        moved, ok = track_points(_gray(jpeg), _gray(partner_jpeg), points, window=self.cfg.lk_window,
                                 fb_max_px=self.cfg.fb_max_px)
        tracks[:len(points)] = np.where(ok[:, None], moved, np.nan)
        kept[:len(points)] = ok
        return partner_jpeg, np.array([partner], np.int64), tracks, kept

    def _points_of(self, sample_id: int) -> np.ndarray:
        """The table rows the step looks up for ``sample_id`` (at most ``max_points``)."""
        pos = int(np.searchsorted(self.table_ids, sample_id))
        if pos >= len(self.table_ids) or self.table_ids[pos] != sample_id:
            return np.zeros((0, 2), np.float32)
        start = int(self.offsets[pos])
        end = min(int(self.offsets[pos + 1]), start + self.max_points)
        return np.asarray(self.points[start:end], np.float32)

    def _read(self, sample_id: int) -> np.ndarray:
        number, offset, size = self.locations[sample_id]
        handle = self._handles.get(number)
        if handle is None:
            handle = self._handles[number] = open(self.tars[number], "rb")  # noqa: SIM115 (kept open, reused)
        handle.seek(offset)
        return np.frombuffer(handle.read(size), np.uint8)

    def __del__(self) -> None:
        for handle in self._handles.values():
            handle.close()


def _gray(jpeg: np.ndarray) -> np.ndarray:
    return cv2.imdecode(np.asarray(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
