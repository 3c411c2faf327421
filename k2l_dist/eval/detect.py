"""`k2l detect`: landmarks for any prepared shards (or a folder of images) in ORIGINAL pixels."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from k2l_dist.augment import build_loader
from k2l_dist.config import Config, apply_values
from k2l_dist.data.crop import to_original
from k2l_dist.data.readers import Skip
from k2l_dist.data.shards import load_manifest, load_samples_meta
from k2l_dist.eval.evaluate import predict_landmarks
from k2l_dist.models import LandmarkNet
from k2l_dist.train.checkpoint import load_checkpoint
from k2l_dist.utils.io import atomic_open

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DetectResult:
    written: int  # JSON lines written
    skipped: list[Skip]  # every input image that got no line, with the reason


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[Config, LandmarkNet, np.ndarray]:
    """Ψ, its config and flip permutation from a run's ``model.pt``."""
    ck = load_checkpoint(checkpoint)
    if "psi" not in ck:
        raise ValueError(f"{checkpoint}: holds no Stage-2 model (expected a run's model.pt)")
    cfg = apply_values(Config(), ck["config"])
    psi = LandmarkNet(cfg.model, int(ck["num_landmarks"]))
    psi.load_state_dict(ck["psi"])
    return cfg, psi.to(device).eval(), ck["flip_permutation"].numpy()


def prepare_images(cfg: Config, images: str | Path, out_dir: Path) -> list[Skip]:
    """Shards of a plain image folder at the model's input size (no keypoints needed).

    Returns the images that prepare skipped (unreadable, truncated).
    """
    from k2l_dist.data.prepare import prepare

    data = dataclasses.replace(cfg.data, format="folder", root=str(images), annotations="", box="whole",
                               shards="", limit=0)
    keypoints = dataclasses.replace(cfg.keypoints, method="none")
    return prepare(dataclasses.replace(cfg, data=data, keypoints=keypoints), out_dir, overwrite=True).skips


def _warn_size(shard_dir: Path, prepared: int, trained: int) -> None:
    if prepared != trained:  # the model still runs, but sees objects at another scale than in training
        log.warning("%s: shards hold %dx%d crops but the model was trained on data.size=%d; landmarks may be off "
                    "(prepare again with --size %d)", shard_dir, prepared, prepared, trained, trained)


def _unpredicted(meta: dict, ids: np.ndarray) -> list[Skip]:
    """Samples the loader left out as bad (its own warning names the shard and the problem)."""
    missing = ~np.isin(meta["ids"], ids)
    return [Skip(str(path), "left out by the shard check") for path in meta["paths"][missing]]


def detect(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None,
           images: str | Path | None = None, draw: str | Path | None = None, min_confidence: float = 0.0,
           device: str = "cpu", flip_test: bool | None = None) -> DetectResult:
    """Write one JSON line per image: ``{"image": path, "landmarks": [[x, y] | null, ...]}``.

    Images that get no line are logged, one warning each, and returned in ``skipped``.
    """
    if (data is None) == (images is None):
        raise ValueError("give exactly one of --data SHARDS or --images DIR")
    if draw is not None and images is not None and Path(draw).resolve() == Path(images).resolve():
        raise ValueError(f"--draw {draw} is the --images folder: drawings would replace the originals; "
                         f"pick another folder")
    dev = torch.device(device)
    cfg, psi, perm = load_model(checkpoint, dev)
    use_flip = cfg.stage2.flip_test if flip_test is None else flip_test
    with tempfile.TemporaryDirectory(prefix="k2l-detect-") as tmp:
        shard_dir = Path(data) if data is not None else Path(tmp) / "shards"
        skipped = prepare_images(cfg, images, shard_dir) if images is not None else []
        manifest, meta = load_manifest(shard_dir), load_samples_meta(shard_dir)
        _warn_size(shard_dir, manifest["size"], cfg.data.size)
        aug = dataclasses.replace(cfg.augment, enabled=False)
        loader = build_loader(shard_dir, aug, device=dev, views=1, shuffle=False, padded="drop",
                              cache_dir=Path(tmp) / "check")
        ids, points, conf = predict_landmarks(psi, loader, perm if use_flip else None)
        skipped += _unpredicted(meta, ids)
        rows = np.searchsorted(meta["ids"], ids)
        size = manifest["size"]
        root = Path(images) if images is not None else Path(manifest.get("root", ""))
        with atomic_open(out, "wb") as handle:
            for k, row in enumerate(rows):
                orig = to_original(points[k], tuple(meta["boxes"][row]), size)
                lms = [None if c < min_confidence else [round(float(x), 2), round(float(y), 2)]
                       for (x, y), c in zip(orig, conf[k])]
                path = str(meta["paths"][row])
                handle.write((json.dumps({"image": path, "landmarks": lms}) + "\n").encode())
                if draw is not None:
                    _draw(root / path, orig, conf[k] >= min_confidence, Path(draw) / path)
    for s in skipped:
        log.warning("%s: skipped, %s", root / s.path, s.reason)
    return DetectResult(len(ids), skipped)


def _draw(src: Path, points: np.ndarray, keep: np.ndarray, dst: Path) -> None:
    from k2l_dist.eval.plots import draw_landmarks

    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        return
    if dst.with_suffix(".png").resolve() == src.resolve():  # never overwrite an input image
        raise ValueError(f"--draw would overwrite the input image {src}; pick another folder")
    pts = np.where(keep[:, None], points, np.nan)
    radius = max(2, round(max(image.shape[:2]) / 100))
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst.with_suffix(".png")), draw_landmarks(image, pts, radius=radius))
