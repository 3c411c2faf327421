"""k2l-dist: unsupervised object landmarks from keypoints by self-training (Mallis et al.).

The Python API (imported on first use, so ``import k2l_dist`` stays light)::

    from k2l_dist import load_config, train, load_detector
    cfg = load_config("configs/quickstart.yaml", ["run_dir=runs/mine"])
    metrics = train(cfg)
    points = load_detector("runs/mine").predict(image)   # (K, 2) in the image's pixels
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from k2l_dist.utils.allocator import tune_allocator

# before torch allocates: every entry point (k2l, python -m k2l_dist, torchrun ranks, the API)
# imports the package first, so each runs with the tuned allocator without any export
tune_allocator()

__version__ = "0.1.0"

_API = {
    "Config": "k2l_dist.config",
    "load_config": "k2l_dist.config",
    "Detector": "k2l_dist.eval.detector",
    "load_detector": "k2l_dist.eval.detector",
}
__all__ = ["__version__", "train", *_API]

# The subpackage `k2l_dist.train` (light: no torch) is loaded before the function of the same
# name is defined, so that importing its modules later never rebinds `k2l_dist.train`.
import k2l_dist.train  # noqa: E402, F401


def train(cfg: Any, resume: bool = True) -> dict:  # noqa: F811
    """`k2l train` on a resolved :class:`Config`: Stage 1, Stage 2 and evaluation; returns the
    metrics (also in ``<run_dir>/metrics.json``). Resumes from ``<run_dir>`` unless ``resume=False``."""
    from k2l_dist.train.run import train as run

    return run(cfg, resume=resume)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'k2l_dist' has no attribute {name!r}")
