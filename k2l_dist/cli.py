"""The `k2l` command line: prepare, train, ablate, evaluate, detect, export.

Every subcommand resolves one :class:`~k2l_dist.config.Config` the same way: defaults (for
evaluate, detect and export: the run's saved config) ← ``--config FILE`` ← the
subcommand's flags ← trailing ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import errno
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from k2l_dist.config import (
    ConfigError,
    CropBox,
    DataFormat,
    KeypointMethod,
    apply_values,
    config_yaml,
    load_config,
    nest_values,
    run_config,
    validate,
)

# flag name → dotted config key, for `k2l prepare`
PREPARE_FLAGS = {
    "format": "data.format",
    "root": "data.root",
    "annotations": "data.annotations",
    "test_list": "data.test_list",
    "train_list": "data.train_list",
    "size": "data.size",
    "box": "data.box",
    "box_scale": "data.box_scale",
    "box_file": "data.box_file",
    "samples_per_shard": "data.samples_per_shard",
    "limit": "data.limit",
    "workers": "data.workers",
    "frame_every": "data.frame_every",
    "synthetic_frames": "data.synthetic_frames",
    "synthetic_count": "data.synthetic_count",
    "synthetic_seed": "data.synthetic_seed",
    "keypoints": "keypoints.method",
    "count": "keypoints.count",
    "superpoint_weights": "keypoints.superpoint_weights",
    "outlier_fraction": "keypoints.outlier_fraction",
    "seed": "seed",
}


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="turn a dataset into WebDataset shards with initial keypoints",
                       description="Crop, resize and detect generic keypoints on a dataset; write "
                                   "WebDataset shards + index into --out.")
    p.add_argument("--config", help="YAML config whose data/keypoints sections are the defaults")
    p.add_argument("--out", help="output folder for shards and index")
    p.add_argument("--format", choices=get_args(DataFormat))
    p.add_argument("--root", help="dataset root (annotation paths are relative to it)")
    p.add_argument("--annotations", help="annotation file (mtfl, aflw: MTFL training.txt; "
                                         "mafl: list_landmarks_align_celeba.txt; lsp, lspet: joints.mat; "
                                         "bbcpose: bbcpose.mat)")
    p.add_argument("--test-list", help="the dataset's test list, recorded for eval.split=protocol "
                                       "(mafl: MAFL testing.txt; aflw: MTFL testing.txt)")
    p.add_argument("--train-list", help="mafl: MAFL training.txt (the images the regressors are fitted on)")
    p.add_argument("--size", type=int, help="side of the square crops, pixels (e.g. 128 or 256)")
    p.add_argument("--box", choices=get_args(CropBox), help="crop box")
    p.add_argument("--box-scale", type=float, help="box side / longer side of the landmark (or file) box")
    p.add_argument("--box-file", help="lines 'relative/path x y w h' for --box file")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--limit", type=int, help="keep at most this many images")
    p.add_argument("--workers", type=int, help="worker processes")
    p.add_argument("--synthetic-count", type=int, help="images for --format synthetic (clips: synthetic_video)")
    p.add_argument("--synthetic-seed", type=int)
    p.add_argument("--synthetic-frames", type=int, help="frames per clip for --format synthetic_video")
    p.add_argument("--frame-every", type=int, help="video formats: keep one training frame in N (0: the protocol's)")
    p.add_argument("--keypoints", choices=get_args(KeypointMethod), help="generic keypoint method")
    p.add_argument("--count", type=int, help="keypoints kept per image by ANMS")
    p.add_argument("--superpoint-weights", help="SuperPoint state dict (none ship with k2l-dist)")
    p.add_argument("--outlier-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--strict", action="store_true", default=None, help="bad input is an error, not a counted skip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    _print_config_arg(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _cmd_prepare(args) -> int:
    from k2l_dist.prepare import prepare

    flags = {key: getattr(args, name) for name, key in PREPARE_FLAGS.items() if getattr(args, name) is not None}
    if args.strict:
        flags["data.strict"] = True
    cfg = load_config(args.config)
    cfg = apply_values(cfg, nest_values(flags))
    cfg = load_config(None, args.overrides, base=cfg)
    if args.print_config:
        return _print_config(cfg)
    summary = prepare(cfg, args.out, overwrite=args.overwrite)
    print(summary.text())
    print(f"shards and index written to {args.out}")
    return 0


def _cmd_train(args) -> int:
    from k2l_dist.training.run import train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    metrics = train(cfg, resume=not args.fresh)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not per process
        print(_summary(cfg.run_dir, metrics))
    return 0


def _print_config(cfg) -> int:
    """--print-config: the resolved config as YAML, after the checks a run would make."""
    validate(cfg)
    print(config_yaml(cfg), end="")
    return 0


def _print_run_config(args) -> int:
    """--print-config of evaluate, detect and export: the run's saved config as they resolve it."""
    from k2l_dist.utils.checkpoint import load_checkpoint, model_file

    saved = load_checkpoint(model_file(args.run))["config"]
    return _print_config(run_config(saved, args.config, tuple(args.overrides)))


def _run_command(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that starts from a run's saved config: with --print-config it shows that
    config as the command resolves it, and does nothing else."""
    @functools.wraps(command)
    def run_or_print(args: argparse.Namespace) -> int:
        return _print_run_config(args) if args.print_config else command(args)
    return run_or_print


def _summary(run_dir: str, metrics: dict) -> str:
    lines = [f"run folder: {run_dir}  (tensorboard --logdir {Path(run_dir) / 'tensorboard'})"]
    keys = ["forward_nme", "backward_nme", "stage1_forward_nme", "stage1_backward_nme", "keypoint_baseline_nme",
            "keypoint_baseline_backward_nme", "mean_shape_nme", "forward_pck", "mean_shape_pck", "raw_accuracy",
            "train_seconds", "samples_skipped", "eval_images_skipped"]
    for key in keys:
        if key in metrics and metrics[key] is not None:
            value = metrics[key]
            lines.append(f"  {key:31s} {value:.4f}" if isinstance(value, float) else f"  {key:31s} {value}")
    per_landmark = metrics.get("raw_accuracy_per_landmark") or {}
    if per_landmark:
        lines.append("  raw accuracy per landmark:     " + ", ".join(f"{k} {v:.2f}" for k, v in per_landmark.items()))
    if metrics.get("samples_skipped"):
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(metrics["samples_skipped_by_reason"].items()))
        lines.append(f"  unreadable samples left out of training and evaluation: {reasons}")
    return "\n".join(lines)


def _cmd_ablate(args) -> int:
    from k2l_dist.training.ablate import ablate

    if args.print_config:
        return _print_config(load_config(args.config, args.overrides))
    print(ablate(args.config, args.grid or [], args.overrides, args.out, alone=args.alone, seeds=args.seeds,
                 jobs=args.jobs))
    return 0


@_run_command
def _cmd_evaluate(args) -> int:
    from k2l_dist.eval.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.run, device=args.device, overrides=args.overrides, config=args.config)
    print(_summary(args.run, metrics))
    return 0


@_run_command
def _cmd_detect(args) -> int:
    from k2l_dist.eval.detect import detect

    if not args.out:
        raise ConfigError("detect: give --out FILE.jsonl for the landmarks")
    result = detect(args.run, args.out, data=args.data, images=args.images, video=args.video, draw=args.draw,
                    min_confidence=args.min_confidence, device=args.device, config=args.config,
                    overrides=tuple(args.overrides), named=args.named)
    unit = "frames" if args.video else "images"
    print(f"{result.written} {unit} → {args.out}" + (f", drawings in {args.draw}" if args.draw else ""))
    if result.skipped:
        print(f"{len(result.skipped)} images skipped, each named in a warning above")
    return 0


@_run_command
def _cmd_export(args) -> int:
    """Write Ψ with its input normalisation, flip test and sub-pixel peak decoding as one file:
    inputs uint8 crops (B,S,S,3) and their boxes (B,3), outputs landmarks (B,K,2) in original
    pixels and confidence (B,K)."""
    from k2l_dist.eval.export import export

    if not args.format:
        raise ConfigError("export: give --format torchscript or --format onnx")
    print(f"wrote {export(args.run, args.format, args.out, config=args.config, overrides=tuple(args.overrides))}")
    return 0


@_run_command
def _cmd_fit_names(args) -> int:
    """Fit the map from the run's K landmarks to the landmarks annotated in --data (shards
    prepared at the model's crop size) and save it as the run's names.json, which `k2l detect
    --named` and load_detector(..., named=True) then use."""
    from k2l_dist.eval.detect import fit_names_on_shards

    path = fit_names_on_shards(args.run, args.data, device=args.device, config=args.config,
                               overrides=tuple(args.overrides))
    print(f"wrote {path}: `k2l detect {args.run} --named …` and load_detector(…, named=True) now use it")
    return 0


def _run_config_args(p: argparse.ArgumentParser) -> None:
    """The run, --config and overrides for the commands that start from a run's saved config."""
    p.add_argument("run", nargs="?", help="the run folder, its model.pt or its checkpoint.pt (or --checkpoint)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's saved config")
    p.add_argument("--checkpoint", metavar="RUN", help="the same as the positional RUN")
    p.add_argument("--config", help="YAML whose values override the run's saved config")
    _print_config_arg(p)


def _config_args(p: argparse.ArgumentParser, example: str, overrides_help: str) -> None:
    """The config file (positional or --config) and key=value overrides of train and ablate."""
    p.add_argument("config", nargs="?", help=f"YAML config, e.g. {example} (or --config)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--config", dest="config_file", metavar="FILE", help="YAML config (the same as the positional)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")


def _print_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (checked as a run would check it) and exit")


class _Backends(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from k2l_dist.utils.backends import describe

        print(describe())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from k2l_dist.utils.version import package_version

    parser = argparse.ArgumentParser(prog="k2l", description="Unsupervised object-landmark discovery (K2L).")
    parser.add_argument("--version", action="version", version=f"k2l-dist {package_version()}")
    parser.add_argument("--backends", action=_Backends, help="print the torch, Faiss and DALI builds found, and exit")
    parser.add_argument("--debug", action="store_true",
                        help="errors with their traceback (default: one line for errors in the input)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    sub.choices["prepare"].set_defaults(func=_cmd_prepare)

    _add_train(sub)
    _add_evaluate(sub)
    _add_detect(sub)
    _add_export(sub)
    _add_fit_names(sub)
    _add_ablate(sub)
    return parser


def _command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
             **parser_args: str) -> argparse.ArgumentParser:
    """The subcommand ``name``, run by ``func`` (its description, unless given: ``func``'s docstring)."""
    parser_args.setdefault("description", inspect.cleandoc(func.__doc__ or "") or None)
    p = sub.add_parser(name, **parser_args)
    p.set_defaults(func=func)
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "train", _cmd_train, help="prepare-if-needed, Stage 1, Stage 2 and evaluation",
                 description="Train from a config; resumes from <run_dir>/checkpoint.pt if present.")
    _config_args(p, "configs/quickstart.yaml", "key=value config overrides")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    _print_config_arg(p)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "evaluate", _cmd_evaluate, help="forward/backward NME and baselines of a finished run")
    _run_config_args(p)
    _device_arg(p)


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "detect", _cmd_detect, help="landmarks in original image pixels, as JSON lines")
    p.add_argument("--data", help="shards from `k2l prepare` (any dataset)")
    p.add_argument("--images", help="an image file or a folder of images (read in memory)")
    p.add_argument("--video", help="a video file (one JSON line per frame)")
    p.add_argument("--out", help="output .jsonl")
    p.add_argument("--draw", help="folder for the images with landmarks drawn (a .avi or .mp4 file for --video)")
    _run_config_args(p)
    p.add_argument("--min-confidence", type=float, default=0.0, help="landmarks below this peak value are null")
    p.add_argument("--named", action="store_true",
                   help="the annotated landmarks ({\"left_eye\": [x, y], …}) through the run's names.json")
    _device_arg(p)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "export", _cmd_export, help="a run's detector as TorchScript or ONNX, with its pre- and "
                 "post-processing")
    p.add_argument("--format", choices=["torchscript", "onnx"], help="required, except with --print-config")
    p.add_argument("--out", help="output file (default: RUN/detector.ts or RUN/detector.onnx)")
    _run_config_args(p)


def _add_fit_names(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "fit-names", _cmd_fit_names, help="name a run's landmarks after the annotated ones of "
                 "some shards")
    p.add_argument("--data", required=True, help="annotated shards from `k2l prepare`")
    _run_config_args(p)
    _device_arg(p)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "ablate", _cmd_ablate,
                 help="train a config over a grid of settings; a markdown table of the metrics",
                 description="One run per combination of the --grid values (or the base and each --alone "
                             "change), in <out>/<setting> (rerun to resume); the table goes to <out>/ablation.md.")
    _config_args(p, "configs/mtfl_cpu.yaml", "key=value overrides shared by every setting")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a key and its values (repeat for more keys: every combination runs)")
    p.add_argument("--alone", action="append", metavar="'KEY=V [KEY=V …]'",
                   help="instead of --grid: the config as it is, then each --alone change on its own "
                        "(one or more overrides that belong together)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per setting, seeds 0..N-1; the table gives mean ± sd and paired differences")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at once, each a `k2l train` process on its own share of the cores (and its "
                        "own GPU, round-robin), its output in <run folder>.log; default 1 (in this process)")
    p.add_argument("--out", help="folder for the runs, the shared shards and the table")
    _print_config_arg(p)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (argparse alone stops taking
    positionals after the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    stray += [a for a in getattr(args, "overrides", []) if "=" not in a]  # a word where an override belongs
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "config_file"):  # `CMD CONFIG k=v …` or `CMD --config CONFIG k=v …`
        if args.config is not None and "=" in args.config:
            args.overrides, args.config = [args.config, *args.overrides], None
        if args.config and args.config_file:
            parser.error(f"two configs: {args.config} and --config {args.config_file}")
        args.config = args.config or args.config_file
        if not args.config:
            parser.error(f"{args.command}: give a config file (positional or --config)")
    if hasattr(args, "checkpoint"):  # `CMD RUN k=v …` or `CMD --checkpoint RUN k=v …`
        if args.run is not None and "=" in args.run and not Path(args.run).exists() and hasattr(args, "overrides"):
            args.overrides, args.run = [args.run, *args.overrides], None
        if args.run and args.checkpoint:
            parser.error(f"unrecognized arguments: {args.run} (the run is already given by --checkpoint "
                         f"{args.checkpoint})")
        args.run = args.run or args.checkpoint
        if not args.run:
            parser.error(f"{args.command}: give the run folder (or its model.pt), positional or --checkpoint")
    needs_out = {"prepare": "the folder for the shards", "ablate": "the folder for the runs and the table"}
    if args.command in needs_out and not args.out and not args.print_config:
        parser.error(f"{args.command}: give --out, {needs_out[args.command]}")
    return args


def _os_error(err: OSError) -> str:
    """``err`` in one line: what failed, on which file."""
    reason = (err.strerror or str(err)).lower()
    if err.errno == errno.EFBIG:
        reason += " (the file-size limit, ulimit -f)"
    files = " → ".join(str(f) for f in (err.filename, err.filename2) if f)
    return f"{files}: {reason}" if files else reason


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the input's or the environment's: one line, exit code 2."""
    from k2l_dist.clustering.placement import Unplaceable
    from k2l_dist.clustering.ray_service import ClusteringFailed
    from k2l_dist.data.readers import DatasetError
    from k2l_dist.data.shards import ShardError
    from k2l_dist.distributed.ray_runtime import RayUnavailable
    from k2l_dist.distributed.watchdog import PeerLost
    from k2l_dist.prepare import PrepareError
    from k2l_dist.training.ablate import TrainingFailed
    from k2l_dist.training.loop import NonFiniteLoss
    from k2l_dist.utils.backends import MissingBackend
    from k2l_dist.utils.io import StorageError
    from k2l_dist.utils.lock import RunLocked

    return (ConfigError, DatasetError, PrepareError, ShardError, FileNotFoundError, ValueError, NonFiniteLoss,
            StorageError, PeerLost, Unplaceable, ClusteringFailed, RayUnavailable, TimeoutError, RunLocked,
            TrainingFailed, MissingBackend)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line itself (not a caller passing arguments): start tuned
        from k2l_dist.utils.allocator import restart_tuned

        restart_tuned()
    args = parse(argv)
    from k2l_dist.utils.logs import configure_logging

    configure_logging(debug=args.debug)
    from k2l_dist.utils.backends import MissingBackend

    try:
        user_errors = _user_errors()
    except MissingBackend as err:  # the modules that name the errors need Faiss
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except user_errors as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment (permissions, a size limit, a device): the file and the reason
        if args.debug:
            raise
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
