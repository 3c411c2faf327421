"""`k2l ablate`: train one config over a grid of settings and tabulate the metrics.

Each setting is a complete run in ``<out>/<setting>`` (rerunning the command resumes the
unfinished ones and reads the finished ones back). Settings that leave the data and the
initial keypoints alone share one shard folder, prepared once.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from k2l_dist.config import ConfigError, load_config
from k2l_dist.utils.io import atomic_write_text

COLUMNS = [("forward_nme", "forward NME"), ("backward_nme", "backward NME"),
           ("stage1_forward_nme", "Stage-1 forward"), ("keypoint_baseline_nme", "keypoint baseline"),
           ("keypoint_baseline_backward_nme", "keypoint backward"), ("mean_shape_nme", "mean shape")]
_PREPARE_KEYS = ("data.", "keypoints.")


@dataclass(frozen=True)
class Setting:
    values: tuple[tuple[str, str], ...]  # (key, value) in grid order

    @property
    def name(self) -> str:
        text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in self.values) or "base"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["stage1.rounds=2,4", …]`` → ``[("stage1.rounds", ["2", "4"]), …]`` (errors name the item)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,…")
        grid.append((key.strip(), vals))
    return grid


def settings(grid: list[tuple[str, list[str]]]) -> list[Setting]:
    keys = [k for k, _ in grid]
    return [Setting(tuple(zip(keys, combo))) for combo in itertools.product(*(v for _, v in grid))]


def alone_settings(changes: list[str]) -> list[Setting]:
    """The config as it is, then each change on its own: ``"k=v"`` or several overrides that
    belong together, ``"k1=v1 k2=v2"`` (errors name the change)."""
    runs = [Setting(())]
    for change in changes:
        pairs = []
        for item in change.split():
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"--alone {change!r}: expected key=value [key=value …]")
            pairs.append((key, value))
        if not pairs:
            raise ConfigError("--alone '': give at least one key=value")
        runs.append(Setting(tuple(pairs)))
    return runs


def ablate(config: str | Path | None, grid_items: list[str], overrides: list[str], out: str | Path,
           alone: list[str] | None = None) -> str:
    """Runs every setting (resuming where a previous call stopped); returns the markdown table.

    ``grid_items``: every combination of the values; ``alone``: the base config and each
    change on its own (one of the two)."""
    from k2l_dist.train.run import train

    out = Path(out)
    if bool(grid_items) == bool(alone):
        raise ConfigError("k2l ablate: give either --grid (every combination) or --alone (each change on its own)")
    grid = parse_grid(grid_items) if grid_items else []
    runs = settings(grid) if grid else alone_settings(alone)
    for setting in runs:  # every setting must be a valid config before any training starts
        load_config(config, [*overrides, *setting.overrides])
    rows = []
    for setting in runs:
        own_shards = any(k.startswith(_PREPARE_KEYS) for k, _ in setting.values)
        shards = out / (f"shards_{setting.name}" if own_shards else "shards")
        cfg = load_config(config, [*overrides, *setting.overrides, f"run_dir={out / setting.name}",
                                   f"data.shards={shards}"])
        if not (shards / "index.json").is_file():
            from k2l_dist.data.prepare import prepare

            print(prepare(cfg, shards).text())
        rows.append((setting, train(cfg)))
        atomic_write_text(out / "ablation.md", table(rows, config, grid, overrides, alone))
    atomic_write_text(out / "ablation.json", json.dumps(
        [{"setting": dict(s.values), "metrics": m} for s, m in rows], indent=1))
    return table(rows, config, grid, overrides, alone)


def table(rows: list, config, grid: list[tuple[str, list[str]]], overrides: list[str],
          alone: list[str] | None = None) -> str:
    keys = [k for k, _ in grid] or ["change"]
    head = ["| " + " | ".join([*keys, *(c for _, c in COLUMNS), "train min"]) + " |",
            "|" + "---|" * (len(keys) + len(COLUMNS) + 1)]
    lines = []
    for setting, metrics in rows:
        cells = [v for _, v in setting.values] if grid else [" ".join(setting.overrides) or "as configured"]
        cells += [f"{metrics[k]:.4f}" if isinstance(metrics.get(k), float) else "—" for k, _ in COLUMNS]
        cells.append(f"{metrics.get('train_seconds', 0) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    cmd = " ".join(["k2l ablate", str(config or ""), *(f"--grid {k}={','.join(v)}" for k, v in grid),
                    *(f"--alone '{c}'" for c in alone or []), *overrides])
    return "\n".join([f"`{cmd}`", "", *head, *lines, ""])
