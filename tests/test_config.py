import dataclasses
from pathlib import Path

import pytest
import yaml

from k2l_dist.config import Config, ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  size: 64\n  format: mtfl\nkeypoints:\n  count: 30\n")
    cfg = load_config(path, ["data.size=96", "augment.rotation=12.5", "seed=7"])
    assert cfg.data.size == 96  # the override wins over the file
    assert cfg.data.format == "mtfl"  # the file wins over the default
    assert cfg.keypoints.count == 30
    assert cfg.augment.rotation == 12.5
    assert cfg.seed == 7
    assert cfg.data.box == Config().data.box  # untouched default


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(None, ["data.box_scale=2"]).data.box_scale == 2.0
    with pytest.raises(ConfigError, match="data.size"):
        load_config(None, ["data.size=1.5"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.sise=3", "data.sise"),
        ("nonsense=1", "nonsense"),
        ("data.size=abc", "data.size"),
        ("data.strict=3", "data.strict"),
        ("data.root=5", "data.root"),
        ("data=3", "data"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.size"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("keypoints:\n  methd: orb\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "keypoints.methd" in str(err.value) and "bad.yaml" in str(err.value)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["data.size=80", "keypoints.method=sift"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["size"] == 80


def test_every_shipped_config_loads():
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert configs, "configs/ should ship YAML files"
    for path in configs:
        load_config(path)


def test_aflw_config_trains_as_the_mtfl_config_it_says_it_follows():
    """configs/aflw.yaml differs from configs/mtfl_cpu.yaml in its data and split only, as
    its header and the README say: the measured schedule and threshold must not drift apart."""
    aflw, mtfl = load_config(CONFIGS / "aflw.yaml"), load_config(CONFIGS / "mtfl_cpu.yaml")
    for section in ("keypoints", "model", "augment", "cluster", "loss", "stage1", "stage2"):
        assert dataclasses.asdict(getattr(aflw, section)) == dataclasses.asdict(getattr(mtfl, section)), section
