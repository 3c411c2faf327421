"""A short run of the whole method on tiny synthetic data: it must learn something.

The learned landmarks must beat the mean-shape baseline of the same run (predicting the
training mean annotation), which a broken extraction, clustering, loss or regression
would not. Slow by the suite's standards (about a minute), so kept to one run.
"""

import json

import pytest

from k2l_dist.config import load_config
from k2l_dist.training.run import train
from tests.tiny import LEARNS


@pytest.mark.slow
def test_tiny_synthetic_run_beats_the_mean_shape(tmp_path, capsys):
    cfg = load_config(None, [*LEARNS, f"run_dir={tmp_path / 'run'}"])
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["forward_nme"] == pytest.approx(metrics["forward_nme"])
    assert metrics["forward_nme"] < 0.95 * metrics["mean_shape_nme"], metrics
    assert 0 < metrics["keypoint_baseline_backward_nme"] < 10 and 0 < metrics["stage1_backward_nme"] < 10
    for name in ("config.yaml", "model.pt", "checkpoint.pt", "ced.png", "landmarks_test.png"):
        assert (tmp_path / "run" / name).is_file(), name
    # watching it: the folder and TensorBoard named first, one step axis through both stages
    out = capsys.readouterr().out
    assert out.startswith(f"run folder: {tmp_path / 'run'}  (watch it: tensorboard --logdir "), out[:200]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stage1 = [r["step"] for r in rows if "stage1/loss" in r]
    stage2 = [r["step"] for r in rows if "stage2/loss" in r]
    assert stage1 and stage2 and max(stage1) < min(stage2) and max(stage2) <= 150 + 2 * 100 + 200
    rounds = [r["step"] for r in rows if "round/number" in r]
    assert rounds == [150, 250]  # each round marked where it starts
    assert [r["step"] for r in rows if "eval/forward_nme" in r] == [max(stage2)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ablate_runs_every_setting_on_shared_shards_and_tabulates_them(tmp_path, capsys):
    """In this process, and as parallel `k2l train` processes (--jobs 2) with the same metrics."""
    from k2l_dist.cli import main
    from tests.tiny import TINY

    grid = ["--grid", "loss.negatives=same_image,different_clusters"]
    # one thread per run in both forms: the same float order, so the same numbers
    args = ["ablate", "configs/quickstart.yaml", *TINY, "stage1.rounds=1", "stage2.iterations=2", "dist.threads=1",
            *grid]
    assert main([*args, "--out", str(tmp_path / "in_turn")]) == 0
    table = (tmp_path / "in_turn" / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| same_image") or
            line.startswith("| different_clusters")]
    assert len(rows) == 2 and all(len(r.split("|")) == 10 for r in rows)  # setting + 6 metrics + time
    assert [p.name for p in (tmp_path / "in_turn").iterdir() if p.name.startswith("shards")] == ["shards"]
    first = (tmp_path / "in_turn" / "negatives=same_image" / "metrics.json").read_text()
    assert main([*args, "--out", str(tmp_path / "in_turn")]) == 0  # a rerun reads the finished runs back
    assert (tmp_path / "in_turn" / "negatives=same_image" / "metrics.json").read_text() == first
    assert capsys.readouterr().out.count("is a finished run") == 2

    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "shards").symlink_to(tmp_path / "in_turn" / "shards")
    assert main([*args, "--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count(": started on cores") == 2 and out.count(": finished in") == 2, out
    for name in ("negatives=same_image", "negatives=different_clusters"):
        in_turn = json.loads((tmp_path / "in_turn" / name / "metrics.json").read_text())
        parallel = json.loads((tmp_path / "parallel" / name / "metrics.json").read_text())
        for key in ("forward_nme", "backward_nme", "stage1_forward_nme", "raw_accuracy"):
            assert parallel[key] == in_turn[key], (name, key)
        assert "run folder:" in (tmp_path / "parallel" / f"{name}.log").read_text()
        # the saved configs agree but for the folders: either form resumes the other's runs
        saved = [(tmp_path / form / name / "config.yaml").read_text().replace(str(tmp_path / form), "OUT")
                 for form in ("in_turn", "parallel")]
        assert saved[0] == saved[1]
    table_rows = [ln.split("|")[2:8] for ln in (tmp_path / "parallel" / "ablation.md").read_text().splitlines()
                  if ln.startswith("| same_image") or ln.startswith("| different_clusters")]
    assert table_rows == [r.split("|")[2:8] for r in rows]  # the same metric columns
