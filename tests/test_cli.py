"""The command line's parsing: overrides before or after options, stray words refused."""

import pytest

from k2l_dist.cli import parse


def test_overrides_may_follow_options():
    args = parse(["ablate", "configs/mtfl_cpu.yaml", "data.limit=30", "--out", "o", "--alone", "cluster.M=20",
                  "stage1.rounds=1", "--grid", "cluster.K=5,6"])
    assert args.overrides == ["data.limit=30", "stage1.rounds=1"]
    assert args.alone == ["cluster.M=20"] and args.grid == ["cluster.K=5,6"] and args.out == "o"
    train = parse(["train", "configs/quickstart.yaml", "--fresh", "seed=3"])
    assert train.fresh and train.overrides == ["seed=3"] and train.config == "configs/quickstart.yaml"


@pytest.mark.parametrize("argv", [["train", "configs/quickstart.yaml", "--bogus"],
                                  ["train", "configs/quickstart.yaml", "--fresh", "notanoverride"],
                                  ["detect", "--checkpoint", "m.pt", "--out", "o.jsonl", "seed=1"]])
def test_stray_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as err:
        parse(argv)
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
