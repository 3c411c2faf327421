"""A run interrupted after a round resumes exactly: same weights as an uninterrupted run."""

import pytest
import torch

from k2l_dist.config import load_config
from k2l_dist.data.prepare import prepare
from k2l_dist.train.checkpoint import load_checkpoint
from k2l_dist.train.run import train
from tests.tiny import TINY



@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, capsys):
    shards = tmp_path / "shards"
    prepare(load_config(None, TINY), shards)
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
