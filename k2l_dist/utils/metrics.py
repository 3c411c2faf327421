"""One metrics logger: TensorBoard events + a plain-text log, written by rank 0 only."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLogger:
    """``step`` is the run's one step axis; :meth:`shifted` gives a phase that counts its own
    steps from 0 (Stage 2) a place on it after the phases before."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.offset = 0
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = None
        self._log = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            self._log = open(self.run_dir / "log.jsonl", "a", buffering=1)

    def shifted(self, offset: int) -> MetricsLogger:
        """This logger with every step moved ``offset`` further along the run's axis."""
        view = copy.copy(self)
        view.offset = self.offset + int(offset)
        return view

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        step += self.offset
        clean = {}
        for key, value in values.items():
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                clean[f"{prefix}{key}"] = float(value)
                self._writer.add_scalar(f"{prefix}{key}", float(value), step)
        self._log.write(json.dumps({"step": step, "time": round(time.time(), 1), **clean}) + "\n")

    def image(self, tag: str, image_hwc_rgb: np.ndarray, step: int) -> None:
        if self.enabled:
            self._writer.add_image(tag, image_hwc_rgb, step + self.offset, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step + self.offset)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._log.close()
