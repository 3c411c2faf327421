"""Which prepared samples are held out for testing, and which fit the regressors.

Φ and Ψ train on ``Split.train`` (their annotations are never read); the forward and
backward regressors are fitted on ``Split.regressor`` (default: all of ``train``) and
scored on ``Split.test``, which neither training nor any regressor sees.

``eval.split`` picks the held-out ids:

- ``random`` (default): ``eval.test_count`` ids drawn by ``eval.seed``; when the samples
  name their videos (video formats), whole videos are drawn instead (:func:`video_split`),
  so that no test frame has a near-duplicate neighbour among the training frames;
- ``last``: the ``eval.test_count`` largest ids (the annotation file's last lines);
- ``file``: the ids or image paths listed in ``eval.split_file``, one per line;
- ``protocol``: the dataset's own test list, recorded by ``k2l prepare`` for formats that
  have one (``mafl``, ``aflw``) as ``test_ids.txt`` in the shard folder, with the
  protocol's regressor images in ``train_ids.txt`` where they are a subset of training.

Random choices rank ids by a keyed 64-bit hash (SplitMix64) of ``(seed, id)``, not by a
NumPy generator, whose streams may change between versions: every process, machine
and NumPy release holds out the same ids, and adding images to a dataset leaves the
others where they were.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from k2l_dist.config import EvalConfig, SplitChoice
from k2l_dist.data.shards import TEST_IDS, TRAIN_IDS

log = logging.getLogger(__name__)


@dataclass
class Split:
    train: np.ndarray  # ids Φ and Ψ train on (unsupervised: their annotations are never read)
    test: np.ndarray  # held-out ids: never trained on, never used to fit a regressor
    regressor: np.ndarray | None = None  # ids the regressors may be fitted on; None = all of train


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_order(ids: np.ndarray, seed: int) -> np.ndarray:
    """``ids`` ordered by a keyed hash of ``(seed, id)``: a seeded shuffle that is the
    same everywhere and does not depend on which other ids are present."""
    ids = np.asarray(ids, np.int64)
    key = _splitmix64(np.array([seed], np.int64).astype(np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(ids.astype(np.uint64) ^ key)
    return ids[np.lexsort((ids, h))]  # ties (never in practice) broken by id


def seeded_subset(ids: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` of ``ids`` chosen by ``seed`` (sorted); all of them when count <= 0 or too large."""
    ids = np.unique(np.asarray(ids, np.int64))
    if count <= 0 or count >= len(ids):
        return ids
    return np.sort(hash_order(ids, seed)[:count])


def make_split(ids: np.ndarray, test_count: int, mode: str = "last", seed: int = 0,
               test_ids: np.ndarray | None = None, regressor_ids: np.ndarray | None = None) -> Split:
    """Split the prepared ``ids``. ``random`` / ``last`` hold out ``test_count`` ids (never
    more than half); ``file`` / ``protocol`` hold out the given ``test_ids`` present in ``ids``."""
    ids = np.unique(np.asarray(ids, np.int64))
    if mode in ("random", "last"):
        count = min(max(test_count, 0), len(ids) // 2)
        test = ids[len(ids) - count:] if mode == "last" else np.sort(hash_order(ids, seed)[:count])
    elif mode in ("file", "protocol"):
        if test_ids is None:
            raise ValueError(f"eval.split={mode}: no list of held-out ids given")
        test = np.intersect1d(ids, np.asarray(test_ids, np.int64))
    else:
        raise ValueError(f"eval.split: {mode!r} is not one of {', '.join(get_args(SplitChoice))}")
    train = np.setdiff1d(ids, test)
    regressor = None if regressor_ids is None else np.intersect1d(train, np.asarray(regressor_ids, np.int64))
    return Split(train, test, regressor)


def video_split(ids: np.ndarray, videos: np.ndarray, test_count: int, seed: int) -> Split:
    """Hold out whole videos, drawn by ``seed``, until about ``test_count`` frames (asked for
    at most half of them) are held out: frames of one video never fall on both sides.

    ``videos`` names each id's video (aligned with ``ids``); an empty name is a still image,
    a video of its own. Videos are ranked by a keyed hash of ``(seed, name)``, so a video's
    rank does not depend on the others. The held-out videos are the prefix of that ranking
    whose frame count is nearest the asked count; as that count is at most half the frames,
    the nearest prefix never takes every video.
    """
    ids = np.asarray(ids, np.int64)
    videos = np.asarray(videos).astype(str)
    if ids.shape != videos.shape:
        raise ValueError(f"video_split: {len(videos)} video names for {len(ids)} ids")
    count = min(max(test_count, 0), len(ids) // 2)
    names = np.where(videos == "", np.char.add("\0still:", ids.astype(str)), videos)
    groups, group_of, sizes = np.unique(names, return_inverse=True, return_counts=True)
    if count == 0 or len(groups) < 2:
        if count:
            log.warning("eval.split=random: every sample belongs to one video; nothing can be held out by video")
        return Split(np.unique(ids), np.zeros(0, np.int64))
    keys = np.array([_name_key(g) for g in groups], np.int64)
    by_key = np.argsort(keys)
    ranked = by_key[np.searchsorted(keys[by_key], hash_order(keys, seed))]  # group indices, seeded order
    held = np.cumsum(sizes[ranked])  # frames held out by the first 1, 2, ... videos
    taken = int(np.argmin(np.abs(held - count))) + 1
    test = np.unique(ids[np.isin(group_of, ranked[:taken])])
    return Split(np.setdiff1d(ids, test), test)


def _name_key(name: str) -> int:
    """A 63-bit key of a video name, the same in every process (unlike Python's ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") >> 1


def read_id_list(path: str | Path, ids: np.ndarray, paths: np.ndarray | None = None,
                 what: str = "eval.split_file") -> np.ndarray:
    """Sample ids named by a text file, one per line: an integer sample id, or an image path
    (as the annotation names it, or only its file name when that is unique in the dataset).

    Blank lines and ``#`` comments are ignored; a line may carry more fields after the
    first (MAFL lists, annotation lines). Lines that name no prepared sample (an image
    that prepare skipped) are counted in a warning; a file that names none is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    known = set(np.asarray(ids, np.int64).tolist())
    by_path: dict[str, int] = {}
    by_name: dict[str, int | None] = {}
    for sid, p in zip(np.asarray(ids).tolist(), [] if paths is None else np.asarray(paths).tolist()):
        p = str(p).replace("\\", "/")
        by_path[p] = sid
        name = p.rsplit("/", 1)[-1]
        by_name[name] = None if name in by_name else sid  # None: ambiguous
    found: list[int] = []
    missing: list[int] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        token = fields[0].replace("\\", "/").removeprefix("./")
        if token.lstrip("-").isdigit():
            sid = int(token)
            if sid not in known:
                missing.append(number)
                continue
        elif token in by_path:
            sid = by_path[token]
        elif by_name.get(token.rsplit("/", 1)[-1]) is not None:
            sid = by_name[token.rsplit("/", 1)[-1]]
        else:
            missing.append(number)
            continue
        found.append(sid)
    if not found:
        raise ValueError(f"{what}: {path} names no prepared sample ({len(missing)} lines; the first "
                         f"unmatched is line {missing[0] if missing else '-'}): expected sample ids or image paths")
    if missing:
        log.warning("%s: %d of %d lines of %s name no prepared sample (skipped by prepare?), e.g. line %d",
                    what, len(missing), len(missing) + len(found), path, missing[0])
    return np.unique(np.array(found, np.int64))


def split_for_run(ecfg: EvalConfig, meta: dict, shard_dir: str | Path) -> Split:
    """The split a run trains and evaluates on, from ``cfg.eval`` and the prepared shards.

    Without annotated landmarks there is nothing to evaluate: every sample trains.
    """
    ids = np.asarray(meta["ids"], np.int64)
    shard_dir = Path(shard_dir)
    if "landmarks" not in meta:
        return make_split(ids, 0, "last")
    protocol = shard_dir / TEST_IDS
    if ecfg.split == "protocol":
        if not protocol.is_file():
            raise ValueError(f"eval.split=protocol: {protocol} not found; only formats with their own test list "
                             f"(mafl, aflw) record one at `k2l prepare`; use eval.split=file for others")
        train_list = shard_dir / TRAIN_IDS
        regressor = read_id_list(train_list, ids, what=TRAIN_IDS) if train_list.is_file() else None
        split = make_split(ids, 0, "protocol", test_ids=read_id_list(protocol, ids, what=TEST_IDS),
                           regressor_ids=regressor)
    elif ecfg.split == "file":
        test = read_id_list(ecfg.split_file, ids, meta.get("paths"))
        split = make_split(ids, 0, "file", test_ids=test)
    elif ecfg.split == "pattern":
        split = make_split(ids, 0, "file", test_ids=matching_ids(ids, meta["paths"], ecfg.split_pattern))
    else:
        if protocol.is_file():
            log.warning("eval.split=%s ignores the dataset's own test list in %s; eval.split=protocol uses it",
                        ecfg.split, protocol)
        videos = meta.get("videos")
        if ecfg.split == "random" and videos is not None and any(str(v) for v in np.asarray(videos).tolist()):
            split = video_split(ids, videos, ecfg.test_count, ecfg.seed)
        else:
            split = make_split(ids, ecfg.test_count, ecfg.split, ecfg.seed)
    if len(split.train) == 0:
        raise ValueError(f"eval.split={ecfg.split}: every prepared sample is held out; nothing is left to train on")
    return split


def matching_ids(ids: np.ndarray, paths: np.ndarray, pattern: str) -> np.ndarray:
    """The ids whose image path contains a match of the regular expression ``pattern``."""
    rx = re.compile(pattern)
    hits = np.array([rx.search(str(p).replace("\\", "/")) is not None for p in paths], bool)
    if not hits.any():
        raise ValueError(f"eval.split_pattern={pattern!r} matches no image path (e.g. {paths[0]!s}); every "
                         f"sample would train and nothing could be evaluated")
    return ids[hits]


def regressor_ids(split: Split, count: int, seed: int) -> np.ndarray:
    """The images the regressors are fitted on: ``count`` of the split's regressor pool
    chosen by ``seed`` (``eval.regressor_train_count``; 0 = all of it)."""
    pool = split.train if getattr(split, "regressor", None) is None else split.regressor
    return seeded_subset(pool, count, seed)
