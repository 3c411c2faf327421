"""Host-side collectives over the gloo group: raw tensors, never pickled objects.

Arrays travel as a small int64 header (dtype code, shape) followed by their bytes, so a
rank can only ever receive numbers, and nothing is staged in GPU memory.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from k2l_dist.distributed import host_group

_DTYPES = [np.dtype(t) for t in ("float32", "float64", "int64", "int32", "uint8", "bool")]
_MAX_DIMS = 4


def _header(array: np.ndarray) -> torch.Tensor:
    if array.dtype not in _DTYPES or array.ndim > _MAX_DIMS:
        raise TypeError(f"cannot send array of dtype {array.dtype} with {array.ndim} dims")
    shape = list(array.shape) + [0] * (_MAX_DIMS - array.ndim)
    return torch.tensor([_DTYPES.index(array.dtype), array.ndim, *shape], dtype=torch.int64)


def _empty_from(header: torch.Tensor) -> np.ndarray:
    code, ndim, *shape = header.tolist()
    return np.empty(shape[:ndim], dtype=_DTYPES[code])


def _payload(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def send_array(array: np.ndarray, dst: int) -> None:
    dist.send(_header(array), dst, group=host_group())
    if array.size:
        dist.send(_payload(array), dst, group=host_group())


def recv_array(src: int) -> np.ndarray:
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64)
    dist.recv(header, src, group=host_group())
    out = _empty_from(header)
    if out.size:
        dist.recv(_payload(out), src, group=host_group())  # receives into out's memory
    return out


def gather_to_main(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
    """Rank 0 gets every rank's ``arrays`` (same keys on all ranks), in rank order; others get None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    keys = sorted(arrays)
    if rank != 0:
        for key in keys:
            send_array(np.asarray(arrays[key]), 0)
        return None
    parts = [dict(arrays)]
    for src in range(1, world):
        parts.append({key: recv_array(src) for key in keys})
    return parts


def broadcast_bytes(data: bytes | None) -> bytes:
    """``data`` from rank 0 to every rank."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, 0, group=host_group())
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    if int(size):
        dist.broadcast(buf, 0, group=host_group())
    return bytes(buf.numpy())


def broadcast_json(value: Any = None) -> Any:
    """A JSON-serialisable value from rank 0 to every rank (strings, numbers, lists, dicts)."""
    data = json.dumps(value).encode() if dist.get_rank() == 0 else None
    return json.loads(broadcast_bytes(data).decode())


def broadcast_arrays(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Rank 0's ``arrays`` on every rank."""
    rank = dist.get_rank()
    keys = broadcast_json(sorted(arrays) if rank == 0 else None)
    out = {}
    for key in keys:
        header = _header(np.asarray(arrays[key])) if rank == 0 else torch.empty(2 + _MAX_DIMS, dtype=torch.int64)
        dist.broadcast(header, 0, group=host_group())
        target = np.ascontiguousarray(arrays[key]) if rank == 0 else _empty_from(header)
        if target.size:
            dist.broadcast(_payload(target), 0, group=host_group())
        out[key] = target
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over ranks (one all-reduce); identity when not distributed."""
    if not dist.is_initialized() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=host_group())
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return float(t.item())


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t, group=host_group())
    return int(t.item()) == 0


def check_replicas(module: torch.nn.Module, where: str) -> float:
    """Raise unless every rank holds the same parameters; returns this rank's checksum.

    The checksum (float64 sum and sum of squares of every parameter and buffer) is
    cheap and catches any rank that trained another model.
    """
    total = torch.zeros(2, dtype=torch.float64)
    for tensor in list(module.parameters()) + list(module.buffers()):
        t = tensor.detach().to("cpu", torch.float64)
        total += torch.stack([t.sum(), t.square().sum()])
    if not dist.is_initialized():
        return float(total[0])
    gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total, group=host_group())
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        sums = ", ".join(f"rank {r}: {g[0].item():.10g}" for r, g in enumerate(gathered))
        raise RuntimeError(f"replicas diverged {where}: parameter checksums {sums}")
    return float(total[0])


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    data = json.dumps(value).encode()
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=host_group())
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    got = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(got, mine, group=host_group())
    return [json.loads(bytes(g[:int(s)].numpy()).decode()) for g, s in zip(got, sizes)]
