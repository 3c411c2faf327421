"""Which config changes a checkpoint survives.

A resumed run continues the checkpoint's model, pseudo-labels and split. Changing what
those depend on (the model's shape, the label space, the data and the held-out split)
would load weights into the wrong shapes or report trained-on images as held out, so
such a resume is refused, naming every differing key; schedule and logging changes
(more rounds, another log interval) are fine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from k2l_dist.config import PATH_KEYS, Config, flatten

# Dotted keys, or section prefixes ending in ".", that must match the checkpoint's config.
INCOMPATIBLE = (
    "model.", "cluster.K", "cluster.M", "data.format", "data.root", "data.annotations", "data.shards", "data.size",
    "data.box", "data.box_scale", "data.box_file", "data.limit", "data.synthetic_count", "data.synthetic_seed",
    "data.synthetic_render_size", "data.synthetic_object_scale", "keypoints.method", "keypoints.count",
    "keypoints.outlier_fraction", "augment.size", "eval.test_count", "eval.split", "eval.split_file",
    "eval.split_pattern", "eval.seed", "data.test_list", "data.train_list", "data.partition_file", "seed",
    "data.frame_every", "data.synthetic_frames",
)


def incompatible_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved → current"`` for every incompatible key that differs."""
    # a key newer than the checkpoint had its default value then
    old = {**flatten(dataclasses.asdict(Config())), **flatten(saved)}
    new = flatten(current)
    for key in PATH_KEYS:  # a run saved before paths were stored absolute meant them from here
        if old.get(key) and not os.path.isabs(old[key]):
            old[key] = os.path.abspath(old[key])
    out = []
    for key in sorted(set(old) | set(new)):
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in INCOMPATIBLE):
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return out
