"""The driver of a Ray job that trains on several nodes: ``launch/ray_submit.sh`` submits it.

A Ray job's entrypoint runs on the head node only. This driver reserves a placement
group of one bundle per node (CPUs and GPUs for that node's ranks), starts one launcher
actor in each bundle, and each launcher runs ``torchrun`` on its node: node rank = the
bundle index, c10d rendezvous at bundle 0's address. The ranks join the job's Ray
cluster (``RAY_ADDRESS``) for the clustering actor, which goes to the nodes offering the
``k2l_cluster`` resource when some do (cluster.yaml's clustering nodes). Every torchrun
starts in the job's working directory (where ``launch/ray_submit.sh`` ships the config)
or in ``--cwd``; the job fails when any node's torchrun does, naming the node that
failed first.

    python -m k2l_dist.distributed.ray_launch --nodes 2 --nproc-per-node 8 --gpus-per-node 8 \\
        -- configs/celeba.yaml run_dir=/shared/runs/celeba
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import uuid

from k2l_dist.distributed.lifetime import die_with_parent
from k2l_dist.utils.processes import exit_description

CLUSTER_RESOURCE = "k2l_cluster"
# Ray streams each node's output to this driver from its log files a moment after it is
# written, so a node's last lines (the metrics, or the error naming a lost rank) can arrive
# after its torchrun has ended: the driver waits this long for them before the summary.
LOG_GRACE_S = 3.0


class NodeLauncher:
    """Runs torchrun on the node of its bundle; its output goes to the job's log."""

    def address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def run(self, command: list[str], env: dict[str, str], cwd: str = "") -> dict:
        """torchrun's exit code and when it ended; ``cwd`` (``~`` expanded on this node)
        defaults to the actor's own directory: the job's working directory, where the
        config shipped with the job lies."""
        folder = os.path.expanduser(cwd) if cwd else os.getcwd()
        print(f"[{self.address()}] in {folder}: {' '.join(command)}", flush=True)
        try:
            code = subprocess.run(command, env={**os.environ, **env}, cwd=folder,
                                  preexec_fn=die_with_parent).returncode  # no torchrun outlives its launcher
        except OSError as err:  # no such folder on this node, no python: the node's own failure
            print(f"[{self.address()}] cannot start torchrun in {folder}: {err}", flush=True)
            code = 2
        return {"code": code, "ended": time.time(), "ip": self.address()}


def torchrun_command(node_rank: int, nodes: int, nproc: int, endpoint: str, run_id: str, max_restarts: int,
                     train_args: list[str]) -> list[str]:
    """The torchrun command of one node (``--standalone`` when the job has one node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        # is_host: node 0 serves the rendezvous store, whatever its host name resolves to
        cmd += [f"--nnodes={nodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", f"--rdzv-conf=is_host={int(node_rank == 0)}"]
    return [*cmd, "-m", "k2l_dist.cli", "train", *train_args]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m k2l_dist.distributed.ray_launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs reserved per node bundle")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--run-id", default="")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the placement group")
    p.add_argument("--cwd", default="", help="folder torchrun starts in on every node (~ expanded there; "
                                             "default: the job's working directory)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- CONFIG [key=value ...] for `k2l train`")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"] if args.train_args[:1] == ["--"] else args.train_args
    if not args.train_args:
        p.error("give the `k2l train` arguments after --, e.g. -- configs/quickstart.yaml")
    if args.nodes < 1 or args.nproc_per_node < 1:
        p.error("--nodes and --nproc-per-node must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init()  # inside `ray job submit`: the job's cluster
    bundle = {"CPU": args.cpus_per_node}
    if args.gpus_per_node:
        bundle["GPU"] = args.gpus_per_node
    # One bundle per node: STRICT_SPREAD puts no two bundles on one node.
    pg = placement_group([dict(bundle) for _ in range(args.nodes)],
                         strategy="STRICT_SPREAD" if args.nodes > 1 else "PACK")
    try:
        ray.get(pg.ready(), timeout=args.timeout)
    except ray.exceptions.GetTimeoutError:
        print(f"error: no placement for {args.nodes} node(s) × {bundle} within {args.timeout:.0f} s; "
              f"cluster has {ray.cluster_resources()}", file=sys.stderr)
        return 2
    try:
        launchers = [ray.remote(NodeLauncher).options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        ).remote() for i in range(args.nodes)]
        host = ray.get(launchers[0].address.remote())
        endpoint = f"{host}:{ray.get(launchers[0].free_port.remote())}"
        extra = []
        if ray.cluster_resources().get(CLUSTER_RESOURCE, 0) > 0 and not any(
                a.startswith("cluster.actor_resource=") for a in args.train_args):
            extra.append(f"cluster.actor_resource={CLUSTER_RESOURCE}")
        env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_USAGE_STATS_ENABLED": "0"}
        if os.environ.get("RAY_AUTH_MODE"):
            env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
        run_id = args.run_id or f"k2l-{uuid.uuid4().hex[:8]}"
        results = ray.get([launcher.run.remote(
            torchrun_command(i, args.nodes, args.nproc_per_node, endpoint, run_id, args.max_restarts,
                             [*args.train_args, *extra]), env, args.cwd) for i, launcher in enumerate(launchers)])
    finally:
        remove_placement_group(pg)
    time.sleep(LOG_GRACE_S)
    print(f"node exit codes: {[r['code'] for r in results]}")
    failed = failed_nodes(results)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 0 if not failed else 1


def failed_nodes(results: list[dict]) -> list[str]:
    """One line per node whose torchrun did not succeed, the first to end first."""
    bad = sorted((r["ended"], i, r) for i, r in enumerate(results) if r["code"] != 0)
    lines = []
    for n, (_, i, r) in enumerate(bad):
        code = r["code"]
        first = " (first to fail)" if n == 0 and len(bad) > 1 else ""
        lines.append(f"node {i} ({r['ip']}): torchrun {exit_description(code)}{first}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
