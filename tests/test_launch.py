"""The launch files: cluster.yaml (Ray's own validation, offline) and launch/torchrun.sh."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "torchrun.sh"
CLUSTER = ROOT / "cluster.yaml"
TRAIN = ["-m", "k2l_dist.cli", "train"]
ENV_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                "RAY_USAGE_STATS_ENABLED": "0"}


# ---------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def prepared():
    """cluster.yaml as `ray up` sees it before talking to AWS: prepare_config, then validate_config."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER.read_text())
    cfg = prepare_config(copy.deepcopy(raw))  # defaults merged, setup commands merged per node kind
    validate_config(cfg)  # ray-schema.json + head_node_type / max_workers checks
    return raw, cfg


def test_cluster_yaml_passes_ray_validation(prepared):
    raw, cfg = prepared
    assert raw["cluster_name"] == "k2l-dist"
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert set(types) == {head, "clustering", "clustering_gpu", "gpu_worker"}
    assert types[head]["max_workers"] == 0
    for name in ("clustering", "clustering_gpu", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= cfg["max_workers"], name
    # EC2 resolves the image itself (a public SSM parameter): no AMI id left to fill in
    for name, node_type in types.items():
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/"), name


def test_ray_validation_is_not_vacuous(prepared):
    """The same validation rejects a broken copy, so passing it above means something."""
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import validate_config

    _, cfg = prepared
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "eight"}
    with pytest.raises(ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(bad)


def _ray_start_flags(command: str) -> dict[str, str]:
    """`--flag=value` / `--flag value` / `--flag` of the `ray start` in one shell command line."""
    words = shlex.split(command.replace(";", " ; "))
    start = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["ray", "start"])
    flags: dict[str, str] = {}
    rest = words[start + 2:]
    for i, w in enumerate(rest):
        if w == ";":
            break
        if w.startswith("--"):
            if "=" in w:
                key, value = w.split("=", 1)
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--") and rest[i + 1] != ";":
                key, value = w, rest[i + 1]
            else:
                key, value = w, ""
            flags[key] = value
    return flags


def test_only_the_clustering_nodes_offer_the_actors_resource(prepared):
    _, cfg = prepared
    types = cfg["available_node_types"]
    offer = {name for name, t in types.items() if t.get("resources", {}).get("k2l_cluster")}
    assert offer == {"clustering", "clustering_gpu"}  # the actor and its holders land there, nowhere else
    assert types["clustering"]["min_workers"] >= 1  # up before a job asks for it (placement fails fast)
    starts = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1
    flags = _ray_start_flags(starts[0])
    assert "--head" in flags and "--resources" not in flags
    assert flags["--dashboard-host"] == "127.0.0.1"
    # the workers join the head; their resources come from their node type, not the command
    workers = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(workers) == 1
    wflags = _ray_start_flags(workers[0])
    assert wflags["--address"].endswith(":6379") and "--head" not in wflags and "--resources" not in wflags


def _setup_of(cfg: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a worker of ``node_type`` (a node type's own list replaces the rest)."""
    return cfg["available_node_types"][node_type].get("worker_setup_commands", cfg["worker_setup_commands"])


def test_every_node_mounts_the_shared_file_system_before_installing(prepared):
    _, cfg = prepared
    for commands in [cfg["head_setup_commands"], *(_setup_of(cfg, t) for t in ("clustering", "clustering_gpu",
                                                                                "gpu_worker"))]:
        mount = _index(commands, r"mount -t nfs4 .* /mnt/k2l")
        assert mount < _index(commands, r"pip install (-U )?-e \"?\.\[")


def _index(commands: list[str], pattern: str) -> int:
    hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert hits, f"no setup command matches {pattern!r}: {commands}"
    return hits[0]


def test_each_node_installs_one_coherent_extra(prepared):
    """GPU nodes: torch from the CUDA index, then the package's CUDA extra; CPU nodes: the CPU
    extra. No node ever gets two Faiss builds (they write the same module)."""
    _, cfg = prepared
    for node_type in ("gpu_worker", "clustering_gpu"):
        gpu = _setup_of(cfg, node_type)
        torch = _index(gpu, r"pip install [^;]*torch==2\.13\.0[^;]*--index-url [^;]*/cu130")
        project = _index(gpu, r'pip install (-U )?-e "\.\[cu13\]"')
        assert torch < project, gpu
        assert not any(re.search(r"faiss-cpu|\.\[cpu\]|\.\[cu12\]|pip install (-U )?-e \.( |$)", c) for c in gpu), gpu
    for commands in (cfg["head_setup_commands"], _setup_of(cfg, "clustering")):
        _index(commands, r'pip install (-U )?-e "\.\[cpu\]"')
        assert not any(re.search(r"faiss-gpu|\.\[cu1[23]\]", c) for c in commands), commands


# ---------------------------------------------------------------- launch/torchrun.sh


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH with this venv's torchrun and a stub nvidia-smi (`gpus` lines, or failing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def make(gpus: int | None = None) -> dict[str, str]:
        smi = bin_dir / "nvidia-smi"
        if gpus is None:
            smi.write_text("#!/bin/sh\nexit 9\n")
        else:
            lines = "".join(f"GPU {i}: Fake (UUID: GPU-{i})\\n" for i in range(gpus))
            smi.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", *ENV_DEFAULTS)}
        env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    return make


def _run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def _dry(args: list[str], env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    res = _run(["--dry-run", *args], env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2, res.stdout
    exports = shlex.split(lines[0])
    assert exports[0] == "export"
    return dict(kv.split("=", 1) for kv in exports[1:]), shlex.split(lines[1])


def _options(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """torchrun's own options (before `-m`) as a dict, and the program with its arguments."""
    assert Path(argv[0]).name == "torchrun", argv
    m = argv.index("-m")
    opts: dict[str, str | bool] = {}
    words = argv[1:m]
    i = 0
    while i < len(words):
        assert words[i].startswith("--"), words
        if words[i] == "--standalone":
            opts[words[i]] = True
            i += 1
        else:
            assert words[i] not in opts, f"{words[i]} given twice"
            opts[words[i]] = words[i + 1]
            i += 2
    return opts, argv[m:]


def _torchrun_parse(argv: list[str]):
    """Parse with torch 2.13's own torchrun parser: every flag must exist there."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv[1:])


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_dry_run_single_node_standalone(fake_bin, monkeypatch):
    env = fake_bin(gpus=None)  # nvidia-smi present but failing: one rank
    exports, argv = _dry(["--", "configs/quickstart.yaml", "run_dir=X"], env)
    assert exports == {"OMP_NUM_THREADS": str(max(1, _cores())), **ENV_DEFAULTS}
    opts, program = _options(argv)
    assert opts == {"--standalone": True, "--nproc-per-node": "1", "--max-restarts": "0",
                    "--log-dir": "X/logs", "--tee": "3", "--local-ranks-filter": "0"}
    assert program == [*TRAIN, "configs/quickstart.yaml", "run_dir=X"]

    args = _torchrun_parse(argv)
    assert args.standalone and args.module and args.nnodes == "1:1"  # torchrun's default
    assert args.training_script == "k2l_dist.cli"
    assert args.training_script_args == ["train", "configs/quickstart.yaml", "run_dir=X"]
    # what torchrun makes of the log flags: all ranks' streams to files, console = local rank 0
    from torch.distributed.elastic.multiprocessing import Std
    from torch.distributed.run import config_from_args

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args may set it in this process
    config, cmd, cmd_args = config_from_args(args)
    specs = config.logs_specs
    assert specs._tee == Std.ALL and specs._local_ranks_filter == {0}
    assert Path(specs.root_log_dir) == Path("X/logs")
    assert cmd_args == ["-u", "-m", "k2l_dist.cli", "train", "configs/quickstart.yaml", "run_dir=X"]


def test_dry_run_counts_gpus_splits_cores_and_keeps_user_env(fake_bin):
    env = fake_bin(gpus=3)
    exports, argv = _dry(["--", "c.yaml", "run_dir=runs/a/", "run_dir=runs/b"], env)
    opts, program = _options(argv)
    assert opts["--nproc-per-node"] == "3"
    assert exports["OMP_NUM_THREADS"] == str(max(1, _cores() // 3))
    assert opts["--log-dir"] == "runs/b/logs"  # the last run_dir override wins, as in k2l train
    assert program == [*TRAIN, "c.yaml", "run_dir=runs/a/", "run_dir=runs/b"]

    env.update(OMP_NUM_THREADS="7", MALLOC_MMAP_THRESHOLD_="123", RAY_USAGE_STATS_ENABLED="1")
    exports, argv = _dry(["--nproc-per-node", "2", "--log-dir", "L", "--", "c.yaml", "a=b c"], env)
    assert exports == {"OMP_NUM_THREADS": "7", "MALLOC_MMAP_THRESHOLD_": "123",
                       "MALLOC_TRIM_THRESHOLD_": "17179869184", "RAY_USAGE_STATS_ENABLED": "1"}
    opts, program = _options(argv)
    assert opts["--nproc-per-node"] == "2" and opts["--log-dir"] == "L"
    assert program == [*TRAIN, "c.yaml", "a=b c"]  # shell-quoted on the printed line

    env.pop("OMP_NUM_THREADS")
    exports, argv = _dry(["--", "c.yaml"], env)
    assert _options(argv)[0]["--log-dir"] == "runs/logs"


def test_dry_run_multi_node_rendezvous(fake_bin):
    env = fake_bin(gpus=None)
    exports, argv = _dry(["--nnodes", "2", "--node-rank", "1", "--endpoint", "host:29400", "--run-id", "r1",
                          "--max-restarts", "1", "--", "configs/quickstart.yaml", "run_dir=X"], env)
    opts, program = _options(argv)
    assert opts == {"--nnodes": "2", "--node-rank": "1", "--rdzv-backend": "c10d",
                    "--rdzv-endpoint": "host:29400", "--rdzv-id": "r1", "--rdzv-conf": "is_host=0",
                    "--nproc-per-node": "1", "--max-restarts": "1", "--log-dir": "X/logs", "--tee": "3",
                    "--local-ranks-filter": "0"}
    assert "--standalone" not in argv
    assert program == [*TRAIN, "configs/quickstart.yaml", "run_dir=X"]
    args = _torchrun_parse(argv)
    assert (args.nnodes, args.node_rank, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id,
            args.max_restarts, args.standalone, args.rdzv_conf) == ("2", 1, "c10d", "host:29400", "r1", 1, False,
                                                                    "is_host=0")
    # node 0 serves the rendezvous store whatever its host name resolves to
    _, argv0 = _dry(["--nnodes", "2", "--node-rank", "0", "--endpoint", "host:29400", "--", "c.yaml"], env)
    assert _options(argv0)[0]["--rdzv-conf"] == "is_host=1"


def test_multi_node_prints_every_nodes_command_and_checks_the_endpoint_answers(fake_bin):
    env = fake_bin(gpus=None)
    res = _run(["--dry-run", "--nnodes", "2", "--node-rank", "1", "--endpoint", "h:29400", "--", "c.yaml"], env)
    for r in (0, 1):
        assert f"[node {r}] " in res.stderr and f"--node-rank {r} --endpoint h:29400" in res.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _run(["--nnodes", "2", "--node-rank", "1", "--endpoint", f"127.0.0.1:{port}", "--endpoint-wait", "1",
                "--", "c.yaml"], env)
    assert res.returncode == 2 and f"nothing answers at the rendezvous endpoint 127.0.0.1:{port}" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--node-rank", "0"], "--endpoint HOST:PORT is required"),
    (["--nnodes", "2", "--endpoint", "host:29400"], "--node-rank is required"),
    (["--nnodes", "2", "--node-rank", "2", "--endpoint", "host:29400"], "--node-rank must be"),
    (["--nnodes", "2", "--node-rank", "0", "--endpoint", "host"], "--endpoint must be HOST:PORT"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_arguments_fail_naming_the_flag(fake_bin, args, message):
    res = _run(["--dry-run", *args, "--", "configs/quickstart.yaml"], fake_bin())
    assert res.returncode != 0
    assert message in res.stderr
    assert res.stdout == ""


def test_runs_exactly_what_dry_run_prints(fake_bin, tmp_path):
    """Without --dry-run the script execs that very command, with those variables set."""
    env = fake_bin(gpus=2)
    record = tmp_path / "record.json"
    stub = Path(env["PATH"].split(os.pathsep)[0]) / "torchrun"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    args = ["--", "configs/quickstart.yaml", f"run_dir={tmp_path / 'run'}"]
    exports, argv = _dry(args, env)
    res = _run(args, env)
    assert res.returncode == 0, res.stderr
    seen = json.loads(record.read_text())
    assert seen["argv"] == argv[1:]
    assert {k: seen["env"].get(k) for k in exports} == exports
    assert (tmp_path / "run" / "logs").is_dir()  # created for torchrun's log files


def test_help_and_executable():
    assert os.access(SCRIPT, os.X_OK)
    res = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--nproc-per-node", "--nnodes", "--node-rank", "--endpoint", "--run-id", "--max-restarts",
                 "--log-dir", "--dry-run"):
        assert flag in res.stdout
    assert SCRIPT.read_text().splitlines()[:4].count("set -euo pipefail") == 1


# ---------------------------------------------------------------- launch/ray_submit.sh


@contextlib.contextmanager
def _job_server():
    """An HTTP server on 127.0.0.1 that answers every GET, as a Ray head's dashboard does."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_ray_submit_retries_while_the_heads_job_agent_is_not_up(tmp_path):
    """A just-started head refuses submissions ("No available agent"); nothing was
    submitted, so the script tries again, and passes on the job's own exit code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    ray = bin_dir / "ray"
    ray.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
n=$(wc -l < {calls})
if [ "$n" -le 2 ]; then
  echo "RuntimeError: Request failed with status code 500: No available agent to submit job" >&2
  exit 1
fi
exit 7
""")
    ray.chmod(ray.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    with _job_server() as address:  # the head's HTTP server answers; its job agent is what is not up
        res = subprocess.run([str(ROOT / "launch" / "ray_submit.sh"), "--address", address, "--",
                              "configs/quickstart.yaml"], env=env, capture_output=True, text=True, timeout=60)
    submitted = calls.read_text().splitlines()
    assert len(submitted) == 3 and res.returncode == 7, res.stderr
    assert res.stderr.count("is not up yet; retrying in 5 s") == 2
    ids = [line.split("--submission-id ")[1].split()[0] for line in submitted]
    assert len(set(ids)) == 3  # a fresh id for every try


# ---------------------------------------------------------------- the Ray job's driver


def test_ray_launch_commands_and_the_failure_it_reports():
    from k2l_dist.distributed.ray_launch import failed_nodes, torchrun_command

    one = torchrun_command(0, 1, 2, "h:1", "r", 0, ["c.yaml", "a=b"])
    assert "--standalone" in one and not any(a.startswith("--rdzv") for a in one)
    assert one[one.index("-m", 2):] == ["-m", "k2l_dist.cli", "train", "c.yaml", "a=b"]
    for node in (0, 1):
        cmd = torchrun_command(node, 2, 8, "h:29400", "r", 1, ["c.yaml"])
        args = _torchrun_parse(cmd[2:])  # torch's own parser takes every flag
        assert (args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_conf) == (
            "2", node, "h:29400", f"is_host={int(node == 0)}")
    # every node that failed is named, the first to end first; a clean job names none
    assert failed_nodes([{"code": 0, "ended": 1.0, "ip": "a"}] * 2) == []
    lines = failed_nodes([{"code": 1, "ended": 9.0, "ip": "a"}, {"code": -9, "ended": 5.0, "ip": "b"}])
    assert lines == ["node 1 (b): torchrun killed by signal SIGKILL (first to fail)",
                     "node 0 (a): torchrun exited with code 1"]
