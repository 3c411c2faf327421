"""`k2l ablate`'s settings and table, without training (the end-to-end test trains a grid)."""

import pytest

from k2l_dist.config import ConfigError
from k2l_dist.training.ablate import ablate, alone_settings, parse_grid, settings, table


def test_alone_runs_the_base_then_each_change_on_its_own():
    runs = alone_settings(["stage1.subpixel=false", "stage1.lr_milestones=[300] stage2.backbone_lr_scale=0.1"])
    assert [r.overrides for r in runs] == [[], ["stage1.subpixel=false"],
                                           ["stage1.lr_milestones=[300]", "stage2.backbone_lr_scale=0.1"]]
    assert [r.name for r in runs] == ["base", "subpixel=false", "lr_milestones=-300-_backbone_lr_scale=0.1"]
    rows = [(r, {"forward_nme": 0.1 + i / 100, "train_seconds": 60.0 * (i + 1)}) for i, r in enumerate(runs)]
    md = table(rows, "configs/mtfl_cpu.yaml", [], ["data.limit=3000"], alone=["stage1.subpixel=false"])
    lines = md.splitlines()
    assert lines[0] == "`k2l ablate configs/mtfl_cpu.yaml --alone 'stage1.subpixel=false' data.limit=3000`"
    assert lines[2].startswith("| change | forward NME")
    assert lines[4].startswith("| as configured | 0.1000 |") and lines[4].endswith("| 1.0 |")
    assert lines[5].startswith("| stage1.subpixel=false | 0.1100 |")


def test_grid_runs_every_combination():
    runs = settings(parse_grid(["cluster.M=30,60", "stage1.flip=true,false"]))
    assert [r.overrides for r in runs] == [["cluster.M=30", "stage1.flip=true"], ["cluster.M=30", "stage1.flip=false"],
                                           ["cluster.M=60", "stage1.flip=true"], ["cluster.M=60", "stage1.flip=false"]]


@pytest.mark.parametrize("grid, alone, match", [
    ([], [], "either --grid"), (["cluster.M=30"], ["cluster.M=60"], "either --grid"),
    ([], ["stage1.subpixel"], "--alone 'stage1.subpixel'"), (["cluster.M"], [], "--grid 'cluster.M'")])
def test_bad_ablation_arguments_are_named(tmp_path, grid, alone, match):
    with pytest.raises(ConfigError, match=match):
        ablate("configs/quickstart.yaml", grid, [], tmp_path, alone=alone)
    assert not any(tmp_path.iterdir())  # nothing was prepared or trained


def test_an_invalid_change_is_refused_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="no_such_key"):
        ablate("configs/quickstart.yaml", [], [], tmp_path, alone=["stage1.subpixel=false", "stage1.no_such_key=1"])
    assert not any(tmp_path.iterdir())


def test_seeds_run_every_setting_per_seed_and_the_table_pairs_them(tmp_path, monkeypatch):
    """A fake training whose forward NME is a known function of the setting and the seed."""
    import statistics

    from k2l_dist.training import run as run_module

    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    (shards / "index.json").write_text("{}")  # prepared: nothing to prepare
    seen = []

    def fake_train(cfg):
        seen.append((cfg.cluster.M, cfg.seed, cfg.cluster.seed, cfg.run_dir))
        noise = [0.010, -0.004, 0.007][cfg.seed]  # the seed-to-seed spread, the same for every setting
        shift = {60: 0.0, 20: -0.020, 120: 0.001}[cfg.cluster.M]  # M=20 really better, M=120 not
        return {"forward_nme": 0.100 + shift + noise, "backward_nme": 0.2 + noise, "train_seconds": 60.0}

    monkeypatch.setattr(run_module, "train", fake_train)
    md = ablate("configs/quickstart.yaml", [], [], tmp_path / "out", alone=["cluster.M=20", "cluster.M=120"],
                seeds=3)
    assert sorted((m, s, c) for m, s, c, _ in seen) == sorted(
        (m, s, s) for m in (60, 20, 120) for s in range(3))  # 3 settings × 3 seeds, seed and cluster.seed
    assert {r for *_, r in seen} == {str(tmp_path / "out" / n / f"seed{s}")
                                     for n in ("base", "M=20", "M=120") for s in range(3)}
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    base_values = [0.110, 0.096, 0.107]
    assert rows[0].startswith(f"| as configured | {statistics.fmean(base_values):.4f} ± "
                              f"{statistics.stdev(base_values):.4f} |")
    # M=20: the same -0.020 on every seed: resolved; M=120: +0.001 each: too, since the noise cancels in pairs
    assert "| -0.0200 ± 0.0000: lower (p = 0.00) |" in rows[1]
    assert "+0.0010 ± 0.0000: higher (p = 0.00)" in rows[2]
    assert "--seeds 3" in md.splitlines()[0]


def test_paired_difference_says_when_seeds_do_not_resolve_a_change():
    from k2l_dist.training.ablate import paired_difference

    mean, sd, p = paired_difference([0.11, 0.09, 0.12], [0.10, 0.10, 0.10])
    assert mean == pytest.approx(0.02 / 3) and sd == pytest.approx(0.01527525, rel=1e-5) and p > 0.05
    mean, sd, p = paired_difference([0.08, 0.07, 0.081], [0.10, 0.09, 0.10])
    assert mean < 0 and p < 0.05
