"""In-memory batches shaped like the loader's, for benchmarks that time compute alone."""

from __future__ import annotations

import numpy as np
import torch


def fixed_pairs(pairs: int, size: int, n_clusters: int, device: torch.device, rank: int = 0,
                per_image: int = 8):
    """A batch of ``pairs`` image pairs (identity warps, no flip) and a label table with
    ``per_image`` pseudo-labels per image, about what a round keeps."""
    from k2l_dist.training.labels import LabelTable

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
    # as the loader gives them: ids, flips and padding flags on the host, the rest on the device
    return {k: v if k in _ON_HOST else v.to(device) for k, v in batch.items()}, table


_ON_HOST = ("id", "flip0", "flip1", "valid")


def stage1_step(cfg, pairs: int, size: int, device: torch.device | None = None, memory_format: str = "contiguous",
                backend: str = ""):
    """Φ of ``cfg`` (in ``memory_format``, through ``torch.compile(backend=...)`` when one is
    named) and one real Stage-1 step on fixed pairs (``stage1_losses``, backward, RMSprop):
    returns ``(phi, batch, step)``; ``step(precision="fp32")`` trains once."""
    from k2l_dist.models import KeypointNet
    from k2l_dist.training.optim import rmsprop
    from k2l_dist.training.phases import compiled
    from k2l_dist.utils.devices import place

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    phi = place(KeypointNet(cfg.model), device, memory_format)
    opt = rmsprop(phi.parameters(), lr=cfg.stage1.lr)
    batch, table = fixed_pairs(pairs, size, cfg.cluster.M, device)
    step = stage1_update(compiled(phi, backend), opt, batch, table, cfg, torch.Generator().manual_seed(0))
    return phi, batch, step


def stage1_update(model, opt, batch: dict, table, cfg, generator: torch.Generator):
    """One real Stage-1 step of ``model`` on ``batch`` (``stage1_losses``, backward, the
    optimiser's step), called with the precision (default fp32)."""
    from k2l_dist.training.steps import autocast, stage1_losses

    def step(precision: str = "fp32") -> None:
        with autocast(batch["view0"].device, precision):
            losses = stage1_losses(model, batch, table, max_points=cfg.stage1.max_points, loss_cfg=cfg.loss,
                                   generator=generator)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
    return step
