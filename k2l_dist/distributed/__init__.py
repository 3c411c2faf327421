"""One `enable()` for every entry point: single process, or torchrun's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR; without
them this is a single-process run. NCCL carries gradients on GPUs, gloo on CPUs; a gloo
group always carries control messages and host arrays (pseudo-labels, statistics).
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from k2l_dist.config import DistConfig
from k2l_dist.distributed import watchdog
from k2l_dist.distributed.lifetime import die_with_parent
from k2l_dist.distributed.threads import pin_threads
from k2l_dist.utils.devices import resolve_device

_host_group = None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    threads: int
    node_rank: int = 0  # torchrun's GROUP_RANK: which node of the job this process runs on
    host: str = field(default_factory=socket.gethostname)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_node(self) -> bool:
        return self.world_size == self.local_world_size

    @property
    def where(self) -> str:
        """This rank's place in words, for messages: ``rank 1 (node 1, host gpu-3)``."""
        return f"rank {self.rank} (node {self.node_rank}, host {self.host})"


def enable(cfg: DistConfig | None = None, device: str = "auto") -> DistInfo:
    """Pin threads, pick this rank's device, join the process group and start the watchdog
    (which publishes this rank's liveness and watches the others')."""
    cfg = cfg or DistConfig()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: it must not outlive its agent
        die_with_parent()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    threads = pin_threads(cfg.threads)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here (use device=cpu or auto)")
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world_size, local_rank, local_world, dev, threads,
                    node_rank=int(os.environ.get("GROUP_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        global _host_group
        # the watchdog (at timeout_s) speaks first and names the silent rank; collectives are the backstop
        timeout = timedelta(seconds=cfg.timeout_s + max(60.0, 0.1 * cfg.timeout_s))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        _join(backend, rank, world_size, dev, timedelta(seconds=min(cfg.join_timeout_s, timeout.total_seconds())),
              _attempt_store(timeout))
        _set_pg_timeout(timeout)  # joined: from now on the collectives' own timeout
        _host_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        atexit.register(shutdown)
    watchdog.start(rank, world_size, cfg.timeout_s, _default_store() if world_size > 1 else None,
                   where={"node": info.node_rank, "host": info.host})
    return info


def _join(backend: str, rank: int, world_size: int, dev: torch.device, within: timedelta, store) -> None:
    """The process group, formed within ``within``: a rank that failed at its start on another
    node must not keep this one waiting for the collectives' long timeout."""
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=within,
                                device_id=dev if dev.type == "cuda" else None, store=store)
    except (RuntimeError, TimeoutError) as err:
        raise watchdog.PeerLost(f"rank {rank}: not every rank of the job joined within dist.join_timeout_s="
                                f"{within.total_seconds():.0f} s (a rank on another node may have failed at its "
                                f"start: see that node's output; {str(err).splitlines()[0][:160]})") from None


def _default_store():
    """The process group's store, where ranks publish their heartbeats (None if unreachable)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except (ImportError, RuntimeError):
        return None


def _attempt_store(timeout: timedelta):
    """Under torchrun restarts, a store whose keys are this attempt's own.

    torchrun's workers share the agent's TCPStore across restarts; without a prefix per
    attempt, a restarted rank can read the address a dead rank published before (gloo:
    "Connection refused" at start). None: let init_process_group use the environment.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"k2l/attempt{restart}", base)


_COLLECTIVE_FAILURES = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                        "socket", "peer")


def is_collective_error(err: BaseException) -> bool:
    """Whether ``err`` looks like a collective that failed because another rank went away."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in _COLLECTIVE_FAILURES)


def host_group():
    """The gloo group for control messages and host arrays (None when not distributed)."""
    return _host_group if dist.is_initialized() else None


def shutdown() -> None:
    """Leave the process group (idempotent; also registered at exit)."""
    global _host_group
    watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_host_group)


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes train, else itself.

    Gradients are averaged over ranks; the wrapper is only for training steps (extraction,
    checkpoints and evaluation use the module itself).
    """
    if info.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
