"""What the multi-process tests share: torchrun launches, planted rank extractions and their
canonical form."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from k2l_dist.clustering.store import PointSet

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], timeout: float, env: dict | None = None, nproc: int = 2,
             flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` with ``nproc`` ranks, from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *flags, *args]
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun_started(args: list[str], log: Path, env: dict | None = None, nproc: int = 2,
                     flags: tuple[str, ...] = ()) -> subprocess.Popen:
    """:func:`torchrun` in the background, stdout and stderr into ``log``: runs that do not
    depend on each other overlap their start-up and waits."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *flags, *args]
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True)


def planted_parts(n_parts: int, seed: int = 0, n_images: int = 60, K: int = 4, d: int = 16,
                  shuffle: bool = True) -> list[dict[str, np.ndarray]]:
    """Rank extractions: every image shows K landmarks (descriptor = noisy prototype) plus a
    background point; images are dealt to ``n_parts`` ranks at random."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(K + 1, d)).astype(np.float32)
    owner = rng.integers(0, n_parts, n_images) if shuffle else np.arange(n_images) % n_parts
    parts = []
    for p in range(n_parts):
        ids = np.flatnonzero(owner == p)
        if shuffle:
            ids = rng.permutation(ids)
        which = np.tile(np.arange(K + 1), len(ids))
        desc = protos[which] + 0.1 * rng.normal(size=(len(which), d)).astype(np.float32)
        fdesc = protos[which] + 0.1 * rng.normal(size=(len(which), d)).astype(np.float32)
        norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
        parts.append({"image_ids": np.repeat(ids, K + 1).astype(np.int64),
                      "points": np.stack([which * 7.0, rng.uniform(0, 40, len(which))], 1).astype(np.float32),
                      "scores": rng.uniform(0.1, 1, len(which)).astype(np.float32),
                      "descriptors": norm(desc), "flipped_descriptors": norm(fdesc),
                      "sample_ids": ids.astype(np.int64)})
    return parts


def canonical(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The parts' points in canonical order as plain arrays (descriptors read from the store)."""
    points = PointSet.from_parts(parts)
    out = {"image_ids": points.image_ids, "points": points.points, "scores": points.scores,
           "sample_ids": points.sample_ids, "descriptors": points.rows(np.arange(points.n))}
    if points.has_flipped:
        out["flipped_descriptors"] = points.rows(np.arange(points.n), mirrored=True)
    return out
