"""`k2l export`: a run's landmark detector Ψ as one file other programs can run, with its
pre- and post-processing inside.

The exported graph is :class:`~k2l_dist.eval.detector.DetectorGraph`, the one
``k2l detect`` runs: uint8 crops and their boxes in, landmarks in the original image's
pixels out (normalisation, the resize to the view size, Ψ, the flip test and the
sub-pixel peak decoding included). The crop itself (a square box around the image,
resampled to ``crop_size`` pixels) stays outside the graph because its output size does
not depend on its input; ``k2l_dist.data.crop`` says exactly how it is made, and
:meth:`~k2l_dist.eval.detector.Detector.crop_batch` makes it.

- ``torchscript``: ``torch.jit.load(path)(crops, boxes)``; the metadata is the extra
  file ``k2l.json``.
- ``onnx``: inputs ``crops`` and ``boxes``, outputs ``landmarks`` and ``confidence``, any
  batch size; the metadata is the model's ``k2l`` property.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from k2l_dist.eval.detector import Detector, load_detector
from k2l_dist.eval.names import NAMES_FILE
from k2l_dist.utils.io import atomic_open
from k2l_dist.utils.version import package_version

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}
INPUTS = ("crops", "boxes")
OUTPUTS = ("landmarks", "confidence")


# k2l_dist.data.crop.crop_image, step by step, for programs outside Python (docs/export.md)
CROP_RECIPE = (
    "1. box: side = max(w, h), x0 = (w - side) / 2, y0 = (h - side) / 2 (edge coordinates). "
    "2. f = floor(side / S); if f >= 2: keep the top-left (h // f * f) x (w // f * f) pixels, average each f x f "
    "block (OpenCV INTER_AREA at exactly 1/f), and divide x0, y0 and side by f. "
    "3. crop = bilinear affine warp to S x S, border pixels repeated, with u = (x + 0.5 - x0) * S / side - 0.5 "
    "(the same for y); the box passed to the model is the one from step 1.")


def metadata(detector: Detector) -> dict[str, Any]:
    """What a program running the file needs to know, stored inside it."""
    return {
        "k2l_dist_version": package_version(),
        "num_landmarks": detector.num_landmarks,
        "crop_size": detector.crop_size,
        "view_size": detector.view_size,
        "flip_test": bool(detector.flip_test),
        "inputs": {"crops": "(B, crop_size, crop_size, 3) uint8 RGB: the box of each image resampled",
                   "boxes": "(B, 3) float32 x0, y0, side of each square box, in image pixels (edges)"},
        "outputs": {"landmarks": "(B, K, 2) float32 x, y in image pixels (0-based pixel centres)",
                    "confidence": "(B, K) float32 heatmap peak values"},
        "crop_policy": CROP_RECIPE,
        "landmark_names": [f"landmark_{k}" for k in range(detector.num_landmarks)],
        # the map to the annotated landmarks (names.json), applied in crop pixels: see docs/export.md
        "named_landmarks": json.loads(detector.names.to_json()) if detector.names is not None else None,
    }


def export(run: str | Path, fmt: str, out: str | Path | None = None, *, config: str | Path | None = None,
           overrides: tuple[str, ...] = (), example_size: int = 2) -> Path:
    """Write ``run``'s Ψ as ``fmt`` to ``out`` (default: ``<run>/detector.<ts|onnx>``),
    atomically; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    run = Path(run)
    try:  # named landmarks travel with the file when the run has them
        detector = load_detector(run, device="cpu", config=config, overrides=overrides, named=True)
    except FileNotFoundError as err:
        if NAMES_FILE not in str(err):
            raise
        detector = load_detector(run, device="cpu", config=config, overrides=overrides)
    out = Path(out) if out is not None else (run if run.is_dir() else run.parent) / f"detector{SUFFIX[fmt]}"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the file to write, e.g. {out / ('detector' + SUFFIX[fmt])}")
    graph = detector.graph.eval()
    s = detector.crop_size
    seeded = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (example_size, s, s, 3), dtype=torch.uint8, generator=seeded)
    boxes = torch.tensor([[0.0, 0.0, float(s)]] * example_size)
    meta = json.dumps(metadata(detector))
    if fmt == "torchscript":
        _write_torchscript(graph, (crops, boxes), meta, out)
    else:
        _write_onnx(graph, (crops, boxes), meta, out)
    log.info("wrote %s (%s, %d landmarks)", out, fmt, detector.num_landmarks)
    return out


def _write_torchscript(graph: torch.nn.Module, example: tuple[torch.Tensor, ...], meta: str, out: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated but still what libtorch loads; the tracer's notes are about
        # Python values it records as constants (the crop size, the flip switch), as meant
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, example, check_trace=False)
        with atomic_open(out, "wb") as handle:
            torch.jit.save(traced, handle, _extra_files={"k2l.json": meta})


def _write_onnx(graph: torch.nn.Module, example: tuple[torch.Tensor, ...], meta: str, out: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--format onnx needs the onnx and onnxscript packages ({err.name} is missing): "
                         f"pip install -e '.[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it lists the torchvision operators it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on shape names and deprecations
            program = torch.onnx.export(graph, example, dynamo=True, input_names=list(INPUTS),
                                        output_names=list(OUTPUTS), external_data=False, verbose=False,
                                        dynamic_shapes={"crops": {0: batch}, "boxes": {0: batch}})
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "k2l", meta
    with atomic_open(out, "wb") as handle:
        handle.write(proto.SerializeToString())
