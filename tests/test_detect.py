"""`k2l detect`: JSON lines in original pixels, drawings, and its CLI errors."""

import dataclasses
import json
import logging
import tarfile

import cv2
import numpy as np
import pytest
import torch

from k2l_dist.cli import main
from k2l_dist.config import Config, apply_values
from k2l_dist.eval import detect as detect_module
from k2l_dist.eval import detector as detector_module
from tests.tiny import save_tiny_model

K = 3


@pytest.fixture
def model_pt(tmp_path):
    path = tmp_path / "model.pt"
    save_tiny_model(path, K)
    return path


def prepare_folder(cfg: Config, images, out) -> None:
    """Shards of an image folder at the config's size (no keypoints), as a user would prepare them."""
    from k2l_dist.prepare import prepare

    data = dataclasses.replace(cfg.data, format="folder", root=str(images), annotations="", box="whole")
    prepare(dataclasses.replace(cfg, data=data, keypoints=dataclasses.replace(cfg.keypoints, method="none")), out,
            overwrite=True)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"wide.jpg": (40, 90), "tall.png": (70, 30), "sub/square.jpg": (50, 50)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(root / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return root, sizes


def test_detect_maps_crop_points_back_to_original_pixels(model_pt, images, tmp_path, monkeypatch):
    root, sizes = images

    def fake_peaks(psi, views, perm):
        # landmark 0 at the crop centre, 1 at the top-left pixel centre, 2 at (10.25, 20.5)
        assert views.shape[1:] == (3, 32, 32)  # the view is the crop here (augment.size unset)
        pts = torch.tensor([[15.5, 15.5], [0.0, 0.0], [10.25, 20.5]]).expand(len(views), 3, 2)
        conf = torch.tensor([0.9, 0.05, 0.9]).expand(len(views), 3)
        return pts, conf

    monkeypatch.setattr(detector_module, "landmarks_in_views", fake_peaks)
    out = tmp_path / "preds.jsonl"
    result = detect_module.detect(model_pt, out, images=root, draw=tmp_path / "drawn", min_confidence=0.1)
    assert result.written == 3 and result.skipped == []
    rows = {r["image"]: r["landmarks"] for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(sizes)
    for name, (h, w) in sizes.items():
        side = max(h, w)
        scale = side / 32
        x0, y0 = (w - side) / 2, (h - side) / 2  # the whole-image square box, edge coordinates
        centre, missing, third = rows[name]
        assert centre == pytest.approx([(w - 1) / 2, (h - 1) / 2], abs=0.01)  # crop centre → image centre
        assert missing is None  # below --min-confidence
        assert third == pytest.approx([(10.25 + 0.5) * scale - 0.5 + x0, (20.5 + 0.5) * scale - 0.5 + y0], abs=0.01)
        drawn = cv2.imread(str((tmp_path / "drawn" / name).with_suffix(".png")))
        assert drawn is not None and drawn.shape[:2] == (h, w)


def test_detect_runs_the_real_model_end_to_end(model_pt, images, tmp_path, capsys):
    root, sizes = images
    out = tmp_path / "p.jsonl"
    assert main(["detect", "--checkpoint", str(model_pt), "--images", str(root), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["landmarks"]) == K for r in rows)
    for r in rows:
        h, w = sizes[r["image"]]
        for x, y in r["landmarks"]:
            assert -0.5 - max(h, w) / 2 <= x <= w + max(h, w) / 2 and -max(h, w) / 2 <= y <= h + max(h, w) / 2


def test_detect_errors_are_one_line(tmp_path, capsys):
    assert main(["detect", "--checkpoint", str(tmp_path / "none.pt"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_detect_never_draws_over_the_input_images(model_pt, images, tmp_path, capsys):
    root, _ = images
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert main(["detect", "--checkpoint", str(model_pt), "--images", str(root), "--out", str(tmp_path / "o.jsonl"),
                 "--draw", str(root)]) == 2
    assert "replace the originals" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    drawn = tmp_path / "drawn"
    assert main(["detect", "--checkpoint", str(model_pt), "--images", str(root), "--out", str(tmp_path / "o.jsonl"),
                 "--draw", str(drawn)]) == 0
    assert (drawn / "tall.png").is_file() and {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_detect_names_every_image_it_skips(model_pt, images, tmp_path, capsys, caplog):
    root, _ = images
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (60, 60, 3), dtype=np.uint8))[1].tobytes()
    (root / "sub/cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert cv2.imread(str(root / "sub/cut.jpg")) is not None  # decodes, grey-filled
    out = tmp_path / "p.jsonl"
    with caplog.at_level(logging.WARNING, logger="k2l_dist.eval.detect"):
        assert main(["detect", "--checkpoint", str(model_pt), "--images", str(root), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    warned = [r.getMessage() for r in caplog.records if r.name == "k2l_dist.eval.detect"]
    assert sorted(warned) == [f"{root / 'broken.jpg'}: skipped, unreadable image",
                              f"{root / 'sub/cut.jpg'}: skipped, truncated image"]
    assert "2 images skipped" in capsys.readouterr().out


def _corrupt_member(tar_path, suffix):
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    with open(tar_path, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(b"\0" * member.size)
    return member.name


def test_detect_on_shards_names_samples_the_shard_check_left_out(model_pt, images, tmp_path, caplog):
    root, _ = images
    shards = tmp_path / "shards"
    cfg = apply_values(Config(), {"data": {"size": 32, "workers": 0}})
    prepare_folder(cfg, root, shards)
    _corrupt_member(next(shards.glob("shard-*.tar")), ".jpg")
    with caplog.at_level(logging.WARNING, logger="k2l_dist.eval.detect"):
        result = detect_module.detect(model_pt, tmp_path / "p.jsonl", data=shards)
    assert result.written == 2 and len(result.skipped) == 1
    assert result.skipped[0].reason == "left out by the shard check"
    assert any(result.skipped[0].path in r.getMessage() for r in caplog.records if r.name == "k2l_dist.eval.detect")


@pytest.mark.parametrize("size, warned", [(48, True), (32, False)])
def test_detect_warns_when_shards_have_another_crop_size(model_pt, images, tmp_path, caplog, size, warned):
    root, _ = images
    shards = tmp_path / f"s{size}"
    prepare_folder(apply_values(Config(), {"data": {"size": size, "workers": 0}}), root, shards)
    with caplog.at_level(logging.WARNING, logger="k2l_dist.eval.detect"):
        assert detect_module.detect(model_pt, tmp_path / "p.jsonl", data=shards).written == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "k2l_dist.eval.detect"]
    if warned:
        assert len(messages) == 1 and "48x48 crops" in messages[0] and "data.size=32" in messages[0]
        assert str(shards) in messages[0]
    else:
        assert messages == []


def test_python_api_predict_equals_k2l_detect_for_every_input_type(model_pt, images, tmp_path):
    import k2l_dist
    from k2l_dist import load_detector

    root, sizes = images
    out = tmp_path / "p.jsonl"
    assert main(["detect", "--checkpoint", str(model_pt), "--images", str(root), "--out", str(out)]) == 0
    rows = {r["image"]: r["landmarks"] for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    detector = load_detector(model_pt.parent)  # the run folder or its model.pt
    assert detector.num_landmarks == K and callable(k2l_dist.train) and k2l_dist.Config is Config
    bgr = {name: cv2.imread(str(root / name)) for name in sizes}
    rgb = {name: image[:, :, ::-1].copy() for name, image in bgr.items()}
    batch = detector.predict([rgb[n] for n in sizes])
    assert batch.shape == (len(sizes), K, 2)
    for i, name in enumerate(sizes):
        np.testing.assert_allclose(batch[i], np.array(rows[name]), atol=0.01)  # the CLI rounds to 0.01 px
        one = detector.predict(rgb[name])
        assert one.shape == (K, 2)
        as_tensor = torch.from_numpy(rgb[name]).permute(2, 0, 1).float() / 255  # CHW in [0, 1]
        np.testing.assert_allclose(detector.predict(as_tensor), one, atol=1e-9)


def test_python_api_reads_pil_and_gray_images(model_pt):
    from PIL import Image

    from k2l_dist import load_detector

    detector = load_detector(model_pt)
    rgb = np.random.default_rng(1).integers(0, 255, (45, 60, 3), dtype=np.uint8)
    np.testing.assert_allclose(detector.predict(Image.fromarray(rgb)), detector.predict(rgb), atol=1e-9)
    gray = rgb[:, :, 0]
    np.testing.assert_allclose(detector.predict(gray), detector.predict(np.repeat(gray[:, :, None], 3, 2)), atol=1e-9)
    with pytest.raises(TypeError, match="give a path, numpy, PIL or torch"):
        detector.predict(object())
    with pytest.raises(ValueError, match="not an image: not a readable image file"):
        detector.predict("not an image")


def test_python_m_k2l_dist_is_the_cli():
    import subprocess
    import sys

    import k2l_dist

    out = subprocess.run([sys.executable, "-m", "k2l_dist", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"k2l-dist {k2l_dist.__version__}"


def _write_clip(path, frames):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, frames[0].shape[1::-1])
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def _read_clip(path):
    reader = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = reader.read()
        if not ok:
            return frames
        frames.append(frame)


def test_detect_on_a_video_writes_a_line_per_frame_and_an_annotated_video(model_pt, tmp_path, capsys):
    from k2l_dist import load_detector

    rng = np.random.default_rng(3)
    clip = tmp_path / "clip.avi"
    _write_clip(clip, [rng.integers(0, 255, (36, 52, 3), dtype=np.uint8) for _ in range(21)])
    out, drawn = tmp_path / "frames.jsonl", tmp_path / "drawn.avi"
    assert main(["detect", "--checkpoint", str(model_pt), "--video", str(clip), "--out", str(out),
                 "--draw", str(drawn)]) == 0
    assert "21 frames" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(21))  # 21 frames: one batch of 16 and a last one of 5
    assert rows[10]["time_s"] == pytest.approx(1.0)
    decoded = _read_clip(clip)  # the same decoder gives the same frames
    expected = load_detector(model_pt).predict([f[:, :, ::-1] for f in decoded])
    np.testing.assert_allclose(np.array([r["landmarks"] for r in rows]), expected, atol=0.01)
    annotated = _read_clip(drawn)
    assert len(annotated) == 21 and annotated[0].shape == (36, 52, 3)
    assert not list(tmp_path.glob(".drawn*"))  # no temporary file left


def test_detect_video_errors_name_the_file(model_pt, tmp_path, capsys):
    bad = tmp_path / "not_a_video.avi"
    bad.write_bytes(b"garbage")
    assert main(["detect", "--checkpoint", str(model_pt), "--video", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not_a_video.avi" in capsys.readouterr().err and not (tmp_path / "o").exists()
    clip = tmp_path / "clip.avi"
    _write_clip(clip, [np.zeros((20, 20, 3), np.uint8)] * 2)
    assert main(["detect", "--checkpoint", str(model_pt), "--video", str(clip), "--out", str(tmp_path / "o"),
                 "--draw", str(tmp_path / "drawn.gif")]) == 2
    assert ".avi or .mp4" in capsys.readouterr().err
    assert main(["detect", "--checkpoint", str(model_pt), "--video", str(clip), "--images", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_detect_takes_the_run_config_overrides_and_a_config_file(model_pt, images, tmp_path):
    root, _ = images
    outs = {n: tmp_path / f"{n}.jsonl" for n in ("saved", "override", "file", "file_then_override")}
    (tmp_path / "noflip.yaml").write_text("stage2:\n  flip_test: false\n")
    base = ["detect", "--checkpoint", str(model_pt), "--images", str(root)]
    assert main([*base, "--out", str(outs["saved"])]) == 0  # the run saved flip_test: true
    assert main([*base, "--out", str(outs["override"]), "stage2.flip_test=false"]) == 0
    assert main([*base, "--out", str(outs["file"]), "--config", str(tmp_path / "noflip.yaml")]) == 0
    assert main([*base, "--out", str(outs["file_then_override"]), "--config", str(tmp_path / "noflip.yaml"),
                 "stage2.flip_test=true"]) == 0
    text = {n: p.read_text() for n, p in outs.items()}
    assert text["override"] == text["file"] != text["saved"] == text["file_then_override"]


def test_the_flip_test_is_fixed_when_the_detector_is_built(model_pt):
    from k2l_dist import load_detector

    detector = load_detector(model_pt, flip_test=False)
    with pytest.raises(AttributeError):
        detector.flip_test = True  # would not reach the graph it runs
    assert detector.flip_test is False and not detector.graph.flip_test
