"""Several machines, on one machine: two torchrun agents, and a Ray cluster of two raylets.

Each torchrun agent runs as a node of its own (``--nnodes 2``, c10d rendezvous on
127.0.0.1), pinned to its own core, in its own working directory with its own
node-local folders; the Ray cluster is two ``ray start`` processes with distinct
resources, started from a folder outside the repository. Slow: whole (tiny) jobs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 240,
               ) -> tuple[list[int], list[str], float]:
    """``k2l train CONFIG *args`` as two torchrun nodes, node R in ``tmp_path/nodeR`` on core R:
    (exit codes, outputs, seconds until both ended)."""
    port = _free_port()
    procs, logs = [], []
    t0 = time.monotonic()
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        log = open(cwd / "out.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=t{port}", f"--rdzv-conf=is_host={int(node == 0)}", "-m", "k2l_dist.cli", "train",
               CONFIG, *TINY, *args]
        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
            cmd = ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[node]), *cmd]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env={**ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    seconds = time.monotonic() - t0
    return codes, [(tmp_path / f"node{n}" / "out.log").read_text() for n in (0, 1)], seconds


def _errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_train_on_node_local_shards_and_refuse_a_per_node_run_dir(tmp_path):
    run_dir = tmp_path / "run"  # shared: both "nodes" see it
    codes, outs, _ = two_agents(tmp_path, f"run_dir={run_dir}", "data.shards=shards", "data.local_shards=true",
                                "stage1.rounds=1", "dist.timeout_s=30")
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "forward_nme" in metrics
    # each node prepared its own copy (relative path: its own working directory), the same data
    indexes = [json.loads((tmp_path / f"node{n}" / "shards" / "index.json").read_text()) for n in (0, 1)]
    assert indexes[0]["digest"] == indexes[1]["digest"] and indexes[0]["num_samples"] == 120
    assert all("prepared 120 of 120 images" in out for out in outs)
    # the saved config holds absolute paths: what every node meant
    saved = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in saved and "shards: /" in saved

    # run_dir relative: each node's own folder, so the job stops at once, naming it
    codes, outs, seconds = two_agents(tmp_path, "run_dir=run", "data.shards=shards", "data.local_shards=true",
                                      "dist.timeout_s=30")
    assert codes[0] != 0 and codes[1] != 0 and seconds < 60
    # torchrun numbers the nodes in the order they join: either folder may be rank 0's
    lines = [_errors(out) for out in outs]
    assert lines[0] == lines[1] and len(lines[0]) == 1, outs
    assert any(lines[0][0].startswith(f"error: run_dir={tmp_path / f'node{n}' / 'run'} is not shared by every "
                                      f"node: node 1 (host ") and f"run_dir={tmp_path / f'node{1 - n}' / 'run'})"
               in lines[0][0] for n in (0, 1)), lines[0]
    assert not list(tmp_path.glob("node*/run/checkpoint.pt"))


KILLED_TIMEOUT_S = 30  # dist.timeout_s of the job whose rank is killed


def _ended(where: Path, *args: str, env: dict | None = None) -> tuple[list[int], list[str], float, float]:
    """:func:`two_agents` and the wall-clock time it returned at."""
    codes, outs, seconds = two_agents(where, *args, env=env)
    return codes, outs, seconds, time.time()


@pytest.fixture(scope="module")
def failing_jobs(tmp_path_factory) -> dict[str, tuple[Path, tuple]]:
    """The two-node jobs that must fail, run at the same time: each only waits on its own
    two agents. Name → (its folder, :func:`_ended` of it)."""
    from k2l_dist.config import load_config
    from k2l_dist.prepare import prepare

    where = {name: tmp_path_factory.mktemp(name) for name in ("no_data", "no_join", "killed")}
    shards = where["no_data"] / "node0" / "shards"
    shards.parent.mkdir()
    prepare(load_config(CONFIG, TINY), shards)  # node 0 has data.shards, node 1 does not
    jobs = {
        "no_data": ([f"run_dir={where['no_data'] / 'run'}", "data.shards=shards", "dist.timeout_s=30"], None),
        "no_join": ([f"run_dir={where['no_join'] / 'run'}", "dist.join_timeout_s=20"], {"K2L_FAULT": "start@rank1"}),
        "killed": ([f"run_dir={where['killed'] / 'run'}", "data.shards=shards", "data.local_shards=true",
                    "stage1.rounds=2", f"dist.timeout_s={KILLED_TIMEOUT_S}"], {"K2L_FAULT": "kill:round1:3@rank1"}),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        running = {name: pool.submit(_ended, where[name], *args, env=env) for name, (args, env) in jobs.items()}
        return {name: (where[name], job.result()) for name, job in running.items()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_without_the_data_ends_both_nodes_within_a_minute_naming_it(failing_jobs):
    tmp_path, (codes, outs, seconds, _) = failing_jobs["no_data"]
    assert codes[0] != 0 and codes[1] != 0 and seconds < 60, outs
    for out in outs:
        (line,) = _errors(out)
        assert f"data.shards={tmp_path / 'node1' / 'shards'}: not a prepared shard folder" in line
        assert "(node 0, host" in line or "(node 1, host" in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_whose_peer_failed_before_joining_ends_within_the_join_timeout(failing_jobs):
    _, (codes, outs, seconds, _) = failing_jobs["no_join"]
    assert codes[0] != 0 and codes[1] != 0 and seconds < 60, outs
    lines = [ln for out in outs for ln in _errors(out)]
    assert any("not every rank of the job joined within dist.join_timeout_s=20 s" in ln for ln in lines), outs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_killed_on_node_1_ends_the_job_within_the_timeout_naming_it(failing_jobs):
    timeout_s = KILLED_TIMEOUT_S
    tmp_path, (codes, outs, _, ended) = failing_jobs["killed"]
    assert codes[0] != 0 and codes[1] != 0, outs  # rank 1 SIGKILLed, no restart: both nodes end
    lines = [ln for out in outs for ln in _errors(out)]  # from the node that held rank 0
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 (node ") and " is gone: " in lines[0], outs
    killed = (tmp_path / "run" / ".fault-kill-round1-3-rank1").stat().st_mtime  # written just before the kill
    assert ended - killed < timeout_s + 30


# --------------------------------------------------------------------------- Ray: two raylets


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head raylet offering k2l_cluster (3 CPUs, the job server) and a worker raylet (2 CPUs),
    started from a folder outside the repository; stopped afterwards."""
    where = tmp_path_factory.mktemp("raycluster")
    token = where / "auth_token"  # the cluster's own token: no ~/.ray/auth_token needed, none touched
    token.write_text(secrets.token_hex(32))
    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    common = ["--object-store-memory=300000000", "--disable-usage-stats"]
    head = ["ray", "start", "--head", f"--port={port}", "--num-cpus=3", '--resources={"k2l_cluster": 1}',
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    worker = ["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=2"]
    try:
        for cmd in (head, worker):
            # every agent port chosen here: two raylets on one machine must not share one
            ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                     f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
            res = subprocess.run([*cmd, *ports, *common], cwd=where, env=env, capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stderr[-2000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "env": env, "cwd": where}
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(cluster: dict, run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.Popen:
    cmd = [str(ROOT / "launch" / "ray_submit.sh"), "--address", cluster["address"], "--nodes", "2", "--", CONFIG,
           *TINY, f"run_dir={run_dir}", "dist.threads=1", "dist.timeout_s=30", *extra]
    return subprocess.Popen(cmd, cwd=cluster["cwd"], env=cluster["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _node_with(cluster: dict, resource: str) -> str:
    code = (f"import ray; ray.init(address={cluster['gcs']!r}, log_to_driver=False); "
            f"print([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get({resource!r})][0])")
    res = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_submit_trains_on_two_raylets_with_the_actor_where_the_resource_is(ray_cluster, tmp_path):
    job = _submit(ray_cluster, tmp_path / "run", "stage1.rounds=1")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-4000:]
    assert "node exit codes: [0, 0]" in out
    # every torchrun started in the job's copy of the config (shipped with it), not in a checkout
    assert out.count("working_dir_files") >= 2 and "train quickstart.yaml" in out
    line = next(ln for ln in out.splitlines() if "clustering actor on node" in ln)
    assert _node_with(ray_cluster, "k2l_cluster")[:12] in line  # the raylet offering the resource
    assert "with 2.0 CPU(s): Faiss runs 2 thread(s)" in line  # the head's free CPUs, all used
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    rounds = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("round/actor_faiss_threads") == 2 for r in rounds)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_fails_naming_a_killed_node_and_an_unplaceable_actor_fast(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(ray_cluster, run_dir, "stage1.rounds=3", "stage1.iters_per_round=40")
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint.pt").exists():  # training under way on both nodes
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.5)
    node1 = subprocess.run(["pgrep", "-f", "--", "--node-rank=1 "], capture_output=True, text=True).stdout.split()
    assert len(node1) == 1
    os.kill(int(node1[0]), signal.SIGKILL)  # node 1's torchrun
    out, _ = job.communicate(timeout=180)
    assert job.returncode != 0
    assert "error: node 1 (" in out and "torchrun killed by signal SIGKILL (first to fail)" in out
    assert "error: rank 1 (node 1, host" in out  # node 0's rank names the rank it lost
    leftover = subprocess.run(["pgrep", "-f", "k2l_dist.cli train"], capture_output=True, text=True).stdout
    assert leftover == ""  # the killed agent's rank died with it

    t0 = time.monotonic()
    job = _submit(ray_cluster, tmp_path / "run2", "cluster.actor_resource=k2l_missing")
    out, _ = job.communicate(timeout=180)
    assert job.returncode != 0
    assert "error: cluster.actor_resource=k2l_missing: no node of the Ray cluster offers this resource" in out
    assert time.monotonic() - t0 < 90  # the job's start-up, then seconds
    assert not (tmp_path / "run2" / "shards").exists()  # refused before preparing any data
