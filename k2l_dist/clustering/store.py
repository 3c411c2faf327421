"""A round's points in canonical order, with the descriptors left where they are.

Ranks extract disjoint slices of the dataset. A round works in one canonical order
(image id, then the point's order within its image), so its labels depend neither on
the world size nor on which rank arrived first. Two kinds of per-point data travel:

* the *index* (image id, crop position, score: 20 bytes a point) is put together in
  canonical order by :meth:`PointSet.from_parts`;
* the *descriptors* (1 KiB a point at 256-d, as much again for the mirrored image's)
  stay in the ranks' parts — in the clustering actor they are read-only views of Ray's
  object store, across shard actors they stay on those actors' nodes. They are read
  only through a :class:`DescriptorStore`: rows by index (a K-means sample) and the
  nearest centroid of every row, part by part. No step concatenates them.

A store is a list of *segments* (contiguous runs of rows, in the order of the parts
given) kept by *holders*; a holder is an object in this process or a Ray actor with the
same methods (:mod:`k2l_dist.clustering.ray_store`). numpy + Faiss only, never torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from k2l_dist.clustering.nearest import CHUNK, nearest_centroids

INDEX_KEYS = ("image_ids", "points", "scores")  # per point, small: gathered in canonical order
DESCRIPTOR_KEYS = ("descriptors", "flipped_descriptors")  # per point, large: stay in their parts
PART_KEYS = INDEX_KEYS + DESCRIPTOR_KEYS  # with "sample_ids": every image a rank extracted


class SegmentHolder:
    """Keeps segments of descriptor rows and answers for them (in-process or as a Ray actor).

    ``segments[i]``: ``{"descriptors": (n_i, d), "flipped_descriptors": (n_i, d)}`` (the
    mirrored rows optional); arrays are used as they are, never copied whole.
    """

    def __init__(self, segments: Sequence[dict[str, np.ndarray]], threads: int | None = None,
                 use_gpu: bool = False) -> None:
        if threads:
            import faiss

            faiss.omp_set_num_threads(int(threads))
        self.threads = threads
        self.segments = [dict(s) for s in segments]
        self.use_gpu = bool(use_gpu)

    def info(self) -> list[dict[str, Any]]:
        return segment_info(self.segments)

    def rows(self, requests: Sequence[tuple[int, np.ndarray]], mirrored: bool) -> list[np.ndarray]:
        """For each ``(segment, local row indices)``: those rows (float32), in the order asked."""
        key = DESCRIPTOR_KEYS[int(mirrored)]
        return [np.ascontiguousarray(self.segments[s][key][np.asarray(idx, np.int64)], np.float32)
                for s, idx in requests]

    def assign(self, centroids: np.ndarray, requests: Sequence[tuple[int, np.ndarray | None]],
               mirrored: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each ``(segment, local rows or None = all)``: nearest centroid and squared distance."""
        if self.threads:  # OpenMP counts threads per calling thread (Ray calls from a pool thread)
            import faiss

            faiss.omp_set_num_threads(int(self.threads))
        key = DESCRIPTOR_KEYS[int(mirrored)]
        out = []
        for s, idx in requests:
            x = self.segments[s][key]
            if idx is None:  # slices of the array itself: no copy of float32 rows
                read, n = (lambda a, b, x=x: x[a:b]), len(x)
            else:
                rows = np.asarray(idx, np.int64)
                read, n = (lambda a, b, x=x, rows=rows: x[rows[a:b]]), len(rows)
            out.append(nearest_centroids(read, n, centroids, use_gpu=self.use_gpu, chunk=CHUNK))
        return out


Call = Callable[[Sequence[Any], str, Sequence[tuple]], list]


def call_local(holders: Sequence[Any], method: str, args: Sequence[tuple]) -> list:
    return [getattr(h, method)(*a) for h, a in zip(holders, args)]


@dataclass(frozen=True)
class Segment:
    holder: int  # index into the store's holders
    local: int  # the segment's number inside its holder
    start: int  # its first row in the store's flat order
    rows: int


class DescriptorStore:
    """Descriptor rows in one flat order (the parts' order), kept by several holders."""

    def __init__(self, holders: Sequence[Any], segments: Sequence[Segment], dim: int, has_flipped: bool,
                 call: Call = call_local, nbytes: int = 0) -> None:
        self.nbytes = int(nbytes)  # the descriptor bytes the holders keep
        self.holders = list(holders)
        self.segments = sorted(segments, key=lambda s: s.start)
        self.dim, self.has_flipped, self._call = int(dim), bool(has_flipped), call
        self.starts = np.array([s.start for s in self.segments], np.int64)
        self.n = int(sum(s.rows for s in self.segments))
        if any(a.start + a.rows != b.start for a, b in zip(self.segments, self.segments[1:])):
            raise ValueError("store segments must tile the rows without gaps")

    @classmethod
    def local(cls, parts: Sequence[dict[str, np.ndarray]], threads: int | None = None,
              use_gpu: bool = False) -> DescriptorStore:
        """One in-process holder over the parts' descriptor arrays (views, not copies)."""
        segments = [{k: p[k] for k in DESCRIPTOR_KEYS if k in p} for p in parts]
        return cls.from_holders([SegmentHolder(segments, threads, use_gpu)], [segment_info(segments)])

    @classmethod
    def from_holders(cls, holders: Sequence[Any], infos: Sequence[list[dict[str, Any]]],
                     call: Call = call_local) -> DescriptorStore:
        """Holders in flat order, each with the ``info()`` of its segments."""
        segments, start = [], 0
        flat = [i for per in infos for i in per]
        for h, per in enumerate(infos):
            for local, info in enumerate(per):
                segments.append(Segment(h, local, start, info["rows"]))
                start += info["rows"]
        dims = {i["dim"] for i in flat if i["rows"]}
        flipped = {i["has_flipped"] for i in flat if i["rows"]}
        if len(dims) > 1:
            raise ValueError(f"parts hold descriptors of different dimensions: {sorted(dims)}")
        if len(flipped) > 1:
            raise ValueError("some parts hold flipped_descriptors and others do not")
        dim = dims.pop() if dims else (flat[0]["dim"] if flat else 0)
        return cls(holders, segments, dim, flipped == {True}, call, nbytes=sum(i["bytes"] for i in flat))

    def _by_segment(self, flat: np.ndarray) -> list[tuple[Segment, np.ndarray]]:
        """(segment, positions in ``flat``) for every segment some of ``flat`` falls in."""
        which = np.searchsorted(self.starts, flat, side="right") - 1
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(self.segments) + 1))
        return [(seg, order[bounds[i]:bounds[i + 1]]) for i, seg in enumerate(self.segments)
                if bounds[i + 1] > bounds[i]]

    def _fan_out(self, method: str, per_segment: list[tuple[Segment, Any]], before: tuple = (),
                 after: tuple = ()) -> list:
        """``method(*before, requests, *after)`` once per holder (all holders at once); the
        answers in ``per_segment`` order."""
        requests: dict[int, list] = {}
        for seg, arg in per_segment:
            requests.setdefault(seg.holder, []).append((seg.local, arg))
        holders = sorted(requests)
        answers = self._call([self.holders[h] for h in holders], method,
                             [(*before, requests[h], *after) for h in holders])
        by_holder = {h: iter(a) for h, a in zip(holders, answers)}
        return [next(by_holder[seg.holder]) for seg, _ in per_segment]

    def rows(self, flat: np.ndarray, mirrored: bool = False) -> np.ndarray:
        """Rows at flat positions ``flat`` (any order), float32 (len(flat), dim)."""
        flat = np.asarray(flat, np.int64).reshape(-1)
        if mirrored and not self.has_flipped:
            raise ValueError("these parts hold no flipped_descriptors")
        out = np.empty((len(flat), self.dim), np.float32)
        groups = self._by_segment(flat)
        got = self._fan_out("rows", [(seg, flat[pos] - seg.start) for seg, pos in groups], after=(mirrored,))
        for (_, pos), rows in zip(groups, got):
            out[pos] = rows
        return out

    def assign(self, centroids: np.ndarray, mask: np.ndarray | None = None,
               mirrored: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid and squared distance of every row in ``mask`` (all rows when None);
        flat (n,) arrays, label -1 and distance inf outside the mask."""
        labels = np.full(self.n, -1, np.int64)
        distances = np.full(self.n, np.inf, np.float32)
        per_segment = []
        for seg in self.segments:
            if mask is None:
                per_segment.append((seg, None))
            else:
                local = np.flatnonzero(mask[seg.start:seg.start + seg.rows])
                if len(local):
                    per_segment.append((seg, local))
        centroids = np.ascontiguousarray(centroids, np.float32)
        got = self._fan_out("assign", per_segment, before=(centroids,), after=(mirrored,))
        for (seg, local), (lab, dist) in zip(per_segment, got):
            at = seg.start + (np.arange(seg.rows) if local is None else local)
            labels[at], distances[at] = lab, dist
        return labels, distances


def segment_info(segments: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    return [{"rows": int(len(s["descriptors"])), "dim": int(np.shape(s["descriptors"])[1]),
             "has_flipped": "flipped_descriptors" in s, "bytes": int(sum(np.asarray(v).nbytes for v in s.values()))}
            for s in segments]


@dataclass
class PointSet:
    """A round's points in canonical order: the index arrays here, the descriptors in ``store``.

    ``flat[i]`` is the store row of canonical point i.
    """

    image_ids: np.ndarray  # (n,) int64, non-decreasing
    points: np.ndarray  # (n, 2) float32 crop pixels
    scores: np.ndarray  # (n,) float32
    sample_ids: np.ndarray  # (N,) int64 sorted: every image that took part, with or without points
    store: DescriptorStore
    flat: np.ndarray  # (n,) int64

    @property
    def n(self) -> int:
        return int(len(self.image_ids))

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def has_flipped(self) -> bool:
        return self.store.has_flipped

    @classmethod
    def from_parts(cls, parts: Sequence[dict[str, np.ndarray]], store: DescriptorStore | None = None) -> PointSet:
        """Rank parts (``INDEX_KEYS`` + ``sample_ids``; descriptors too unless ``store`` keeps
        them, in the parts' order) in canonical order. An image in two parts is an error: its
        points would count twice."""
        if not parts:
            raise ValueError("no extraction to merge")
        for i, part in enumerate(parts):
            missing = [k for k in (*INDEX_KEYS, "sample_ids") if k not in part]
            if missing:
                raise ValueError(f"extraction part {i} lacks {', '.join(missing)}")
        every = np.concatenate([np.asarray(p["sample_ids"], np.int64).reshape(-1) for p in parts])
        sample_ids = np.sort(every)
        if len(sample_ids) > 1 and (sample_ids[1:] == sample_ids[:-1]).any():
            raise ValueError("an image was extracted by two ranks: rank slices must be disjoint")
        store = store if store is not None else DescriptorStore.local(parts)
        ids = np.concatenate([np.asarray(p["image_ids"], np.int64).reshape(-1) for p in parts])
        if len(ids) != store.n:
            raise ValueError(f"the parts index {len(ids)} points but their descriptors hold {store.n}")
        flat = np.arange(len(ids), dtype=np.int64)
        if len(ids) and (np.diff(ids) < 0).any():
            flat = np.argsort(ids, kind="stable")  # stable: keeps each image's own point order
        points = np.concatenate([np.asarray(p["points"], np.float32).reshape(-1, 2) for p in parts])
        scores = np.concatenate([np.asarray(p["scores"], np.float32).reshape(-1) for p in parts])
        return cls(ids[flat], points[flat], scores[flat], sample_ids, store, flat)

    @classmethod
    def from_arrays(cls, image_ids: np.ndarray, descriptors: np.ndarray,
                    flipped: np.ndarray | None = None) -> PointSet:
        """Points in the order given (no reordering): the plain-array form of the clustering functions."""
        ids = np.asarray(image_ids, np.int64).reshape(-1)
        part = {"descriptors": descriptors}
        if flipped is not None:
            part["flipped_descriptors"] = flipped
        n = len(ids)
        return cls(ids, np.zeros((n, 2), np.float32), np.zeros(n, np.float32), np.unique(ids),
                   DescriptorStore.local([part]), np.arange(n, dtype=np.int64))

    def rows(self, index: np.ndarray, mirrored: bool = False) -> np.ndarray:
        """Descriptor rows of canonical points ``index`` (any order)."""
        return self.store.rows(self.flat[np.asarray(index, np.int64)], mirrored)

    def assign(self, centroids: np.ndarray, mask: np.ndarray | None = None,
               mirrored: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (n,) nearest-centroid labels and squared distances; -1 / inf outside ``mask``."""
        flat_mask = None
        if mask is not None:
            flat_mask = np.zeros(self.store.n, bool)
            flat_mask[self.flat[np.asarray(mask, bool)]] = True
        labels, distances = self.store.assign(centroids, flat_mask, mirrored)
        return labels[self.flat], distances[self.flat]

    @property
    def nbytes(self) -> int:
        """Bytes of the index arrays kept here (the descriptors are the store's)."""
        return int(sum(a.nbytes for a in (self.image_ids, self.points, self.scores, self.sample_ids, self.flat)))
