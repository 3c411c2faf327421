"""A run interrupted after a round resumes exactly: same weights as an uninterrupted run."""

import json

import pytest
import torch

from k2l_dist.config import load_config
from k2l_dist.training.run import train
from k2l_dist.utils.checkpoint import load_checkpoint
from tests.tiny import TINY


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(shards, tmp_path, capsys):
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


@pytest.mark.slow
def test_a_run_stopped_inside_a_phase_resumes_at_the_same_batch(shards, tmp_path, monkeypatch, capsys):
    """Checkpoints every 4 iterations; stopped after step 6 of round 1 and of Stage 2, the
    resumed run ends with the weights and metrics of an uninterrupted one."""
    args = [*TINY, f"data.shards={shards}", "stage1.rounds=2", "stage2.iterations=10", "checkpoint_every=4"]
    straight = train(load_config(None, [*args, f"run_dir={tmp_path / 'a'}"]))
    cut = load_config(None, [*args, f"run_dir={tmp_path / 'b'}"])
    monkeypatch.setenv("K2L_FAULT", "stop:round1:6")  # after the in-phase checkpoint at step 4
    with pytest.raises(RuntimeError, match="injected fault"):
        train(cut)
    monkeypatch.setenv("K2L_FAULT", "stop:stage2:7")  # the resumed run, stopped again in Stage 2
    with pytest.raises(RuntimeError, match="injected fault"):
        train(cut)
    out = capsys.readouterr().out
    assert "resumed from" in out and "round phase, step 4 of it, 0 round(s) done" in out
    monkeypatch.delenv("K2L_FAULT")
    resumed = train(cut)
    out = capsys.readouterr().out
    assert "stage2 phase, step 4" in out
    for key in ("forward_nme", "backward_nme", "stage1_forward_nme"):
        assert resumed[key] == straight[key], key
    a, b = load_checkpoint(tmp_path / "a" / "model.pt"), load_checkpoint(tmp_path / "b" / "model.pt")
    for name in ("psi", "phi"):
        for key, tensor in a[name].items():
            assert torch.equal(b[name][key], tensor), (name, key)
    # a finished run rerun does nothing and says so
    again = train(cut)
    assert "is a finished run" in capsys.readouterr().out and again == resumed


@pytest.mark.slow
def test_a_run_with_partial_rounds_resumed_before_one_matches_an_uninterrupted_one(shards, tmp_path, monkeypatch):
    """stage1.extract_fraction: round 2 of 3 re-extracts half the images and carries the
    others' labels from the checkpoint's table; stopped as round 2 starts extracting, the
    resumed run ends where an uninterrupted one does."""
    args = [*TINY, f"data.shards={shards}", "stage1.rounds=3", "stage1.extract_fraction=0.5"]
    train(load_config(None, [*args, f"run_dir={tmp_path / 'a'}"]))
    cut = load_config(None, [*args, f"run_dir={tmp_path / 'b'}"])
    monkeypatch.setenv("K2L_FAULT", "stop:extract-round2:0")
    with pytest.raises(RuntimeError, match="injected fault"):
        train(cut)
    monkeypatch.delenv("K2L_FAULT")
    train(cut)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for name, tensor in a["phi"].items():
        torch.testing.assert_close(b["phi"][name], tensor, rtol=0, atol=0, msg=name)
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    shares = [r["round/extracted_share"] for r in records if "round/extracted_share" in r]
    assert shares == [1.0, 0.5, 1.0]
