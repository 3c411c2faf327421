"""`k2l ablate`: train one config over a grid of settings and tabulate the metrics.

Each setting is a complete run in ``<out>/<setting>`` (``<out>/<setting>/seed<s>`` with
``--seeds N``; rerunning the command resumes the unfinished ones and reads the finished
ones back). Settings that leave the data and the initial keypoints alone share one shard
folder, prepared once. With several seeds every setting runs with seeds 0..N-1 (``seed``
and ``cluster.seed``; the held-out split, ``eval.seed``, stays fixed), the table gives
each metric's mean ± standard deviation and, per setting, the paired difference of its
forward and backward NME to the first setting (same seed against same seed) with a
paired t-test: a difference the seeds do not resolve is said to be within noise.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from k2l_dist.config import ConfigError, load_config
from k2l_dist.utils.io import atomic_write_text
from k2l_dist.utils.processes import exit_description

COLUMNS = [("forward_nme", "forward NME"), ("backward_nme", "backward NME"),
           ("stage1_forward_nme", "Stage-1 forward"), ("keypoint_baseline_nme", "keypoint baseline"),
           ("keypoint_baseline_backward_nme", "keypoint backward"), ("mean_shape_nme", "mean shape")]
OPTIONAL_COLUMNS = [("temporal_jitter", "temporal jitter")]  # shown when a run reports them (video)
_PREPARE_KEYS = ("data.", "keypoints.")


class TrainingFailed(RuntimeError):
    """Some runs of a parallel ablation failed (each is named with its log)."""


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
           alone: list[str] | None = None, seeds: int = 1, jobs: int = 1) -> str:
    """Runs every setting (resuming where a previous call stopped) with ``seeds`` seeds each,
    ``jobs`` trainings at a time; returns the markdown table.

    ``grid_items``: every combination of the values; ``alone``: the base config and each
    change on its own (one of the two)."""
    out = Path(out)
    if bool(grid_items) == bool(alone):
        raise ConfigError("k2l ablate: give either --grid (every combination) or --alone (each change on its own)")
    if seeds < 1:
        raise ConfigError(f"k2l ablate: --seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"k2l ablate: --jobs must be >= 1, got {jobs}")
    if jobs > 1 and config is None:
        raise ConfigError("k2l ablate --jobs: give a config file (each run starts as `k2l train --config FILE`)")
    grid = parse_grid(grid_items) if grid_items else []
    runs = settings(grid) if grid else alone_settings(alone)
    _refuse_shared_folders(runs)
    for setting in runs:  # every setting must be a valid config before any training starts
        load_config(config, [*overrides, *setting.overrides])
    planned = [(setting, [_run_overrides(out, setting, seed, seeds, overrides) for seed in range(seeds)])
               for setting in runs]
    for _, per_seed in planned:
        for run_overrides in per_seed:
            _prepare_once(load_config(config, run_overrides))

    def written(done: list) -> None:
        atomic_write_text(out / "ablation.md", table(done, config, grid, overrides, alone, seeds))

    rows = (_train_in_parallel(config, planned, jobs, written) if jobs > 1 else
            _train_in_turn(config, planned, written))
    atomic_write_text(out / "ablation.md", table(rows, config, grid, overrides, alone, seeds))
    atomic_write_text(out / "ablation.json", json.dumps(
        [{"setting": dict(s.values), "metrics": m if seeds > 1 else m[0]} for s, m in rows], indent=1))
    return table(rows, config, grid, overrides, alone, seeds)


def _run_overrides(out: Path, setting: Setting, seed: int, seeds: int, overrides: list[str]) -> list[str]:
    """The overrides of one run: shared, the setting's, its seed, its folder and its shards."""
    own_shards = any(k.startswith(_PREPARE_KEYS) for k, _ in setting.values)
    shards = out / (f"shards_{setting.name}" if own_shards else "shards")
    run_dir = out / setting.name / f"seed{seed}" if seeds > 1 else out / setting.name
    seeded = [f"seed={seed}", f"cluster.seed={seed}"] if seeds > 1 else []
    return [*overrides, *setting.overrides, *seeded, f"run_dir={run_dir}", f"data.shards={shards}"]


def _refuse_shared_folders(runs: list[Setting]) -> None:
    """Two settings whose names agree (keys are shortened to their last part) would share a run folder."""
    seen: dict[str, Setting] = {}
    for setting in runs:
        other = seen.setdefault(setting.name, setting)
        if other is not setting:
            raise ConfigError(f"k2l ablate: {' '.join(other.overrides)!r} and {' '.join(setting.overrides)!r} "
                              f"would share the run folder {setting.name!r}; run them in separate ablations")


def _prepare_once(cfg) -> None:
    from k2l_dist.prepare import is_prepared, prepare

    if not is_prepared(cfg.data.shards):
        print(prepare(cfg, Path(cfg.data.shards)).text())


def _train_in_turn(config, planned: list, written) -> list[tuple[Setting, list[dict]]]:
    """One run after the other in this process; ``written(rows so far)`` after each."""
    from k2l_dist.training.run import train

    rows: list[tuple[Setting, list[dict]]] = []
    for setting, per_seed in planned:
        rows.append((setting, []))
        for run_overrides in per_seed:
            rows[-1][1].append(train(load_config(config, run_overrides)))
            written(rows)
    return rows


def _train_in_parallel(config, planned: list, jobs: int, written) -> list[tuple[Setting, list[dict]]]:
    """Every run as its own `k2l train` process, ``jobs`` at a time, each on its own cores (and
    GPU). When some fail, the others' results are kept, the settings whose runs all finished
    are tabulated (``written``) and the failed runs are named with their logs; a rerun
    resumes them."""
    import torch

    from k2l_dist.training.jobs import Job, run_jobs

    per_setting = []  # (setting, [(job, run folder) per seed])
    for setting, per_seed in planned:
        runs = []
        for seed, run_overrides in enumerate(per_seed):
            run_dir = Path(load_config(config, run_overrides).run_dir)
            command = [sys.executable, "-m", "k2l_dist.cli", "train", "--config", str(config), *run_overrides]
            runs.append((Job(f"{setting.name} seed {seed}", command, run_dir.parent / f"{run_dir.name}.log"), run_dir))
        per_setting.append((setting, runs))
    todo = [job for _, runs in per_setting for job, _ in runs]
    codes = run_jobs(todo, jobs, gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    finished = [(setting, [_finished_metrics(run_dir) for _, run_dir in runs]
                 if all(codes[job.name] == 0 for job, _ in runs) else None) for setting, runs in per_setting]
    failed = [f"{job.name} ({exit_description(codes[job.name])}; log: {job.log})"
              for job in todo if codes[job.name] != 0]
    if failed:
        if finished[0][1] is not None:  # the differences are to the first setting: only with it
            written([(setting, runs) for setting, runs in finished if runs is not None])
        raise TrainingFailed(f"k2l ablate: {len(failed)} of {len(todo)} runs failed; the others are kept and a "
                             f"rerun resumes these: " + "; ".join(failed))
    return finished


def _finished_metrics(run_dir: Path) -> dict:
    """A run whose `k2l train` exited 0 finished as its config asks: its metrics.json holds what
    train() returned."""
    return json.loads((run_dir / "metrics.json").read_text())


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def paired_difference(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """Mean and standard deviation of ``values[i] - base[i]`` and the two-sided p-value of a
    paired t-test (NaN with fewer than 2 pairs; 0 when every difference is the same non-zero value)."""
    diffs = [v - b for v, b in zip(values, base)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    sd = statistics.stdev(diffs)
    if sd == 0:
        return mean, 0.0, 0.0 if mean != 0 else 1.0
    from scipy.stats import t as student

    t = mean / (sd / math.sqrt(len(diffs)))
    return mean, sd, float(2 * student.sf(abs(t), len(diffs) - 1))


def _verdict(metric: str, values: list[float], base: list[float]) -> str:
    mean, sd, p = paired_difference(values, base)
    if math.isnan(p):
        return f"{mean:+.4f}"
    word = "lower" if mean < 0 else "higher"
    said = f"{word} (p = {p:.2f})" if p < 0.05 else f"within noise (p = {p:.2f})"
    return f"{mean:+.4f} ± {sd:.4f}: {said}"


def table(rows: list, config, grid: list[tuple[str, list[str]]], overrides: list[str],
          alone: list[str] | None = None, seeds: int = 1) -> str:
    """The markdown table of ``rows`` = ``[(setting, [metrics of seed 0, 1, …]), …]``."""
    keys = [k for k, _ in grid] or ["change"]
    paired = seeds > 1
    reported = [m for _, runs in rows for m in (runs if isinstance(runs, list) else [runs])]
    columns = [*COLUMNS, *((key, name) for key, name in OPTIONAL_COLUMNS if any(key in m for m in reported))]
    compared = [("forward_nme", "forward"), ("backward_nme", "backward"),
                *((key, name) for key, name in columns[len(COLUMNS):])]
    extra = [f"{name} vs the first row" for _, name in compared] if paired else []
    head = ["| " + " | ".join([*keys, *(c for _, c in columns), *extra, "train min"]) + " |",
            "|" + "---|" * (len(keys) + len(columns) + len(extra) + 1)]
    lines = []
    base = rows[0][1] if rows else []
    for setting, runs in rows:
        runs = runs if isinstance(runs, list) else [runs]
        cells = [v for _, v in setting.values] if grid else [" ".join(setting.overrides) or "as configured"]
        for key, _ in columns:
            values = [m[key] for m in runs if isinstance(m.get(key), float)]
            cells.append(_mean_sd(values) if values else "—")
        if paired:
            for key, _ in compared:
                pairs = [(m[key], b[key]) for m, b in zip(runs, base) if isinstance(m.get(key), float)
                         and isinstance(b.get(key), float)]
                cells.append("—" if setting is rows[0][0] or not pairs else
                             _verdict(key, [v for v, _ in pairs], [b for _, b in pairs]))
        cells.append(f"{statistics.fmean(m.get('train_seconds', 0) for m in runs) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    cmd = " ".join(["k2l ablate", str(config or ""), *(f"--grid {k}={','.join(v)}" for k, v in grid),
                    *(f"--alone '{c}'" for c in alone or []), *([f"--seeds {seeds}"] if paired else []), *overrides])
    note = [f"Seeds 0–{seeds - 1} (`seed` and `cluster.seed`), the same held-out split; mean ± standard deviation "
            "over the seeds; a difference to the first row is the mean of the per-seed differences ± their standard "
            "deviation, with a paired t-test.", ""] if paired else []
    return "\n".join([f"`{cmd}`", "", *note, *head, *lines, ""])
