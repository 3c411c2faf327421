"""The `k2l` command line: prepare, train, detect, evaluate.

Every subcommand resolves one :class:`~k2l_dist.config.Config` the same way: defaults ←
``--config FILE`` ← the subcommand's flags ← trailing ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from k2l_dist.config import ConfigError, apply_values, load_config

# flag name → dotted config key, for `k2l prepare`
PREPARE_FLAGS = {
    "format": "data.format",
    "root": "data.root",
    "annotations": "data.annotations",
    "size": "data.size",
    "box": "data.box",
    "box_scale": "data.box_scale",
    "box_file": "data.box_file",
    "samples_per_shard": "data.samples_per_shard",
    "limit": "data.limit",
    "workers": "data.workers",
    "synthetic_count": "data.synthetic_count",
    "synthetic_seed": "data.synthetic_seed",
    "keypoints": "keypoints.method",
    "count": "keypoints.count",
    "superpoint_weights": "keypoints.superpoint_weights",
    "outlier_fraction": "keypoints.outlier_fraction",
    "seed": "seed",
}


def _nested(pairs: dict) -> dict:
    out: dict = {}
    for key, value in pairs.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="turn a dataset into WebDataset shards with initial keypoints",
                       description="Crop, resize and detect generic keypoints on a dataset; write "
                                   "WebDataset shards + index into --out.")
    p.add_argument("--config", help="YAML config whose data/keypoints sections are the defaults")
    p.add_argument("--out", required=True, help="output folder for shards and index")
    p.add_argument("--format", choices=["synthetic", "folder", "mtfl", "lsp", "pts"])
    p.add_argument("--root", help="dataset root (annotation paths are relative to it)")
    p.add_argument("--annotations", help="annotation file (mtfl: training.txt, lsp: joints.mat)")
    p.add_argument("--size", type=int, help="side of the square crops, pixels (e.g. 128 or 256)")
    p.add_argument("--box", choices=["whole", "landmarks", "file"], help="crop box")
    p.add_argument("--box-scale", type=float, help="box side / longer side of the landmark (or file) box")
    p.add_argument("--box-file", help="lines 'relative/path x y w h' for --box file")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--limit", type=int, help="keep at most this many images")
    p.add_argument("--workers", type=int, help="worker processes")
    p.add_argument("--synthetic-count", type=int, help="images drawn for --format synthetic")
    p.add_argument("--synthetic-seed", type=int)
    p.add_argument("--keypoints", choices=["orb", "sift", "superpoint"], help="generic keypoint method")
    p.add_argument("--count", type=int, help="keypoints kept per image by ANMS")
    p.add_argument("--superpoint-weights", help="SuperPoint state dict (none ship with k2l-dist)")
    p.add_argument("--outlier-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--strict", action="store_true", default=None, help="bad input is an error, not a counted skip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _cmd_prepare(args) -> int:
    from k2l_dist.data.prepare import prepare

    flags = {key: getattr(args, name) for name, key in PREPARE_FLAGS.items() if getattr(args, name) is not None}
    if args.strict:
        flags["data.strict"] = True
    cfg = load_config(args.config)
    cfg = apply_values(cfg, _nested(flags))
    cfg = load_config(None, args.overrides, base=cfg)
    summary = prepare(cfg, args.out, overwrite=args.overwrite)
    print(summary.text())
    print(f"shards and index written to {args.out}")
    return 0


def _not_built(name: str):
    def run(args) -> int:
        print(f"k2l {name}: not built yet (tracked in issue #4); nothing was run.", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2l", description="Unsupervised object-landmark discovery (K2L).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    for name, text in [("train", "Stage 1 + Stage 2 training and evaluation from a config"),
                       ("detect", "detect landmarks with a trained checkpoint"),
                       ("evaluate", "forward/backward NME of a trained checkpoint")]:
        p = sub.add_parser(name, help=f"{text} (not built yet)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_built(name))
    sub.choices["prepare"].set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from k2l_dist.data.prepare import PrepareError
    from k2l_dist.data.readers import DatasetError
    from k2l_dist.data.shards import ShardError

    try:
        return args.func(args)
    except (ConfigError, DatasetError, PrepareError, ShardError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
