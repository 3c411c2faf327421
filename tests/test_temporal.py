"""Temporal pairs on video shards (k2l_dist.augment.temporal): partners from the same video
within the window, points tracked into them, composed with the augmentation; the step's
use of the tracks; the temporal jitter metric; a two-process run with pairs resumes exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from k2l_dist.augment import build_loader
from k2l_dist.augment.temporal import FrameWindows, TemporalPairs
from k2l_dist.augment.validate import check_dataset
from k2l_dist.config import TemporalConfig, load_config
from k2l_dist.data.shards import load_samples_meta
from k2l_dist.eval.metrics import temporal_jitter
from k2l_dist.prepare import prepare
from k2l_dist.training.labels import LabelTable
from k2l_dist.training.steps import _tracked
from k2l_dist.utils.checkpoint import load_checkpoint
from k2l_dist.utils.geometry import transform_points
from tests.processes import torchrun_started
from tests.tiny import TINY

FRAMES = 8
VIDEO = ["data.format=synthetic_video", "data.synthetic_count=15", f"data.synthetic_frames={FRAMES}",
         "data.synthetic_render_size=96", "data.box=whole"]


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> Path:
    """Tiny synthetic clips (15 videos × 8 frames, whole 48-px frames: the object moves in them) prepared once."""
    out = tmp_path_factory.mktemp("video") / "shards"
    prepare(load_config(None, [*TINY, *VIDEO]), out)
    return out


def _truth_table(meta: dict) -> LabelTable:
    """A label table whose points are every frame's visible ground-truth landmarks."""
    rows = [(i, p) for i, lms, vis in zip(meta["ids"], meta["landmarks"], meta["visible"]) for p, v in zip(lms, vis)
            if v]
    return LabelTable.from_points(np.array([i for i, _ in rows]), np.array([p for _, p in rows]))


def _pairs(shards: Path, share: float, seed: int = 0, window: int = 2) -> tuple[TemporalPairs, dict]:
    meta = load_samples_meta(shards)
    data = check_dataset(shards, cache_dir=shards.parent / "cache")
    cfg = TemporalConfig(share=share, window=window)
    return TemporalPairs(data, meta, _truth_table(meta), max_points=12, cfg=cfg, seed=seed), meta


def test_neighbours_stay_in_their_video_within_the_window():
    ids = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    videos = np.array(["a"] * 5 + ["b"] * 3 + ["", ""])
    frames = np.array([4, 0, 3, 1, 2, 0, 1, 2, 0, 0])  # video a out of order
    windows = FrameWindows(ids, videos, frames, usable=np.setdiff1d(ids, [13]), window=1)
    near = {i: windows.near(i) for i in ids.tolist()}
    # a's usable frames in order: 11 (f0), 14 (f2), 12 (f3), 10 (f4); 13 (f1) is not usable
    assert near[11].tolist() == [14] and sorted(near[14].tolist()) == [11, 12] and near[10].tolist() == [12]
    assert near[15].tolist() == [16] and sorted(near[16].tolist()) == [15, 17] and near[17].tolist() == [16]
    assert near[13] is None and near[18] is None and near[19] is None  # still images have no partner
    assert windows.near(99) is None  # an id the shards do not hold
    wide = FrameWindows(ids, videos, frames, usable=ids, window=2)
    assert sorted(wide.near(12).tolist()) == [10, 13, 14] and sorted(wide.near(11).tolist()) == [13, 14]
    alone = FrameWindows(np.array([1, 2]), np.array(["x", "y"]), np.array([0, 0]), usable=np.array([1, 2]), window=3)
    assert alone.near(1) is None  # the only frame of its video


def test_partners_are_nearby_frames_of_the_video_and_tracks_follow_the_true_motion(video_shards):
    pairs, meta = _pairs(video_shards, share=1.0, window=5)
    rows = {int(i): k for k, i in enumerate(meta["ids"])}
    errors, kept_share, moved = [], [], []
    for sample in meta["ids"][::3]:
        jpeg = pairs._read(int(sample))
        _, partner, tracks, kept = pairs.pair(jpeg, int(sample))
        a, b = rows[int(sample)], rows[int(partner[0])]
        assert partner[0] != sample and meta["videos"][a] == meta["videos"][b]
        assert 1 <= abs(int(meta["frames"][a]) - int(meta["frames"][b])) <= 5
        vis = meta["visible"][a]
        n = int(vis.sum())
        truth = meta["landmarks"][b][vis]  # the same parts, where the partner frame shows them
        ok = kept[:n].astype(bool) & meta["visible"][b][vis]
        assert np.isnan(tracks[:n][~kept[:n].astype(bool)]).all() and np.isnan(tracks[n:]).all()
        errors.append(np.linalg.norm(tracks[:n][ok] - truth[ok], axis=1))
        moved.append(np.linalg.norm(meta["landmarks"][a][vis][ok] - truth[ok], axis=1))
        kept_share.append(kept[:n].mean())
    errors, moved = np.concatenate(errors), np.concatenate(moved)
    assert np.mean(kept_share) > 0.5
    # the partners moved; the tracks follow (LK on 48-px JPEG frames of smooth parts: not exactly)
    assert np.median(moved) > 0.3 and np.mean(errors < moved) > 0.65
    assert np.median(errors) < 0.75 * np.median(moved) and np.median(errors) < 1.0


def test_draws_depend_on_seed_sample_and_count_not_on_the_order_samples_come(video_shards):
    a, meta = _pairs(video_shards, share=0.5, seed=3)
    b, _ = _pairs(video_shards, share=0.5, seed=3)
    c, _ = _pairs(video_shards, share=0.5, seed=4)
    ids = [int(i) for i in meta["ids"][:40]]
    jpegs = {i: a._read(i) for i in ids}
    first = [int(a.pair(jpegs[i], i)[1][0]) for i in ids for _ in range(2)]
    reversed_order = {(i, k): int(b.pair(jpegs[i], i)[1][0]) for i in reversed(ids) for k in range(2)}
    assert first == [reversed_order[(i, k)] for i in ids for k in range(2)]
    other = [int(c.pair(jpegs[i], i)[1][0]) for i in ids for _ in range(2)]
    assert other != first
    paired = np.array(first) != np.repeat(ids, 2)
    assert 0.3 < paired.mean() < 0.7  # about `share` of the draws pair with another frame


def test_without_share_every_sample_is_its_own_partner_with_its_points(video_shards):
    pairs, meta = _pairs(video_shards, share=0.0)
    table = _truth_table(meta)
    for sample in meta["ids"][:10]:
        jpeg = pairs._read(int(sample))
        out, partner, tracks, kept = pairs.pair(jpeg, int(sample))
        assert partner[0] == sample and np.array_equal(out, jpeg)
        own = table.points[table.offsets[np.searchsorted(table.ids, sample)]:][:int(kept.sum())]
        assert kept.sum() == min(12, int(meta["visible"][np.searchsorted(meta["ids"], sample)].sum()))
        np.testing.assert_array_equal(tracks[:int(kept.sum())], own)


@pytest.mark.slow
def test_the_loader_augments_the_partner_and_its_tracks_with_the_second_view(video_shards):
    """points1 mapped by matrix1 land where the partner's true landmarks land in view 1."""
    import functools

    cfg = load_config(None, [*TINY, *VIDEO])
    aug = dataclasses.replace(cfg.augment, batch_size=8, noise_std=0.0)
    meta = load_samples_meta(video_shards)
    pairs = functools.partial(TemporalPairs, meta=meta, table=_truth_table(meta), max_points=12,
                              cfg=TemporalConfig(share=1.0, window=2), seed=0)
    loader = build_loader(video_shards, aug, views=2, seed=1, cache_dir=video_shards.parent / "cache", pairs=pairs)
    batch = next(iter(loader))
    assert {"partner_id", "points1", "points1_ok"} <= set(batch)
    rows_a = np.searchsorted(meta["ids"], batch["id"].numpy())
    rows_b = np.searchsorted(meta["ids"], batch["partner_id"].numpy())
    assert (meta["videos"][rows_a] == meta["videos"][rows_b]).all() and (rows_a != rows_b).all()
    tracked = transform_points(torch.nan_to_num(batch["points1"]), batch["matrix1"])
    errors = []
    for k in range(len(rows_a)):
        vis = meta["visible"][rows_a[k]]
        n = int(vis.sum())
        truth = torch.as_tensor(meta["landmarks"][rows_b[k]][vis][None], dtype=torch.float32)
        truth_in_view = transform_points(truth, batch["matrix1"][k:k + 1])[0]
        ok = batch["points1_ok"][k, :n] & torch.as_tensor(meta["visible"][rows_b[k]][vis])
        errors.append((tracked[k, :n][ok] - truth_in_view[ok]).norm(dim=1))
    errors = torch.cat(errors)
    assert len(errors) > 20 and errors.median() < 1.0


def test_the_step_gives_view_one_the_tracks_and_leaves_lost_ones_out():
    lab = {"points": torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]]),
           "valid": torch.tensor([[True, True, False]]), "labels": torch.tensor([[4, 5, -1]])}
    assert _tracked({}, lab) is lab  # still images: both views look the table up
    batch = {"points1": torch.tensor([[[3.0, 3.0], [float("nan"), float("nan")], [float("nan")] * 2, [7.0, 7.0]]]),
             "points1_ok": torch.tensor([[True, False, False, True]])}
    view1 = _tracked(batch, lab)
    assert view1["points"].tolist() == [[[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]]]
    assert view1["valid"].tolist() == [[True, False, False]] and view1["labels"] is lab["labels"]


def test_temporal_jitter_measures_motion_errors_relative_to_the_motion():
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(2, 10, 3, 2))
    gt = np.concatenate([np.cumsum(steps[0], 0), np.cumsum(steps[1], 0)])
    videos, frames = np.repeat(["a", "b"], 10), np.tile(np.arange(10), 2)
    assert temporal_jitter(gt, gt, videos, frames) == 0
    assert temporal_jitter(gt + 5.0, gt, videos, frames) == pytest.approx(0, abs=1e-12)  # an offset does not jitter
    still = np.repeat(gt[[0, 10]], 10, axis=0)  # landmarks that never move: error = the motion itself
    assert temporal_jitter(still, gt, videos, frames) == pytest.approx(1.0)
    noisy = gt + rng.normal(scale=0.5, size=gt.shape)
    shuffled = rng.permutation(20)  # the frame order, not the row order, defines consecutive frames
    assert temporal_jitter(noisy[shuffled], gt[shuffled], videos[shuffled], frames[shuffled]) == pytest.approx(
        temporal_jitter(noisy, gt, videos, frames))
    assert 0.2 < temporal_jitter(noisy, gt, videos, frames) < 2.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_run_with_temporal_pairs_resumes_bit_identically(video_shards, tmp_path):
    """Rank 1 SIGKILLed after step 6 of round 1: both ranks restart from the step-4
    checkpoint, redraw the same partners and end with the uninterrupted run's weights."""
    args = ["-m", "k2l_dist.cli", "train", "configs/video_quickstart.yaml", *TINY, *VIDEO,
            f"data.shards={video_shards}", "dist.timeout_s=60", "stage1.rounds=1", "stage2.iterations=0",
            "eval.test_count=0", "temporal.share=0.5", "checkpoint_every=4",
            "cluster.service=inline"]  # the pairs are the loader's: Ray's start-up would add nothing here
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    jobs = [torchrun_started([*args, f"run_dir={straight}"], tmp_path / "straight.log"),
            torchrun_started([*args, f"run_dir={killed}"], tmp_path / "killed.log",
                             flags=("--max-restarts=1",), env={"K2L_FAULT": "kill:round1:6@rank1"})]
    for job, log in zip(jobs, ("straight.log", "killed.log")):
        assert job.wait(timeout=500) == 0, (tmp_path / log).read_text()[-6000:]
    out = (tmp_path / "killed.log").read_text()
    assert "resumed from" in out and "round phase, step 4 of it" in out
    paired = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage1/temporal_pairs_share", 0) > 0 for r in paired)
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    for name, tensor in a["phi"].items():
        assert torch.equal(b["phi"][name], tensor), name
