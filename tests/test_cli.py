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
                                  ["detect", "--checkpoint", "m.pt", "--out", "o.jsonl", "notanoverride"]])
def test_stray_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as err:
        parse(argv)
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


COMMANDS = {  # each command with its required arguments
    "prepare": ["prepare", "--out", "shards"],
    "train": ["train"],
    "ablate": ["ablate", "--out", "runs", "--grid", "cluster.K=5,6"],
    "evaluate": ["evaluate", "runs/q"],
    "detect": ["detect", "--checkpoint", "runs/q", "--images", "imgs", "--out", "o.jsonl"],
    "export": ["export", "runs/q", "--format", "onnx"],
    "fit-names": ["fit-names", "runs/q", "--data", "shards"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_config_and_trailing_overrides(command):
    from k2l_dist.cli import build_parser

    assert set(COMMANDS) == set(build_parser()._subparsers._group_actions[0].choices)  # no command left out
    args = parse([*COMMANDS[command], "--config", "c.yaml", "seed=2", "cluster.K=7"])
    assert args.config == "c.yaml" and args.overrides == ["seed=2", "cluster.K=7"]
    between = parse([*COMMANDS[command], "seed=2", "--config", "c.yaml", "cluster.K=7"])  # options in between
    assert between.overrides == ["seed=2", "cluster.K=7"] and between.config == "c.yaml"
    assert getattr(args, "device", "auto") == "auto"  # one device default wherever there is a --device


def test_logging_is_rank_aware(capsys):
    import logging

    from k2l_dist.utils.logs import configure_logging

    log = logging.getLogger("k2l_dist.clustering.kmeans")
    try:
        configure_logging(rank=0)
        log.info("kmeans: k=10")
        configure_logging(rank=3)  # replaces the handler, never adds a second one
        log.info("not shown on other ranks")
        log.warning("round 2: only 6 images")
        assert len([h for h in logging.getLogger("k2l_dist").handlers if h.get_name() == "k2l"]) == 1
    finally:
        logger = logging.getLogger("k2l_dist")
        for h in [h for h in logger.handlers if h.get_name() == "k2l"]:
            logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
    assert capsys.readouterr().err.splitlines() == ["kmeans: k=10", "[rank 3] round 2: only 6 images"]


def test_debug_keeps_the_traceback(tmp_path, capsys):
    from k2l_dist.cli import main
    from k2l_dist.config import ConfigError

    missing = str(tmp_path / "nope.yaml")
    assert main(["train", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "nope.yaml" in err
    with pytest.raises(ConfigError):
        main(["--debug", "train", missing])


def test_config_as_positional_or_option_and_print_config(capsys):
    import yaml

    from k2l_dist.cli import main

    a = parse(["train", "configs/quickstart.yaml", "seed=3"])
    b = parse(["train", "--config", "configs/quickstart.yaml", "seed=3"])
    assert (a.config, a.overrides) == (b.config, b.overrides) == ("configs/quickstart.yaml", ["seed=3"])
    assert main(["train", "--config", "configs/quickstart.yaml", "--print-config", "seed=3",
                 "stage1.lr_milestones=[5,9]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["stage1"]["lr_milestones"] == [5, 9]
    assert printed["run_dir"] == "runs/quickstart" and printed["cluster"]["K"] == 20  # the file's values
    with pytest.raises(SystemExit):
        parse(["train", "a.yaml", "--config", "b.yaml"])
