"""The one place a device name becomes a ``torch.device``."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``auto`` → this process's GPU when CUDA is available, else the CPU; ``cuda`` without
    an index → GPU ``local_rank`` (default: ``LOCAL_RANK``, as torchrun sets it)."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank)
    elif dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def place(module: torch.nn.Module, device: torch.device, memory_format: str = "contiguous") -> torch.nn.Module:
    """``module`` on ``device`` with its 4-d weights in ``memory_format`` (``contiguous`` or
    ``channels_last``): convolutions then run, and hand on their activations, in that layout."""
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return module.to(device=device, memory_format=layout)
