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
from k2l_dist.utils.version import package_version

# before torch allocates: every entry point (k2l, python -m k2l_dist, torchrun ranks, the API)
# imports the package first, so each runs with the tuned allocator without any export
tune_allocator()

__version__ = package_version()

_API = {
    "Config": "k2l_dist.config",
    "load_config": "k2l_dist.config",
    # `k2l train` on a resolved Config: Stage 1, Stage 2 and evaluation; returns the metrics
    "train": "k2l_dist.training.run",
    "Detector": "k2l_dist.eval.detector",
    "load_detector": "k2l_dist.eval.detector",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'k2l_dist' has no attribute {name!r}")
