"""A run interrupted after a round resumes exactly: same weights as an uninterrupted run."""

import pytest
import torch

from k2l_dist.config import load_config
from k2l_dist.train.checkpoint import load_checkpoint
from k2l_dist.train.run import train

TINY = [
    "progress=false", "data.format=synthetic", "data.synthetic_count=120", "data.synthetic_render_size=96",
    "data.size=48", "data.box=landmarks", "data.box_scale=1.5", "keypoints.count=30", "model.width=16",
    "model.depth=2", "model.descriptor_dim=16", "augment.batch_size=8", "cluster.K=6", "cluster.M=12",
    "stage1.warmup_iters=10", "stage1.iters_per_round=10", "stage1.max_points=24", "stage1.extract_points=12",
    "stage2.iterations=5", "eval.test_count=30", "eval.svt_iters=50",
]


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, capsys):
    shards = tmp_path / "shards"
    straight = load_config(None, [*TINY, f"run_dir={tmp_path / 'a'}", f"data.shards={shards}", "stage1.rounds=2"])
    train(straight)
    first = load_config(None, [*TINY, f"run_dir={tmp_path / 'b'}", f"data.shards={shards}", "stage1.rounds=1"])
    train(first)
    capsys.readouterr()
    train(load_config(None, [*TINY, f"run_dir={tmp_path / 'b'}", f"data.shards={shards}", "stage1.rounds=2"]))
    assert "resumed from" in capsys.readouterr().out
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["round"] == b["round"] == 2 and a["step"] == b["step"] == 30
    for name, tensor in a["phi"].items():
        torch.testing.assert_close(b["phi"][name], tensor, rtol=0, atol=0, msg=name)
    for key in ("points", "labels", "flipped_labels"):
        assert torch.equal(a["labels"][key], b["labels"][key])
