"""A user's mistakes and the environment's limits: one line, exit code 2, nothing lost.

Each case was a traceback, a crash, a hang or a silent wrong result; each is now a
one-line error naming the file, folder, key or value (``--debug`` keeps the traceback).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from k2l_dist.cli import main
from k2l_dist.config import load_config
from k2l_dist.prepare import prepare
from tests.tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards):
    from k2l_dist.training.run import train

    run_dir = tmp_path_factory.mktemp("errs") / "run"
    train(load_config(None, [*TINY, f"run_dir={run_dir}", f"data.shards={shards}", "stage1.rounds=1",
                             "stage2.iterations=2"]))
    return run_dir


# --------------------------------------------------------------------------- bad: locks, data, evaluation


def test_a_second_run_on_a_folder_in_use_is_refused_naming_its_owner(tmp_path, capsys):
    """fcntl locks belong to a process: the owner is another process here, as a second run's would be."""
    run_dir = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom k2l_dist.utils.lock import RunLock\n"
                              f"lock = RunLock({str(run_dir)!r}, 'k2l train').acquire(); print('held', flush=True); "
                              "time.sleep(120)"], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        assert main(["train", "configs/quickstart.yaml", *TINY, f"run_dir={run_dir}"]) == 2
        line = one_line(capsys)
        assert f"{run_dir} is in use by pid {owner.pid} on host " in line and time.monotonic() - t0 < 10
        assert not (run_dir / "shards").exists() and not (run_dir / "config.yaml").exists()
    finally:
        owner.kill()
        owner.wait()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
    from k2l_dist.utils.lock import RunLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                "started": time.time() - 60, "command": "k2l train (crashed)"}))
    with caplog.at_level("WARNING"), RunLock(tmp_path, "k2l train"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {int(dead.stdout)}" in caplog.text


@pytest.mark.slow
def test_resuming_on_re_prepared_data_is_refused_naming_both_digests(tmp_path):
    from k2l_dist.training.run import train

    shards = tmp_path / "shards"
    base = [*TINY, f"run_dir={tmp_path / 'run'}", f"data.shards={shards}", "stage1.rounds=1", "stage2.iterations=2"]
    prepare(load_config(None, TINY), shards)
    train(load_config(None, base))
    prepare(load_config(None, [*TINY, "data.synthetic_seed=7"]), shards, overwrite=True)  # other images
    with pytest.raises(ValueError, match=r"shards holds other data than the run trained on \(content digest "
                                         r"[0-9a-f]{12}, the checkpoint's [0-9a-f]{12}\)"):
        train(load_config(None, [*base, "stage1.rounds=2"]))


@pytest.mark.slow
def test_evaluate_on_another_split_is_refused_and_keeps_the_training_fields(finished_run, capsys):
    before = json.loads((finished_run / "metrics.json").read_text())
    for override in ("eval.seed=5", "eval.test_count=40", "eval.split=last"):
        assert main(["evaluate", str(finished_run), override]) == 2
        line = one_line(capsys)
        assert f"{override.split('=')[0]}" in line and "trained on" in line
    assert json.loads((finished_run / "metrics.json").read_text()) == before
    # the run's own split: evaluated again, the training fields kept
    assert main(["evaluate", str(finished_run), "stage2.flip_test=false"]) == 0
    after = json.loads((finished_run / "metrics.json").read_text())
    for key in ("train_seconds", "world_size", "samples_skipped"):
        assert after[key] == before[key], key


# --------------------------------------------------------------------------- bad: waits that end


def test_a_ray_address_that_does_not_answer_fails_within_the_timeout_naming_it(tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "k2l_dist.cli", "train", "configs/quickstart.yaml", *TINY,
                          f"run_dir={tmp_path / 'run'}", "cluster.service=ray", "dist.timeout_s=3"],
                         cwd=ROOT, env={**ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and time.monotonic() - t0 < 60, res.stderr[-2000:]
    assert f"cannot join the Ray cluster at '127.0.0.1:{port}' (RAY_ADDRESS)" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_rank_outlives_a_killed_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "k2l_dist.cli",
           "train", "configs/quickstart.yaml", *TINY, f"run_dir={tmp_path / 'run'}", "stage1.warmup_iters=100000",
           "cluster.service=inline"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "config.yaml").exists():  # both ranks are up and training
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                                text=True).stdout.split()]
        assert len(ranks) == 2
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{r}").exists() and "zombie" not in Path(f"/proc/{r}/status").read_text()
                  for r in ranks):
            assert time.monotonic() < deadline, "a rank outlived its torchrun"
            time.sleep(0.2)
    finally:
        if agent.poll() is None:
            agent.kill()


# --------------------------------------------------------------------------- ugly: one line, exit 2


def test_file_and_folder_mistakes_are_one_line(finished_run, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.zeros((40, 40, 3), np.uint8))
    model = str(finished_run / "model.pt")
    (tmp_path / "empty").mkdir()
    cases = [
        (["detect", "--checkpoint", model, "--images", str(images), "--out", str(tmp_path)], "is a folder"),
        (["export", str(finished_run), "--format", "torchscript", "--out", str(tmp_path)], "is a folder"),
        (["prepare", "--out", str(images / "a.jpg"), "--format", "synthetic"], "is a file, not a folder"),
        (["detect", "--checkpoint", model, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o.jsonl")],
         "no images"),
    ]
    for argv, says in cases:
        t0 = time.monotonic()
        assert main(argv) == 2, argv
        assert says in one_line(capsys), argv
        assert time.monotonic() - t0 < 20, argv  # before any work
    assert not (tmp_path / "o.jsonl").exists()


def test_an_unreadable_folder_is_a_counted_skip_naming_it(tmp_path, monkeypatch, caplog):
    from k2l_dist.data import readers

    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    walk = os.walk

    def walk_with_a_locked_folder(root, onerror=None, **kwargs):
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "locked")))
        yield from walk(root, onerror=onerror, **kwargs)

    monkeypatch.setattr(readers.os, "walk", walk_with_a_locked_folder)
    items, skips = readers.read_folder(tmp_path)
    assert [i.path for i in items] == ["a.jpg"]
    assert [(s.path, s.reason) for s in skips] == [("locked", "unreadable folder")]


def test_permission_and_size_limits_are_one_line(finished_run, tmp_path, capsys, monkeypatch):
    import errno

    from k2l_dist.utils import checkpoint as checkpoint_module

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(checkpoint_module.Path, "read_bytes", denied)
    assert main(["evaluate", str(finished_run)]) == 2
    assert "model.pt" in (line := one_line(capsys)) and "permission denied" in line.lower()
    monkeypatch.undo()
    # a file-size limit (ulimit -f): Python ignores SIGXFSZ, the write fails with EFBIG
    res = subprocess.run(["bash", "-c", f"ulimit -f 64; exec {sys.executable} -m k2l_dist.cli prepare --out "
                                        f"{tmp_path / 'big'} --format synthetic --synthetic-count 40 --size 64"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "file too large" in res.stderr and "ulimit -f" in res.stderr


def test_values_prepare_and_train_refuse_are_refused_by_prepare(tmp_path, capsys):
    for flags, key in ((["--outlier-fraction", "1.0"], "keypoints.outlier_fraction"), (["--workers", "-3"],
                       "data.workers"), (["--limit", "-1"], "data.limit")):
        assert main(["prepare", "--out", str(tmp_path / "s"), "--format", "synthetic", *flags]) == 2
        assert key in one_line(capsys)
    assert not (tmp_path / "s").exists()


def test_annotations_of_the_wrong_shape_are_refused_naming_the_file(tmp_path, capsys):
    from scipy.io import savemat

    (tmp_path / "images").mkdir()
    savemat(tmp_path / "joints.mat", {"joints": np.zeros((3, 5, 7))})  # 5 joints: not LSP's 14
    assert main(["prepare", "--out", str(tmp_path / "s"), "--format", "lsp", "--root", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert "joints.mat" in line and "(3, 5, 7)" in line and "14" in line


def test_shards_without_keypoints_are_refused_at_the_start_of_training(tmp_path, capsys):
    shards = tmp_path / "bare"
    prepare(load_config(None, [*TINY, "keypoints.method=none", "data.synthetic_count=20"]), shards)
    t0 = time.monotonic()
    assert main(["train", "configs/quickstart.yaml", *TINY, f"run_dir={tmp_path / 'run'}",
                 f"data.shards={shards}"]) == 2
    line = one_line(capsys)
    assert str(shards) in line and "no keypoints" in line and time.monotonic() - t0 < 30


def test_a_pickled_samples_file_is_refused_naming_it(tmp_path, capsys):
    import pickle

    shards = tmp_path / "s"
    prepare(load_config(None, [*TINY, "data.synthetic_count=20"]), shards)
    (shards / "samples.npz").write_bytes(pickle.dumps({"ids": 1}))
    assert main(["train", "configs/quickstart.yaml", *TINY, f"run_dir={tmp_path / 'run'}",
                 f"data.shards={shards}"]) == 2
    assert "samples.npz" in one_line(capsys)


def test_image_names_that_are_not_utf8_are_read_never_a_crash(finished_run, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    ok, encoded = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    for name in (b"caf\xe9.jpg", b"plain.jpg"):  # Latin-1 bytes: not a UTF-8 name
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(encoded.tobytes())
    out = tmp_path / "o.jsonl"
    prep = subprocess.run([sys.executable, "-m", "k2l_dist.cli", "prepare", "--out", str(tmp_path / "s"),
                           "--format", "folder", "--root", str(root), "--size", "48", "--keypoints", "orb"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0 and "prepared 2 of 2 images" in prep.stdout, prep.stderr[-2000:]
    det = subprocess.run([sys.executable, "-m", "k2l_dist.cli", "detect", "--checkpoint", str(finished_run),
                          "--images", str(root), "--out", str(out), "--draw", str(tmp_path / "drawn")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert det.returncode == 0, det.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 2
    assert len(list((tmp_path / "drawn").iterdir())) == 2


def test_drawings_of_images_that_share_a_stem_are_kept_apart(finished_run, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "a.png", "b.jpg"):
        cv2.imwrite(str(root / name), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    assert main(["detect", "--checkpoint", str(finished_run), "--images", str(root), "--out",
                 str(tmp_path / "o.jsonl"), "--draw", str(tmp_path / "drawn")]) == 0
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["a.jpg.png", "a.png", "b.png"]


def test_ray_submit_to_a_dead_head_is_one_line(tmp_path):
    res = subprocess.run([str(ROOT / "launch" / "ray_submit.sh"), "--address", f"http://127.0.0.1:{_free_port()}",
                          "--", "configs/quickstart.yaml"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no Ray job server answers at http://127.0.0.1:" in res.stderr


def test_the_ray_service_across_nodes_without_a_cluster_is_refused_before_any_work(monkeypatch):
    import torch

    from k2l_dist.clustering.service import service_choice
    from k2l_dist.config import ClusterConfig
    from k2l_dist.distributed import DistInfo

    two_nodes = DistInfo(0, 2, 0, 1, torch.device("cpu"), 1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="cluster.service=ray across several nodes needs RAY_ADDRESS"):
        service_choice(ClusterConfig(service="ray"), two_nodes)
    assert service_choice(ClusterConfig(service="auto"), two_nodes) == "inline"  # auto: what can work
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert service_choice(ClusterConfig(service="auto"), two_nodes) == "ray"
