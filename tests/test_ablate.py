"""`k2l ablate`'s settings and table, without training (the end-to-end test trains a grid)."""

import pytest

from k2l_dist.config import ConfigError
from k2l_dist.train.ablate import ablate, alone_settings, parse_grid, settings, table


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
