"""Check shards before DALI reads them, so bad input is skipped instead of crashing a run.

DALI's webdataset reader trusts its index: an entry past the end of a truncated tar,
a sample without an image or an image that does not decode stops the whole pipeline
(on every rank). So before a pipeline is built, every sample the index lists is
checked here, in Python:

* the tar holds the member where the index says (the tar header before it names it,
  and the data ends before the end of the file): catches truncated tars and stale indexes;
* the ``jpg`` and ``id`` members the pipeline reads are present;
* ``id`` is 8 bytes (int64) and unique over the dataset;
* the JPEG has its start/end markers, decodes with OpenCV, and has the dataset's size.

Bad samples are counted and left out of a *cleaned index* (written to a cache folder,
never beside the shards, which may be read-only or shared), with one warning per
shard that names it; ``strict=True`` raises :class:`ShardError` naming the shard and
the sample instead. Results are cached by the shard's and index's size and mtime, so
only the first start pays for decoding every image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from k2l_dist.data.shards import ShardError, dali_index_text, shard_paths
from k2l_dist.utils.io import atomic_write_text

log = logging.getLogger("k2l_dist.augment")

CHECK_VERSION = 1  # bump when the checks change: invalidates cached results
REQUIRED = ("jpg", "id")  # the members the pipeline reads

# Skip reasons (also the keys of CheckedDataset.skipped).
CORRUPT = "corrupt image"
MISSING = "missing component"
TRUNCATED = "truncated"
BAD_ID = "bad id"
DUPLICATE = "duplicate id"
WRONG_SIZE = "wrong image size"
MISMATCH = "index does not match tar"


@dataclass
class CheckedDataset:
    """What the pipeline reads: shards with at least one good sample and their (cleaned) indexes."""

    shard_dir: Path
    tar_paths: list[Path]
    index_paths: list[Path]
    ids: np.ndarray  # int64, every kept sample in file order
    crop_size: tuple[int, int]  # (height, width) of the crops
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count
    skipped_by_shard: dict[str, int] = field(default_factory=dict)  # shard name → count

    @property
    def num_samples(self) -> int:
        return int(self.ids.size)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class _Entry:
    key: str  # sample name without extension, as the index writes it
    line: str  # the sample's index line, verbatim
    members: dict[str, tuple[int, int, str]]  # ext → (offset, size, member name)


@dataclass
class _ShardResult:
    """Per-shard check, before the dataset-wide rules (duplicate ids, majority size)."""

    problems: list[tuple[str, str]]  # (key, reason)
    good: list[tuple[str, int, int, int]]  # (key, id, height, width)


def default_cache_dir() -> Path:
    uid = getattr(os, "getuid", lambda: 0)()
    return Path(tempfile.gettempdir()) / f"k2l-dist-{uid}" / "shard-check"


def _parse_index(text: str, where: str) -> list[_Entry]:
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2":
        raise ShardError(f"{where}: not a DALI v1.2 webdataset index")
    entries = []
    for line in lines[1:]:
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) % 4:
            raise ShardError(f"{where}: malformed index line {line!r}")
        members = {}
        for i in range(0, len(tokens), 4):
            ext, offset, size, name = tokens[i : i + 4]
            members[ext] = (int(offset), int(size), name)
        first_name = tokens[3]
        key = first_name[: first_name.find(".", first_name.rfind("/") + 1)]
        entries.append(_Entry(key, line, members))
    if int(head[1]) != len(entries):
        raise ShardError(f"{where}: index header says {head[1]} samples, lists {len(entries)}")
    return entries


def _header_name(header: bytes) -> str:
    """The member name stored in a 512-byte tar header (USTAR prefix included)."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _check_jpeg(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a decodable JPEG, else None."""
    import cv2

    # A truncated JPEG still "decodes" in OpenCV (grey bottom rows, a libjpeg warning):
    # require the start-of-image and end-of-image markers as well.
    if len(data) < 4 or data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-16:]:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        return None
    return int(image.shape[0]), int(image.shape[1])


def _check_shard(tar: Path, entries: list[_Entry], threads: int) -> _ShardResult:
    file_size = tar.stat().st_size
    problems: list[tuple[str, str]] = []
    candidates: list[tuple[str, int, bytes]] = []
    with open(tar, "rb") as handle:

        def read(offset: int, size: int) -> bytes:
            handle.seek(offset)
            return handle.read(size)

        for entry in entries:
            missing = [ext for ext in REQUIRED if ext not in entry.members]
            if missing:
                problems.append((entry.key, f"{MISSING} (.{', .'.join(missing)})"))
                continue
            reason = None
            for ext in REQUIRED:
                offset, size, name = entry.members[ext]
                if offset < 512 or offset + size > file_size:
                    reason = TRUNCATED
                    break
                if _header_name(read(offset - 512, 512)) != name:
                    reason = MISMATCH
                    break
            if reason:
                problems.append((entry.key, reason))
                continue
            offset, size, _ = entry.members["id"]
            if size != 8:
                problems.append((entry.key, BAD_ID))
                continue
            sample_id = int(np.frombuffer(read(offset, 8), "<i8")[0])
            offset, size, _ = entry.members["jpg"]
            candidates.append((entry.key, sample_id, read(offset, size)))
    # OpenCV releases the GIL while decoding: threads pay off.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        shapes = list(pool.map(lambda c: _check_jpeg(c[2]), candidates))
    good = []
    for (key, sample_id, _), shape in zip(candidates, shapes):
        if shape is None:
            problems.append((key, CORRUPT))
        else:
            good.append((key, sample_id, shape[0], shape[1]))
    return _ShardResult(problems, good)


def _cache_key(tar: Path, idx: Path | None) -> str:
    parts = [str(CHECK_VERSION), str(tar.resolve())]
    for p in (tar, idx):
        if p is not None:
            st = p.stat()
            parts += [str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:20]


def _load_index(tar: Path, strict: bool) -> tuple[str, Path | None]:
    idx = tar.with_suffix(".idx")
    if idx.is_file():
        return idx.read_text(), idx
    # `k2l prepare` writes the index after the tar: a missing one means an interrupted run.
    if strict:
        raise ShardError(f"{tar.name}: DALI index {idx.name} is missing (rerun `k2l prepare`)")
    log.warning("%s: DALI index %s is missing; rebuilding it by scanning the tar", tar.name, idx.name)
    try:
        return dali_index_text(tar), None
    except Exception as err:  # noqa: BLE001 - any tar failure makes the shard unreadable
        raise ShardError(f"{tar}: no index and the tar cannot be scanned ({err})") from None


def check_dataset(
    shard_dir: str | Path,
    *,
    strict: bool = False,
    cache_dir: str | Path | None = None,
    threads: int = 2,
    ids: np.ndarray | None = None,
) -> CheckedDataset:
    """Check every shard of a prepared dataset; return what the pipeline may read.

    ``ids`` restricts the result to those sample ids (a split, e.g. training without the
    held-out test images); others are left out of the index silently, not counted as bad.

    Raises :class:`ShardError` (one line, naming the path) for a missing folder, manifest
    or shard, for an empty result, and, with ``strict``, for the first bad sample.
    """
    shard_dir = Path(shard_dir)
    tars = shard_paths(shard_dir)  # one-line ShardError for a missing folder or shard
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    per_shard = [_checked_shard(tar, cache, strict, threads) for tar in tars]

    # Dataset-wide rules: one crop size (the most common one) and unique ids.
    sizes = Counter((h, w) for *_, r in per_shard for (_, _, h, w) in r.good)
    if not sizes:
        raise ShardError(f"{shard_dir}: no readable samples in {len(tars)} shard(s)")
    crop_size = sizes.most_common(1)[0][0]
    seen: set[int] = set()
    wanted = None if ids is None else set(np.asarray(ids, np.int64).tolist())
    out_tars: list[Path] = []
    out_idx: list[Path] = []
    kept_ids: list[int] = []
    skipped: Counter[str] = Counter()
    skipped_by_shard: dict[str, int] = {}
    for tar, entries, idx, result in per_shard:
        keep, problems = _keep(result, crop_size, seen, wanted, kept_ids)
        if strict and problems:
            raise ShardError(f"{tar}: sample {problems[0][0]}: {problems[0][1]}")
        if problems:
            skipped.update(Counter(reason.split(" (")[0] for _, reason in problems))
            skipped_by_shard[tar.name] = len(problems)
            _warn_skipped(tar, problems, len(entries))
        if keep:
            out_tars.append(tar)
            out_idx.append(_kept_index(tar, entries, idx, keep, cache))
    if not out_tars:
        raise ShardError(f"{shard_dir}: none of the requested sample ids is in the shards")
    return CheckedDataset(
        shard_dir=shard_dir,
        tar_paths=out_tars,
        index_paths=out_idx,
        ids=np.asarray(kept_ids, np.int64),
        crop_size=crop_size,
        skipped=dict(skipped),
        skipped_by_shard=skipped_by_shard,
    )


def _checked_shard(tar: Path, cache: Path, strict: bool,
                   threads: int) -> tuple[Path, list[_Entry], Path | None, _ShardResult]:
    """One shard's samples checked (from the cache when its index and tar are unchanged)."""
    text, idx = _load_index(tar, strict)
    entries = _parse_index(text, tar.name if idx is None else idx.name)
    cached = cache / f"{tar.stem}-{_cache_key(tar, idx)}.json"
    result = None
    if idx is not None and cached.is_file():
        try:
            data = json.loads(cached.read_text())
            result = _ShardResult([tuple(p) for p in data["problems"]], [tuple(g) for g in data["good"]])
        except (ValueError, KeyError, TypeError):
            result = None  # a damaged cache entry is just recomputed
    if result is None:
        result = _check_shard(tar, entries, threads)
        if idx is not None:
            try:
                atomic_write_text(cached, json.dumps({"problems": result.problems, "good": result.good}))
            except OSError as err:  # an unwritable cache only costs time
                log.debug("cannot write shard-check cache %s: %s", cached, err)
    if strict and result.problems:
        key, reason = result.problems[0]
        raise ShardError(f"{tar}: sample {key}: {reason}")
    return tar, entries, idx, result


def _keep(result: _ShardResult, crop_size: tuple[int, int], seen: set[int], wanted: set[int] | None,
          ids: list[int]) -> tuple[set[str], list[tuple[str, str]]]:
    """A shard's keys to read and its problems; ``seen`` and ``ids`` grow with its samples."""
    problems = list(result.problems)
    keep: set[str] = set()
    for key, sample_id, h, w in result.good:
        if (h, w) != crop_size:
            problems.append((key, f"{WRONG_SIZE} ({h}x{w}, expected {crop_size[0]}x{crop_size[1]})"))
        elif sample_id in seen:
            problems.append((key, f"{DUPLICATE} {sample_id}"))
        elif wanted is not None and sample_id not in wanted:
            seen.add(sample_id)
        else:
            seen.add(sample_id)
            keep.add(key)
            ids.append(sample_id)
    return keep, problems


def _warn_skipped(tar: Path, problems: list[tuple[str, str]], total: int) -> None:
    shown = "; ".join(f"{k}: {r}" for k, r in problems[:5])
    more = f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
    log.warning("%s: skipped %d of %d samples (%s%s)", tar.name, len(problems), total, shown, more)


def _kept_index(tar: Path, entries: list[_Entry], idx: Path | None, keep: set[str], cache: Path) -> Path:
    """The shard's own index when every sample is kept, else a cleaned copy in the cache."""
    if len(keep) == len(entries) and idx is not None:
        return idx
    kept = [e.line for e in entries if e.key in keep]
    text = "\n".join([f"v1.2 {len(kept)}", *kept]) + "\n"
    index_path = cache / f"{tar.stem}-clean-{hashlib.sha1(text.encode()).hexdigest()[:20]}.idx"
    if not index_path.is_file():
        atomic_write_text(index_path, text)
    return index_path
