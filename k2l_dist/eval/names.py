"""Named landmarks: the forward regressor that maps a detector's K discovered landmarks to
the annotated ones (MTFL's eyes, nose and mouth corners…), kept with the run.

Evaluation fits it on the regressor images (as forward NME does) and saves it as
``<run>/names.json``; ``k2l fit-names`` fits one from any annotated shards. It works in
the model's crop pixels, so a detector maps its landmarks image → crop, applies it, and
maps the result back. JSON, never pickle: the file is plain numbers and names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2l_dist.eval.regression import LinearMap
from k2l_dist.utils.io import atomic_write_text

NAMES_FILE = "names.json"


@dataclass
class LandmarkNames:
    names: list[str]  # the annotated landmarks, in order
    map: LinearMap  # discovered (n, K, 2) → named (n, L, 2), crop pixels
    crop_size: int  # the crops the map was fitted in
    fitted_on: int  # images

    @property
    def sources(self) -> np.ndarray:
        """(L,) the discovered landmark weighing most in each named one: whose confidence it reports."""
        w = self.map.W.reshape(-1, 2, len(self.names), 2)  # (K, xy_in, L, xy_out)
        return np.linalg.norm(w, axis=(1, 3)).argmax(0)

    def apply(self, discovered: np.ndarray) -> np.ndarray:
        """Discovered landmarks (n, K, 2) in crop pixels → named (n, L, 2) in crop pixels."""
        return self.map.predict(discovered)

    def to_json(self) -> str:
        m = self.map
        return json.dumps({
            "names": self.names, "crop_size": self.crop_size, "fitted_on": self.fitted_on, "center": m.center,
            "weights": m.W.tolist(),
            "input_mean": None if m.input_mean is None else m.input_mean.tolist(),
            "target_mean": None if m.target_mean is None else m.target_mean.tolist()}, indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> LandmarkNames:
        mean = lambda key: None if d.get(key) is None else np.asarray(d[key], np.float64)  # noqa: E731
        return cls(list(d["names"]), LinearMap(np.asarray(d["weights"], np.float64), d["center"],
                                               mean("input_mean"), mean("target_mean")),
                   int(d["crop_size"]), int(d.get("fitted_on", 0)))


def fit_names(discovered: np.ndarray, annotated: np.ndarray, names: list[str], crop_size: int,
              alpha: float = 0.0, center: str = "dataset") -> LandmarkNames:
    """The map from discovered (n, K, 2) to annotated (n, L, 2) landmarks over the images
    where both are complete (crop pixels of ``crop_size``)."""
    ok = np.isfinite(discovered).all((1, 2)) & np.isfinite(annotated).all((1, 2))
    if ok.sum() < 2:
        raise ValueError(f"naming landmarks needs at least 2 images with every landmark annotated and detected, "
                         f"got {int(ok.sum())}")
    if len(names) != annotated.shape[1]:
        raise ValueError(f"{len(names)} names for {annotated.shape[1]} annotated landmarks")
    return LandmarkNames(list(names), LinearMap.fit(discovered[ok], annotated[ok], alpha, center), int(crop_size),
                         int(ok.sum()))


def save_names(names: LandmarkNames, run_dir: str | Path) -> Path:
    path = Path(run_dir) / NAMES_FILE
    atomic_write_text(path, names.to_json())
    return path


def load_names(run_dir: str | Path) -> LandmarkNames:
    """``<run_dir>/names.json``; a missing one says how to make it."""
    path = Path(run_dir) / NAMES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has no named landmarks (evaluation on annotated data "
                                f"writes it; or fit one: k2l fit-names {run_dir} --data ANNOTATED_SHARDS)")
    try:
        return LandmarkNames.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a names file ({err})") from None
