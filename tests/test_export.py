"""`k2l export`: TorchScript and ONNX files that give `k2l detect`'s landmarks."""

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from k2l_dist.cli import main
from k2l_dist.config import Config, apply_values
from k2l_dist.eval.detector import load_detector
from k2l_dist.models import LandmarkNet
from k2l_dist.utils.checkpoint import save_checkpoint

K = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a Ψ whose heatmaps have clear peaks: an untrained head gives nearly
    flat maps, whose argmax and sub-pixel fit any rounding could move (so would a saturated
    one, with ties at 1.0)."""
    root = tmp_path_factory.mktemp("export")
    cfg = apply_values(Config(), {"model": {"width": 16, "depth": 2, "descriptor_dim": 16}, "data": {"size": 32},
                                  "augment": {"size": 48}})  # the graph resizes crops to the view size too
    torch.manual_seed(0)
    psi = LandmarkNet(cfg.model, K)
    with torch.no_grad():
        psi.head.weight.mul_(20.0)
    save_checkpoint(root / "run" / "model.pt", {"psi": psi.state_dict(), "num_landmarks": K,
                                                "config": dataclasses.asdict(cfg),
                                                "flip_permutation": torch.tensor([1, 0, 2])})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 90), (70, 30), (50, 50), (33, 61)]):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    out = root / "detect.jsonl"
    assert main(["detect", "--checkpoint", str(root / "run"), "--images", str(images), "--out", str(out)]) == 0
    detected = {r["image"]: np.array(r["landmarks"]) for r in map(json.loads, out.read_text().splitlines())}
    return root / "run", images, detected


def _inputs(run_dir, images):
    names = sorted(p.name for p in images.iterdir())
    pictures = [cv2.imread(str(images / n))[:, :, ::-1] for n in names]
    crops, boxes = load_detector(run_dir, device="cpu").crop_batch(pictures)
    return names, crops, boxes


def test_torchscript_export_gives_k2l_detect_landmarks(run, capsys):
    run_dir, images, detected = run
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    path = run_dir / "detector.ts"
    assert f"wrote {path}" in capsys.readouterr().out
    extra = {"k2l.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["k2l.json"])
    assert meta["num_landmarks"] == K and meta["crop_size"] == 32 and meta["view_size"] == 48 and meta["flip_test"]
    names, crops, boxes = _inputs(run_dir, images)
    for batch in (slice(0, 4), slice(1, 2)):  # the traced graph takes any batch size
        points, conf = module(torch.from_numpy(crops[batch]), torch.from_numpy(boxes[batch]))
        assert points.shape == (len(names[batch]), K, 2) and conf.shape == (len(names[batch]), K)
        for name, p in zip(names[batch], points.numpy()):
            np.testing.assert_allclose(p, detected[name], atol=0.1)


def test_onnx_export_gives_k2l_detect_landmarks(run, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime does not install here")
    import onnx

    run_dir, images, detected = run
    out = tmp_path / "psi.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    model = onnx.load(str(out))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["k2l"])
    assert meta["num_landmarks"] == K and meta["flip_test"]
    session = ort.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["crops", "boxes"]
    names, crops, boxes = _inputs(run_dir, images)
    for batch in (slice(0, 4), slice(2, 3)):  # a dynamic batch dimension
        points, conf = session.run(["landmarks", "confidence"], {"crops": crops[batch], "boxes": boxes[batch]})
        for name, p in zip(names[batch], points):
            np.testing.assert_allclose(p, detected[name], atol=0.1)


def test_export_overrides_apply_and_bad_formats_are_one_line(run, tmp_path, capsys):
    run_dir, images, detected = run
    out = tmp_path / "noflip.ts"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "stage2.flip_test=false"]) == 0
    extra = {"k2l.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["k2l.json"])["flip_test"] is False
    names, crops, boxes = _inputs(run_dir, images)
    without_flip = load_detector(run_dir, device="cpu", flip_test=False).predict_crops(crops, boxes)[0]
    np.testing.assert_allclose(module(torch.from_numpy(crops), torch.from_numpy(boxes))[0].numpy(), without_flip,
                               atol=1e-3)
    assert np.abs(without_flip - np.stack([detected[n] for n in names])).max() > 0.1  # the flip test mattered
    assert main(["export", str(run_dir), "--format", "torchscript", "stage2.nonsense=1"]) == 2
    assert "stage2.nonsense" in capsys.readouterr().err


def recipe_crop(rgb: np.ndarray, size: int) -> tuple[np.ndarray, list[float]]:
    """docs/export.md "Outside Python", followed literally: the crop and the box to pass."""
    h, w = rgb.shape[:2]
    side = float(max(w, h))
    x0, y0 = (w - side) / 2, (h - side) / 2  # 1. the box, passed to the model as it is
    image, bx, by, bside = rgb, x0, y0, side
    f = int(side // size)
    if f >= 2:  # 2. shrink by the integer factor f: the mean of each f x f block
        image = cv2.resize(rgb[: h // f * f, : w // f * f], (w // f, h // f), interpolation=cv2.INTER_AREA)
        bx, by, bside = x0 / f, y0 / f, side / f
    s = size / bside  # 3. bilinear warp, border repeated: u = (x + 0.5 - x0) * S / side - 0.5
    m = np.array([[s, 0.0, (0.5 - bx) * s - 0.5], [0.0, s, (0.5 - by) * s - 0.5]])
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, [x0, y0, side]


def test_the_documented_crop_recipe_reproduces_k2l_detect(run, tmp_path):
    run_dir, images, _ = run
    images = Path(shutil.copytree(images, tmp_path / "images"))
    big = cv2.GaussianBlur(np.random.default_rng(5).integers(0, 255, (180, 250, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(images / "big.png"), big)  # 250 px for 32-px crops: f = 7
    out = tmp_path / "d.jsonl"
    assert main(["detect", str(run_dir), "--images", str(images), "--out", str(out)]) == 0
    detected = {r["image"]: np.array(r["landmarks"]) for r in map(json.loads, out.read_text().splitlines())}
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "d.ts")]) == 0
    module = torch.jit.load(str(tmp_path / "d.ts"))
    for name, expected in detected.items():
        rgb = cv2.imread(str(images / name))[:, :, ::-1].copy()
        crop, box = recipe_crop(rgb, 32)
        landmarks, _ = module(torch.from_numpy(crop[None]), torch.tensor([box], dtype=torch.float32))
        assert np.abs(landmarks[0].numpy() - expected).max() <= 0.5, name
