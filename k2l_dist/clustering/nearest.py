"""Exact nearest-centroid search with Faiss (a flat L2 index, on every visible GPU when asked).

numpy + Faiss only: it runs in the torch-free clustering actor and its shard holders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from k2l_dist.utils.backends import import_faiss

faiss = import_faiss()

GPU_TEMP_MEMORY = 1 << 30  # Faiss scratch memory per GPU (its default grows with the card)
CHUNK = 32768  # rows per search: bounds the float32 copy a strided or gathered read makes


def gpu_count() -> int:
    # faiss-cpu has no get_num_gpus on some builds; treat that as zero GPUs
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> tuple:
    """One StandardGpuResources per visible GPU, created once per process (creating them
    allocates scratch memory and CUDA handles: too slow to repeat every search)."""
    resources = []
    for _ in range(gpu_count()):
        res = faiss.StandardGpuResources()
        res.setTempMemory(GPU_TEMP_MEMORY)
        resources.append(res)
    return tuple(resources)


def flat_index(d: int, use_gpu: bool):
    """An exact L2 index: on every visible GPU (cached resources) when asked and possible."""
    index = faiss.IndexFlatL2(d)
    resources = _gpu_resources() if use_gpu and gpu_count() > 0 else ()
    if resources:
        index = faiss.index_cpu_to_gpu_multiple_py(list(resources), index)
    return index


def as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) array, got shape {x.shape}")
    return x


def nearest_centroids(read: Callable[[int, int], np.ndarray], n: int, centroids: np.ndarray,
                      use_gpu: bool = False, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of ``n`` rows that ``read(a, b)`` returns in slices: ``(labels (n,)
    int64, squared distances (n,) float32)``. Rows that are not finite are an error."""
    centroids = as_f32(centroids, "centroids")
    labels = np.zeros(n, np.int64)
    distances = np.zeros(n, np.float32)
    if n == 0:
        return labels, distances
    index = flat_index(centroids.shape[1], use_gpu)
    index.add(centroids)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = as_f32(read(a, b), "x")
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(f"dimension mismatch: x has d={x.shape[1]}, centroids d={centroids.shape[1]}")
        if not np.isfinite(x).all():
            raise ValueError(f"descriptors contain NaN or inf (rows {a}..{b - 1})")
        dist, lab = index.search(x, 1)
        labels[a:b], distances[a:b] = lab[:, 0], dist[:, 0]
    return labels, distances


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x``: ``(labels (n,) int64, sq_distances (n,) float32)``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D (n, d) array, got shape {x.shape}")
    return nearest_centroids(lambda a, b: x[a:b], x.shape[0], centroids, use_gpu)
