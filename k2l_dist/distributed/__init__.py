"""One `enable()` that every entry point calls: single process, or torchrun's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; without them this is a
single-process run. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def enable(device: str = "auto") -> DistInfo:
    """Initialise the process group if launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate per-rank numpy arrays (same keys, any first-axis length) over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    gathered: list = [None] * dist.get_world_size()
    # Arrays produced by our own processes within one job: object gather is fine here.
    dist.all_gather_object(gathered, arrays)
    return {k: np.concatenate([g[k] for g in gathered]) for k in arrays}
