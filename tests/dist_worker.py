"""Checks that need real ranks: run as ``torchrun --nproc-per-node 2 tests/dist_worker.py CHECK OUT_DIR``.

Each check writes what it saw into OUT_DIR (rank 0, or per rank) for the calling test.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from k2l_dist import distributed
from k2l_dist.config import DistConfig, ModelConfig


def tiny_model() -> torch.nn.Module:
    from k2l_dist.models import KeypointNet

    torch.manual_seed(0)
    return KeypointNet(ModelConfig(width=16, depth=2, descriptor_dim=8, groups=4))


def fixed_batch(n: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, size, size, generator=g)
    points = torch.rand(n, 5, 2, generator=g) * (size / 4 - 1)
    valid = torch.ones(n, 5, dtype=torch.bool)
    return images, points, valid


def detector_grads(model: torch.nn.Module, images, points, valid, forward=None) -> dict[str, torch.Tensor]:
    """Gradients of a batch-mean loss on both heads; ``forward`` (e.g. the DDP wrapper) runs the batch."""
    from k2l_dist.loss import detector_loss

    heat, desc = (forward or model)(images)
    (detector_loss(heat, points, valid, 1.0) + desc.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_ddp_grads(info, out: Path) -> None:
    """Each rank takes its half of a fixed batch through DDP; rank 0 saves the averaged grads."""
    model = tiny_model().to(info.device)
    ddp = distributed.wrap_ddp(model, info)
    images, points, valid = (t.to(info.device) for t in fixed_batch())
    half = slice(info.rank * 2, info.rank * 2 + 2)
    grads = detector_grads(model, images[half], points[half], valid[half], forward=ddp)
    if info.is_main:
        torch.save({k: v.cpu() for k, v in grads.items()}, out / "ddp_grads.pt")


def check_collectives(info, out: Path) -> None:
    from k2l_dist.distributed import collectives

    rng = np.random.default_rng(info.rank)
    mine = {"a": rng.normal(size=(3 + info.rank, 4)).astype(np.float32), "b": np.arange(info.rank + 2)}
    parts = collectives.gather_to_main(mine)
    if info.is_main:
        assert [p["a"].shape for p in parts] == [(3, 4), (4, 4)]
        assert np.array_equal(parts[1]["b"], np.arange(3))
        assert np.array_equal(parts[1]["a"], np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32))
    got = collectives.broadcast_arrays(mine if info.is_main else None)
    assert np.array_equal(got["a"], np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    assert collectives.broadcast_json({"x": [1, 2]} if info.is_main else None) == {"x": [1, 2]}
    assert collectives.mean_over_ranks({"loss": float(info.rank)}) == {"loss": 0.5}
    assert collectives.max_over_ranks(float(info.rank)) == 1.0
    assert not collectives.all_ranks_true(info.rank == 0)
    model = tiny_model()
    collectives.check_replicas(model, "when equal")
    if info.rank == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
    try:
        collectives.check_replicas(model, "after a nudge")
        diverged = ""
    except RuntimeError as err:
        diverged = str(err)
    (out / f"collectives_rank{info.rank}.json").write_text(json.dumps({"diverged": diverged}))


def check_inline_service(info, out: Path) -> None:
    """Every rank gets the labels that clustering all parts in one process gives."""
    from k2l_dist.clustering.rounds import recover
    from k2l_dist.clustering.service import InlineService
    from k2l_dist.clustering.store import PointSet
    from k2l_dist.config import ClusterConfig
    from tests.processes import planted_parts

    cfg = ClusterConfig(K=4, M=8, nredo=2)
    parts = planted_parts(2)
    labels = InlineService(cfg, info.world_size).recover("round", parts[info.rank], "round1")
    expected = recover("round", PointSet.from_parts(parts), cfg)
    for key, value in expected.arrays().items():
        assert np.array_equal(value, labels.arrays()[key]), key
    (out / f"inline_rank{info.rank}.json").write_text(json.dumps(labels.stats))


CHECKS = {"ddp_grads": check_ddp_grads, "collectives": check_collectives, "inline_service": check_inline_service}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    name, out_dir = sys.argv[1], Path(sys.argv[2])
    import os

    info = distributed.enable(DistConfig(threads=1, timeout_s=60), os.environ.get("K2L_TEST_DEVICE", "cpu"))
    try:
        CHECKS[name](info, out_dir)
        dist.barrier()
    finally:
        distributed.shutdown()
