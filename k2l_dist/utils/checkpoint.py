"""Checkpoints: everything needed to resume exactly, written atomically, loaded without pickle.

A checkpoint is a dict of tensors and plain Python values (no arbitrary objects), so it
loads with ``torch.load(weights_only=True)``; the resolved config travels inside it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from k2l_dist.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept (``checkpoint.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Serialise to memory, then write atomically (temp file + rename) with a checksum beside it.

    ``keep_previous``: the checkpoint already at ``path`` becomes :func:`previous` first, so
    a crash at any moment leaves at least one complete, verifiable checkpoint.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if keep_previous and path.is_file():
        prev = previous(path)
        os.replace(path, prev)
        if _sidecar(path).is_file():
            os.replace(_sidecar(path), _sidecar(prev))
    atomic_write_bytes(path, data)
    atomic_write_text(_sidecar(path), f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")


def _verify(path: Path) -> None:
    """Size and SHA-256 against the sidecar written with the file (a file without one is
    taken as it is: torch's own format checks still apply)."""
    side = _sidecar(path)
    if not side.is_file():
        return
    digest, size = side.read_text().split()
    data = path.read_bytes()
    if len(data) != int(size) or hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{path}: torn or altered checkpoint ({len(data)} bytes, checksum mismatch with {side.name})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _verify(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a checkpoint (not torch's zip format: random, truncated or foreign bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - torch's message advises unpickling, which we never do
        raise ValueError(f"{path}: refused: it holds objects other than tensors and plain values, which would "
                         f"need unpickling (never done here), or it is damaged") from None


def load_latest_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable of ``path`` and :func:`previous`; None when there is neither.

    A torn or altered latest file (a crash while writing, a full disk) is skipped with a
    warning, never taken as the latest.
    """
    errors = []
    for candidate in (Path(path), previous(path)):
        if not candidate.is_file():
            continue
        try:
            return load_checkpoint(candidate), candidate
        except ValueError as err:
            errors.append(str(err))
            log.warning("skipping %s", err)
    if errors:
        raise ValueError("no loadable checkpoint: " + "; ".join(errors))
    return None


MODEL_FILE = "model.pt"  # a finished run's detector (Ψ, Φ, centroids, flip map, config)


def model_file(path: str | Path) -> Path:
    """The finished model a user means by ``path``: a run folder, its ``model.pt``, or its
    ``checkpoint.pt`` / ``checkpoint.prev.pt`` (the training state: the ``model.pt`` beside it)."""
    path = Path(path)
    if path.is_file() and not path.name.startswith("checkpoint"):
        return path
    run = path if path.is_dir() else path.parent
    model = run / MODEL_FILE
    if model.is_file():
        return model
    if (run / "checkpoint.pt").is_file():
        raise ValueError(f"{run} holds no {MODEL_FILE}: its training has not finished (checkpoint.pt is the "
                         f"training state, not a detector); run the same `k2l train` again to finish it")
    raise FileNotFoundError(f"no model at {path}: pass a run folder or its {MODEL_FILE}")
