"""What the clustering actor and its shard holders ask Ray for, checked before they are created.

Each asks for the CPUs its Faiss runs on (``cluster.actor_cpus``; 0 = a share of the
free CPUs of the nodes that can host it), a GPU when ``cluster.use_gpu``, the memory of
``cluster.actor_memory_gb`` and a share of ``cluster.actor_resource``: a custom
resource only some nodes offer (cluster.yaml's clustering nodes), asked for in a small
share so that the actor and its holders can all sit on those nodes. An actor no node
could ever host fails here at once, naming what is missing and the key to change,
instead of waiting unscheduled until a round times out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from k2l_dist.config import ClusterConfig

RESOURCE_SHARE = 0.001  # of cluster.actor_resource per actor: pins it to the nodes offering it, uses none up
_KEYS = {"CPU": "cluster.actor_cpus", "GPU": "cluster.use_gpu", "memory": "cluster.actor_memory_gb"}


class Unplaceable(RuntimeError):
    """No node of the Ray cluster can host a clustering actor; the message names the resource and key."""


@dataclass(frozen=True)
class Placement:
    """One actor's Ray options, and the CPUs it was given (its Faiss threads: the whole ones)."""

    options: dict[str, Any]
    cpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def demand(cfg: ClusterConfig, cpus: float) -> dict[str, float]:
    """The Ray resources one clustering actor asks for with ``cpus`` CPUs."""
    need = {"CPU": float(cpus)}
    if cfg.use_gpu:
        need["GPU"] = 1.0
    if cfg.actor_memory_gb > 0:
        need["memory"] = float(cfg.actor_memory_gb) * 1e9
    if cfg.actor_resource:
        need[cfg.actor_resource] = RESOURCE_SHARE
    return need


def nodes() -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Alive node id → (total, available) resources."""
    import ray
    from ray._private import state

    total = {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")}
    try:
        available = state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - an API Ray keeps private: fall back to the totals
        available = total
    return {nid: (res, dict(available.get(nid, {}))) for nid, res in total.items()}


def _describe(value: float, resource: str) -> str:
    return f"{value / 1e9:.0f} GB" if resource == "memory" else f"{value:g}"


def _why_nowhere(cfg: ClusterConfig, need: dict[str, float], cluster: dict) -> str:
    """The first resource of ``need`` that no node offers enough of, said with its config key."""
    offered = sorted({r for tot, _ in cluster.values() for r in tot if not r.startswith("node:")})
    for resource, amount in need.items():
        best = max((tot.get(resource, 0.0) for tot, _ in cluster.values()), default=0.0)
        if best < amount:
            key = _KEYS.get(resource, "cluster.actor_resource")
            if resource == cfg.actor_resource:
                return (f"{key}={resource}: no node of the Ray cluster offers this resource (they offer "
                        f"{', '.join(offered)}); start a node with it (cluster.yaml: the clustering node type) "
                        f"or clear {key}")
            return (f"{key}: the clustering actor needs {resource} {_describe(amount, resource)} but the largest "
                    f"node{' that also offers the rest' if len(need) > 1 else ''} has "
                    f"{_describe(best, resource)}; lower {key} or add a larger node")
    return (f"no single node offers all of {need} together (nodes: "
            f"{[{r: v for r, v in tot.items() if not r.startswith('node:')} for tot, _ in cluster.values()]})")


def _fits(have: dict[str, float], need: dict[str, float]) -> bool:
    return all(have.get(r, 0.0) >= v - 1e-9 for r, v in need.items())


def place(cfg: ClusterConfig, count: int = 1, wait_s: float = 30.0) -> list[Placement]:
    """Ray options for ``count`` clustering actors (one: the actor; more: shard holders).

    Fails at once when no node could ever host one (the message names the resource and
    key); waits up to ``wait_s`` while the nodes that could are busy. With
    ``cluster.actor_cpus`` 0 the actors share the free CPUs of the nodes able to host
    them (spread over those nodes, pinned there); otherwise each gets that many.
    """
    fixed = int(cfg.actor_cpus)
    deadline = time.monotonic() + wait_s
    while True:
        cluster = nodes()
        need = demand(cfg, fixed or 0.01)
        able = [nid for nid, (tot, _) in cluster.items() if _fits(tot, demand(cfg, max(fixed, 1)))]
        if not able:
            raise Unplaceable(_why_nowhere(cfg, demand(cfg, max(fixed, 1)), cluster))
        free = {nid: cluster[nid][1] for nid in able if _fits(cluster[nid][1], need)}
        room = sum(int(f.get("CPU", 0.0) // fixed) for f in free.values()) if fixed else len(free)
        if room >= (count if fixed else 1):
            break
        if time.monotonic() > deadline:
            busy = ", ".join(f"node {nid[:8]}: {cluster[nid][1].get('CPU', 0):g} CPU free" for nid in able)
            raise Unplaceable(f"the nodes that can host {count} clustering actor(s) of {need} are busy after "
                              f"{wait_s:.0f} s ({busy}); free them, lower cluster.actor_cpus or cluster.shards")
        time.sleep(1.0)
    if fixed:
        return [Placement(_options(cfg, fixed), fixed) for _ in range(count)]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ranked = sorted(free, key=lambda nid: -free[nid].get("CPU", 0.0))
    hosts = [ranked[i % len(ranked)] for i in range(count)]
    out = []
    for nid in hosts:
        cpus = max(0.01, int(100 * free[nid].get("CPU", 0.0) / hosts.count(nid)) / 100)
        options = _options(cfg, cpus)
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nid, soft=False)
        out.append(Placement(options, cpus))
    return out


def _options(cfg: ClusterConfig, cpus: float) -> dict[str, Any]:
    need = demand(cfg, cpus)
    options: dict[str, Any] = {"num_cpus": need.pop("CPU"), "num_gpus": need.pop("GPU", 0.0)}
    if "memory" in need:
        options["memory"] = need.pop("memory")
    if need:
        options["resources"] = need
    return options
