"""In-memory batches shaped like the loader's, for benchmarks that time compute alone."""

from __future__ import annotations

import numpy as np
import torch


def fixed_pairs(pairs: int, size: int, n_clusters: int, device: torch.device, rank: int = 0,
                per_image: int = 8):
    """A batch of ``pairs`` image pairs (identity warps, no flip) and a label table with
    ``per_image`` pseudo-labels per image, about what a round keeps."""
    from k2l_dist.train.labels import LabelTable

    rng = np.random.default_rng(rank)
    ids = np.arange(pairs) + rank * pairs
    table = LabelTable.from_points(np.repeat(ids, per_image), rng.uniform(4, size - 4, (pairs * per_image, 2)),
                                   rng.integers(0, n_clusters, pairs * per_image))
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(pairs, 2, 3).contiguous()
    gen = torch.Generator().manual_seed(rank)
    batch = {"view0": torch.rand(pairs, 3, size, size, generator=gen),
             "view1": torch.rand(pairs, 3, size, size, generator=gen), "matrix0": eye, "matrix1": eye,
             "flip0": torch.zeros(pairs, dtype=torch.bool), "flip1": torch.zeros(pairs, dtype=torch.bool),
             "id": torch.from_numpy(ids), "valid": torch.ones(pairs, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}, table
