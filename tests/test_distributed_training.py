"""Two processes under torchrun train one model: replicas agree, resumes are exact, faults end the job.

Slow: each torchrun run of the tiny config takes about half a minute on two cores.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from k2l_dist.augment import build_loader
from k2l_dist.config import AugmentConfig, load_config
from k2l_dist.models import KeypointNet
from k2l_dist.models.extract import extract
from k2l_dist.utils.checkpoint import load_checkpoint
from tests.processes import canonical, torchrun, torchrun_started
from tests.tiny import TINY


def test_two_rank_extractions_merge_to_the_one_rank_extraction(shards):
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    phi = KeypointNet(cfg.model).eval()
    aug = AugmentConfig(enabled=False, batch_size=8, num_threads=1)

    def part(rank: int, world: int) -> dict:
        loader = build_loader(shards, aug, rank=rank, world_size=world, views=1, shuffle=False, padded="drop")
        return extract(phi, loader, max_points=12, threshold=0.0, show_progress=False).as_dict()

    one = canonical([part(0, 1)])
    two = canonical([part(1, 2), part(0, 2)])
    assert len(one["sample_ids"]) == 120 and np.array_equal(one["sample_ids"], two["sample_ids"])
    assert np.array_equal(one["image_ids"], two["image_ids"]) and len(one["image_ids"]) > 500
    for key in ("points", "scores", "descriptors", "flipped_descriptors"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


def _args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["-m", "k2l_dist.cli", "train", "configs/quickstart.yaml", *TINY, f"run_dir={run_dir}",
            f"data.shards={shards}", "dist.timeout_s=60", *extra]


def _run(run_dir: Path, shards: Path, *extra: str, nproc: int = 2, env: dict | None = None, timeout: float = 400,
         flags: tuple[str, ...] = ()):
    return torchrun(_args(run_dir, shards, *extra), timeout=timeout, env=env, nproc=nproc, flags=flags)


def _start(run_dir: Path, shards: Path, *extra: str, nproc: int = 2, env: dict | None = None,
           flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    log = run_dir.with_name(run_dir.name + ".log")
    return torchrun_started(_args(run_dir, shards, *extra), log, env=env, nproc=nproc, flags=flags), log


def _finished(job: tuple[subprocess.Popen, Path], timeout: float = 400) -> str:
    process, log = job
    code = process.wait(timeout=timeout)
    out = log.read_text()
    assert code == 0, out[-6000:]
    return out


def _ok(res) -> str:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    return res.stdout + res.stderr


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_runs_agree_resume_exactly_and_resume_at_another_world_size(shards, tmp_path):
    straight, cut, other = tmp_path / "straight", tmp_path / "cut", tmp_path / "other"
    # the runs that need no other run's result go together
    jobs = {
        "straight": _start(straight, shards, "stage1.rounds=2"),
        "cut": _start(cut, shards, "stage1.rounds=1"),
        # rank 1 SIGKILLed after step 6 of round 1: torchrun restarts both ranks, which resume
        # from the in-phase checkpoint of step 4 and end where the uninterrupted run ended
        "killed": _start(tmp_path / "killed", shards, "stage1.rounds=2", "checkpoint_every=4",
                         flags=("--max-restarts=1",), env={"K2L_FAULT": "kill:round1:6@rank1"}),
        # rank 1 SIGKILLed inside round 2's extraction: the restart redoes that round from the
        # checkpoint at the end of round 1, and the run still ends where the uninterrupted one did
        "killed_extracting": _start(tmp_path / "killed_extracting", shards, "stage1.rounds=2",
                                    flags=("--max-restarts=1",), env={"K2L_FAULT": "kill:extract-round2:1@rank1"}),
    }
    outs = {name: _finished(job) for name, job in jobs.items()}
    shutil.copytree(cut, other)
    resumed = {"cut": _start(cut, shards, "stage1.rounds=2"),
               "other": _start(other, shards, "stage1.rounds=2", nproc=1)}
    outs.update({f"{name} resumed": _finished(job) for name, job in resumed.items()})

    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "forward_nme" in metrics
    log = _log(straight)
    # the warm-up and every round compared the replicas' parameters (a mismatch raises) and logged its costs
    assert sum("replicas/phi_checksum" in r for r in log) == 3 and any("replicas/psi_checksum" in r for r in log)
    rounds = [r for r in log if "round/extract_seconds" in r]
    assert len(rounds) == 2
    for key in ("cluster_seconds", "broadcast_seconds", "bytes_sent", "actor_cluster_seconds",
                "object_store_round_bytes"):
        assert all(r[f"round/{key}"] >= 0 for r in rounds), key
    assert rounds[0]["round/bytes_sent"] > 0
    assert any("stage1/step_seconds_slowest" in r for r in log)
    # TensorBoard: one loss curve over the global step through the warm-up and both rounds
    # (10 + 2 × 10 steps), the rounds' statistics at the step where each round happened
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert "stage1/loss" in tags and not any(t.startswith(("warmup/", "round1/", "round2/")) for t in tags)
    assert [e.step for e in events.Scalars("stage1/loss")] == [5, 10, 15, 20, 25, 30]
    assert [e.value for e in events.Scalars("stage1/round")] == [0, 0, 1, 1, 2, 2]
    assert [(e.step, e.value) for e in events.Scalars("round/number")] == [(10, 1), (20, 2)]
    assert "stage2/loss" in tags and "stage1/phase_seconds" in tags
    # each phase ends with the largest rank's peak memory so far: it never shrinks
    peaks = [e.value for e in events.Scalars("stage1/peak_rss_gb")]
    assert len(peaks) == 3 and all(0.1 < p < 20 for p in peaks) and peaks == sorted(peaks)

    assert "resumed from" in outs["cut resumed"]
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["round"] == b["round"] == 2
    for name, tensor in a["phi"].items():
        assert torch.equal(b["phi"][name], tensor), name
    for key in ("points", "labels", "flipped_labels"):
        assert torch.equal(a["labels"][key], b["labels"][key]), key
    ma, mb = load_checkpoint(straight / "model.pt"), load_checkpoint(cut / "model.pt")
    for name, tensor in ma["psi"].items():
        assert torch.equal(mb["psi"][name], tensor), name

    assert "saved by 2 process(es), now 1" in outs["other resumed"]
    assert json.loads((other / "metrics.json").read_text())["world_size"] == 1

    killed = tmp_path / "killed"
    assert "resumed from" in outs["killed"] and "round phase, step 4 of it" in outs["killed"]
    got = json.loads((killed / "metrics.json").read_text())
    for key in ("forward_nme", "backward_nme", "stage1_forward_nme"):
        assert got[key] == metrics[key], key
    mk = load_checkpoint(killed / "model.pt")
    for name, tensor in ma["psi"].items():
        assert torch.equal(mk["psi"][name], tensor), name

    killed = tmp_path / "killed_extracting"
    out = outs["killed_extracting"]
    assert "resumed from" in out and "round phase, step 0 of it, 1 round(s) done" in out
    got = json.loads((killed / "metrics.json").read_text())
    for key in ("forward_nme", "backward_nme", "stage1_forward_nme"):
        assert got[key] == metrics[key], key

    # a finished run, rerun, does nothing and says so
    out = _ok(_run(straight, shards, "stage1.rounds=2", nproc=1))
    assert "is a finished run" in out
    assert json.loads((straight / "metrics.json").read_text()) == metrics


FAULTS = {
    "raises during extraction": ("extract:round1@rank1", "cluster.service=inline",
                                 ["injected fault (K2L_FAULT) at extract:round1 on rank 1"]),
    # a rank that stops making progress: the watchdog names it, where it stopped, and who waits
    "hangs during a round": ("hang:round1:3@rank1", "dist.timeout_s=15",
                             ["k2l watchdog: rank 1 made no progress", "in phase round1 (last step 3",
                              "rank(s) 0 wait for it"]),
}


@pytest.fixture(scope="module")
def faulty_runs(shards, tmp_path_factory) -> dict[str, tuple[Path, int, str, float]]:
    """Every run of FAULTS, started together: name → (its run folder, exit code, output, seconds)."""
    t0 = time.time()
    started = {}
    for name, (fault, extra, _) in FAULTS.items():
        run_dir = tmp_path_factory.mktemp("fault") / "run"
        started[name] = (run_dir, _start(run_dir, shards, "stage1.rounds=1", extra, env={"K2L_FAULT": fault}))
    done = {}
    for name, (run_dir, (process, log)) in started.items():
        code = process.wait(timeout=240)
        done[name] = (run_dir, code, log.read_text(), time.time() - t0)
    return done


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(FAULTS))
def test_a_rank_that_fails_or_hangs_ends_the_job_naming_it(faulty_runs, name):
    says = FAULTS[name][2]
    run_dir, returncode, out, seconds = faulty_runs[name]
    assert returncode != 0
    for text in says:
        assert text in out, out[-3000:]
    assert seconds < 180  # the prepare, the warm-up and one extraction come first
    assert not (run_dir / "metrics.json").exists()
