"""Failures that used to lose work or give wrong results: each is refused clearly now."""

import errno
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from k2l_dist import prepare as prepare_module
from k2l_dist.clustering.rounds import degenerate_warnings, recover
from k2l_dist.clustering.store import PointSet
from k2l_dist.config import ClusterConfig, ConfigError, load_config, validate
from k2l_dist.distributed.watchdog import EXIT_PEER, Watchdog
from k2l_dist.prepare import is_prepared, prepare
from k2l_dist.training.loop import NonFiniteLoss
from k2l_dist.training.run import train
from k2l_dist.utils import io as io_module
from k2l_dist.utils.checkpoint import load_checkpoint, load_latest_checkpoint, previous, save_checkpoint
from k2l_dist.utils.io import StorageError
from tests.tiny import TINY


def test_an_overwrite_killed_midway_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, "data.synthetic_count=24", "data.samples_per_shard=8"])
    prepare(cfg, tmp_path)
    assert is_prepared(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path, overwrite=True)
    assert not is_prepared(tmp_path) and not (tmp_path / "samples.npz").exists()


def test_a_named_shard_folder_that_is_not_prepared_is_refused_not_overwritten(tmp_path):
    typo = tmp_path / "shardz"
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", f"data.shards={typo}"])
    with pytest.raises(ValueError, match="data.shards=.*shardz: not a prepared shard folder"):
        train(cfg)
    assert not typo.exists()


def test_values_that_cannot_work_are_refused_before_any_work_naming_each_key(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "cluster.K=0", "stage1.rounds=-2", "device=tpu",
                             "keypoints.outlier_fraction=1.0"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    for key in ("cluster.K", "stage1.rounds", "device", "keypoints.outlier_fraction"):
        assert key in str(err.value)
    assert not (tmp_path / "run").exists()
    validate(load_config(None, TINY))  # the tiny config is fine


@pytest.mark.slow
def test_incompatible_resume_is_refused_by_key_and_leaves_the_run_alone(shards, tmp_path):
    run = [*TINY, f"run_dir={tmp_path}", f"data.shards={shards}", "stage1.rounds=1", "stage2.iterations=1"]
    train(load_config(None, run))
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError) as err:
        train(load_config(None, [*run, "cluster.K=5", "model.width=8", "stage1.rounds=2"]))
    assert "cluster.K: 6 → 5" in str(err.value) and "model.width: 16 → 8" in str(err.value)
    assert "stage1.rounds" not in str(err.value)  # a schedule change is compatible
    assert (tmp_path / "config.yaml").read_text() == saved


@pytest.mark.slow
def test_a_nan_loss_stops_naming_step_and_term_and_a_lower_lr_resumes(shards, tmp_path, monkeypatch):
    run = [*TINY, f"run_dir={tmp_path}", f"data.shards={shards}", "stage1.rounds=2", "stage2.iterations=1"]
    monkeypatch.setenv("K2L_FAULT", "nan:round2")
    with pytest.raises(NonFiniteLoss, match=r"round2 step 21: loss term\(s\) loss not finite"):
        train(load_config(None, run))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 1  # the last good checkpoint
    monkeypatch.delenv("K2L_FAULT")
    train(load_config(None, [*run, "stage1.lr=0.0005"]))
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["round"] == 2 and ck["optimizer"]["param_groups"][0]["lr"] == 0.0005
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["stage1"]["lr"] == 0.0005


def test_checks_every_n_steps_name_the_bad_step_and_no_checkpoint_holds_its_weights(shards, tmp_path, monkeypatch):
    run = [*TINY, f"run_dir={tmp_path}", f"data.shards={shards}", "stage1.rounds=2", "stage2.iterations=1",
           "check_finite_every=5", "checkpoint_every=5"]
    monkeypatch.setenv("K2L_FAULT", "nan:round2")  # round 2's first step (global step 21)
    with pytest.raises(NonFiniteLoss, match=r"round2 step 21: loss term\(s\) loss not finite.* took 4 update\(s\)"):
        train(load_config(None, run))
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["round"] == 1 and ck["step"] == 20  # round 2's step-5 checkpoint was never written
    assert all(torch.isfinite(v).all() for v in ck["phi"].values() if v.is_floating_point())
    with pytest.raises(ConfigError, match="check_finite_every.*checkpoint_every=7 must be a multiple of it"):
        validate(load_config(None, [*run, "checkpoint_every=7"]))


def test_a_torn_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "w": torch.ones(3)}, keep_previous=True)
    save_checkpoint(path, {"round": 2, "w": torch.full((3,), 2.0)}, keep_previous=True)
    assert load_latest_checkpoint(path)[0]["round"] == 2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a crash or a full disk mid-write
    state, used = load_latest_checkpoint(path)
    assert state["round"] == 1 and used == previous(path)
    assert "torn or altered checkpoint" in caplog.text
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(path)
    assert load_latest_checkpoint(tmp_path / "none.pt") is None


@pytest.mark.slow
def test_a_truncated_shard_is_skipped_and_counted_not_a_crash_after_training(tmp_path, caplog):
    shards = tmp_path / "shards"
    prepare(load_config(None, [*TINY, "data.samples_per_shard=40"]), shards)
    last = sorted(shards.glob("shard-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[: int(last.stat().st_size * 0.7)])
    metrics = train(load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", f"data.shards={shards}",
                                       "stage1.rounds=1", "stage2.iterations=1"]))
    assert metrics["eval_images_skipped"] > 0 and metrics["test_images"] < 30
    assert metrics["samples_skipped"] > 0 and sum(metrics["samples_skipped_by_reason"].values()) == \
        metrics["samples_skipped"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("data/skipped_samples") == metrics["samples_skipped"] for r in logged)
    assert metrics["test_images"] + metrics["eval_images_skipped"] >= 30
    assert "left out of the metrics" in caplog.text


class Evil:  # loading it would need unpickling
    pass


def test_foreign_and_pickled_checkpoints_are_refused_without_torch_advice(tmp_path):
    import os

    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a checkpoint") as err:
        load_checkpoint(tmp_path / "random.pt")
    assert "weights_only" not in str(err.value)
    with pytest.raises(ValueError, match="never done here") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(err.value) and "trust" not in str(err.value)


def test_shards_prepared_at_another_size_are_refused_by_name(shards, tmp_path):
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path}", f"data.shards={shards}", "data.size=64"])
    with pytest.raises(ValueError, match="data.size=64 but the shards have 48"):
        train(cfg)


def test_a_round_where_most_images_lose_their_points_warns_with_the_numbers(caplog):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 8)).astype(np.float32) * 10
    # images 0 and 1 see all six parts; images 2..9 one part each, so they sit out (< 2 points)
    ids = np.r_[np.repeat([0, 1], 6), np.arange(2, 10)]
    desc = np.concatenate([centres, centres, centres[rng.integers(0, 6, 8)]]) + rng.normal(0, .01, (20, 8))
    merged = {"image_ids": ids.astype(np.int64), "points": rng.uniform(0, 48, (20, 2)).astype(np.float32),
              "scores": np.ones(20, np.float32), "descriptors": desc.astype(np.float32),
              "sample_ids": np.arange(10, dtype=np.int64)}
    with caplog.at_level("WARNING"):
        labels = recover("round", PointSet.from_parts([merged]), ClusterConfig(K=6, M=8, niter=5))
        warned = degenerate_warnings(labels, "round 3")
    assert labels.stats["images_kept_share"] == pytest.approx(0.2)
    assert any("round 3: only 2 of 10 images keep pseudo-labels" in w for w in warned)
    assert "round 3: only 2 of 10 images keep" in caplog.text
    with pytest.raises(ValueError, match="no image has a detection above stage1.detect_threshold"):
        recover("round", PointSet.from_parts([{k: v[:0] for k, v in merged.items()}]), ClusterConfig(K=6, M=8))


@pytest.mark.slow
def test_a_single_image_dataset_trains_with_warnings_instead_of_a_crash(tmp_path, caplog):
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path}", "data.synthetic_count=1", "stage1.rounds=1",
                             "stage2.iterations=2"])
    with caplog.at_level("WARNING"):
        metrics = train(cfg)
    # one image: at most K=6 survivors of the first pass for M=12 clusters, so at least 6 stay empty
    empty = re.search(r"round 1: (\d+) of 12 clusters have no points", caplog.text)
    assert empty is not None and int(empty.group(1)) >= 6, caplog.text
    assert "evaluation skipped" in caplog.text and "evaluation_skipped" in metrics
    assert (tmp_path / "model.pt").exists() and (tmp_path / "metrics.json").exists()


def test_the_watchdog_fires_only_on_an_armed_silent_rank_and_names_its_phase():
    fired = []
    dog = Watchdog(rank=0, world_size=1, timeout_s=0.6, on_hang=fired.append).start()
    try:
        dog.beat("round2", 7)
        dog.pause()  # e.g. building a loader: not watched
        time.sleep(1.5)
        assert fired == []
        for i in range(6):  # steady progress never fires
            dog.beat("round2", 8 + i)
            time.sleep(0.2)
        assert fired == []
        time.sleep(1.8)  # silent past the timeout
        assert len(fired) == 1 and "rank 0 made no progress" in fired[0] and "phase round2 (last step 13" in fired[0]
        assert "dist.timeout_s=0.6" in fired[0]
    finally:
        dog.stop()


_SILENT_PEER = """
import json, time
import torch.distributed as dist
from k2l_dist.distributed.watchdog import EXIT_PEER, Watchdog
store = dist.HashStore()
beat = {"phase": "round1", "step": 3, "where": "loop.py:40 step", "waiting": False, "time": time.time() - 99,
        "alive": time.time() - 99, "done": False, "node": 1, "host": "gpu-7"}
store.set("k2l/heartbeat/1", json.dumps(beat))  # rank 1 last published 99 s ago
Watchdog(rank=0, world_size=2, timeout_s=4, store=store, where={"node": 0, "host": "gpu-3"}).start()
time.sleep(30)
"""


def test_a_rank_ended_by_its_watchdog_for_a_lost_peer_says_error_naming_the_peer():
    # the watchdog thread may see a lost peer before the main thread's own check: the user
    # reads the same error line either way
    done = subprocess.run([sys.executable, "-c", _SILENT_PEER], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_PEER, done.stderr
    first = done.stderr.splitlines()[0]
    assert re.match(r"error: rank 1 \(node 1, host gpu-7\) is gone: no sign of life for 1?\d\d s \(last heard from "
                    r"in phase round1, step 3", first), done.stderr
    assert first.endswith("ending rank 0 too") and "this rank's main thread:" in done.stderr


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)}, keep_previous=True)
    monkeypatch.setattr(io_module.os, "fsync", _disk_full)
    with pytest.raises(StorageError, match=r"disk full writing .*checkpoint.pt \(\d+ MB free\)"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)}, keep_previous=True)
    monkeypatch.undo()
    state, used = load_latest_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_disk_full_while_writing_shards_is_one_clear_error_and_no_folder_that_looks_complete(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, "data.synthetic_count=24", "data.samples_per_shard=8"])
    monkeypatch.setattr(io_module.os, "fsync", _disk_full)
    with pytest.raises(StorageError, match="disk full writing .*shard"):
        prepare(cfg, tmp_path / "shards")
    monkeypatch.undo()
    assert not is_prepared(tmp_path / "shards")
    assert not [p for p in (tmp_path / "shards").rglob("*") if p.name.endswith(".tmp")]


def test_a_run_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from k2l_dist.cli import main

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io_module.tempfile, "mkstemp", read_only)
    code = main(["train", "configs/quickstart.yaml", *TINY, f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"run_dir={tmp_path / 'run'} is not writable (Read-only file system)" in err
    assert not (tmp_path / "run" / "shards").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_naming_the_setting(tmp_path, capsys):
    from k2l_dist.cli import main

    code = main(["train", "configs/quickstart.yaml", *TINY, f"run_dir={tmp_path / 'run'}", "device=cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: device='cuda' but CUDA is not available here (use device=cpu or auto)"
    assert not (tmp_path / "run").exists()
