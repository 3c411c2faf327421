"""Ray for a torchrun job: every rank joins the same Ray cluster.

Rank 0 joins ``RAY_ADDRESS`` when it is set, else starts a local Ray (no dashboard,
bounded object store, usage stats off) that it stops at the end; the other ranks join
the address rank 0 sends them over the gloo group.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from k2l_dist.config import ClusterConfig

log = logging.getLogger(__name__)

NAMESPACE = "k2l"


class RayUnavailable(RuntimeError):
    """Ray could not be joined or started; the message names the address tried."""


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def connect(cfg: ClusterConfig, rank: int, single_node: bool, timeout_s: float = 60.0) -> bool:
    """Join (or, on rank 0 without ``RAY_ADDRESS``, start) Ray; True when this process started it.
    Joining an address that does not answer within ``timeout_s`` fails, naming it."""
    import torch.distributed as dist

    from k2l_dist.distributed import collectives

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    distributed = dist.is_initialized()
    address = os.environ.get("RAY_ADDRESS", "")
    started = False
    if rank == 0:
        import ray

        if address:
            _join(ray, address, timeout_s)
        else:
            if not single_node:
                raise RayUnavailable("cluster.service=ray across several nodes needs RAY_ADDRESS (a Ray cluster "
                                     "every node has joined), or cluster.service=inline")
            store = int(cfg.object_store_gb * 1e9) if cfg.object_store_gb > 0 else int(0.3 * _memory_bytes())
            from k2l_dist.distributed.threads import available_cores

            ray.init(num_cpus=available_cores(), include_dashboard=False, object_store_memory=store,
                     namespace=NAMESPACE, log_to_driver=True, configure_logging=False)
            address = ray.get_runtime_context().gcs_address
            started = True
    if distributed:
        # A local Ray turns token authentication on for rank 0's process (the token is in
        # ~/.ray/auth_token, shared by the ranks of this node); the others must ask for it too.
        sent = collectives.broadcast_json({"address": address, "auth": os.environ.get("RAY_AUTH_MODE")}
                                          if rank == 0 else None)
        if rank != 0:
            if sent["auth"] and "RAY_AUTH_MODE" not in os.environ:
                os.environ["RAY_AUTH_MODE"] = sent["auth"]  # read once, when ray is imported
            import ray

            _join(ray, sent["address"], timeout_s)
    return started


def _join(ray, address: str, timeout_s: float) -> None:
    """``ray.init(address)``, bounded: Ray itself retries an address that does not answer for ever."""
    _answers(address, timeout_s)
    done: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
            done.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            done.append(err)

    worker = threading.Thread(target=init, name="k2l-ray-join", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not done:
        raise RayUnavailable(f"cannot join the Ray cluster at {address!r} (RAY_ADDRESS): no answer within "
                             f"{timeout_s:.0f} s (dist.timeout_s); is the head running, and its port open?")
    if isinstance(done[0], (ConnectionError, RuntimeError, ValueError)):
        raise RayUnavailable(f"cannot join the Ray cluster at {address!r} (RAY_ADDRESS): {done[0]}") from None
    if done[0] is not None:
        raise done[0]


def _answers(address: str, timeout_s: float) -> None:
    """A TCP connection to the GCS at ``address`` (host:port), tried for up to ``timeout_s``."""
    if address == "auto" or "://" in address:  # Ray finds these itself
        return
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except ValueError:
            raise RayUnavailable(f"RAY_ADDRESS={address!r} is not HOST:PORT") from None
        except OSError as err:
            if time.monotonic() > deadline:
                raise RayUnavailable(f"cannot join the Ray cluster at {address!r} (RAY_ADDRESS): nothing "
                                     f"answers there ({err.strerror or err}) within {timeout_s:.0f} s "
                                     f"(dist.timeout_s)") from None
            time.sleep(1.0)


def disconnect() -> None:
    """Leave Ray; in the process that started a local Ray this also stops it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
