"""`k2l prepare` end to end on small datasets, including every bad-input case."""

import json

import cv2
import numpy as np
import pytest

from k2l_dist.cli import main
from k2l_dist.config import load_config
from k2l_dist.data.crop import to_original
from k2l_dist.data.shards import load_manifest, load_samples_meta, read_dataset
from k2l_dist.prepare import PrepareError, jpeg_is_complete, prepare

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def _textured(rng, width=120, height=100):
    image = np.full((height, width, 3), 40, np.uint8)
    for _ in range(25):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(5, 25, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), colour, -1)
    return image


def _write_truncated_jpeg(path, image):
    data = cv2.imencode(".jpg", image)[1].tobytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.fixture
def mtfl_like(tmp_path):
    """A tiny MTFL-format dataset with one of every bad input."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i in range(6):
        cv2.imwrite(str(root / f"imgs/{i}.jpg"), _textured(rng))
        xs, ys = rng.uniform(40, 80, 5), rng.uniform(35, 65, 5)
        lines.append(f"imgs/{i}.jpg " + " ".join(f"{v:.2f}" for v in [*xs, *ys]) + " 1 2 2 3")
    (root / "imgs/corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    lines.append("imgs/corrupt.jpg 50 60 55 50 60 40 40 50 60 60 1 2 2 3")
    lines.append("imgs/short.jpg 1 2 3")  # wrong number of fields
    cv2.imwrite(str(root / "imgs/outside.jpg"), _textured(rng))
    lines.append("imgs/outside.jpg 50 60 500 50 60 40 40 50 60 60 1 2 2 3")  # landmark outside
    cv2.imwrite(str(root / "imgs/blank.jpg"), np.full((100, 120, 3), 128, np.uint8))
    lines.append("imgs/blank.jpg 50 60 55 50 60 40 40 50 60 60 1 2 2 3")  # no keypoint at all
    lines.append("imgs/gone.jpg 50 60 55 50 60 40 40 50 60 60 1 2 2 3")  # file does not exist
    _write_truncated_jpeg(root / "imgs/truncated.jpg", _textured(rng))  # decodes, grey-filled
    lines.append("imgs/truncated.jpg 50 60 55 50 60 40 40 50 60 60 1 2 2 3")
    (root / "training.txt").write_text("\n".join(lines) + "\n")
    return root


def _cfg(root, **data):
    cfg = load_config(None, [f"data.root={root}", "data.format=mtfl", f"data.annotations={root / 'training.txt'}",
                             "data.box=landmarks", "data.box_scale=2.2", "data.size=64", "data.workers=0",
                             "data.samples_per_shard=4", "keypoints.count=20"])
    from k2l_dist.config import apply_values

    return apply_values(cfg, {"data": data}) if data else cfg


def test_prepare_skips_every_bad_input_with_a_named_reason(mtfl_like, tmp_path):
    out = tmp_path / "shards"
    summary = prepare(_cfg(mtfl_like), out)
    assert summary.written == 6
    assert summary.skipped == {
        "unreadable image": 1,
        "malformed annotation line": 1,
        "landmark outside the image": 1,
        "too few keypoints found": 1,
        "missing image file": 1,
        "truncated image": 1,
    }
    assert "imgs/outside.jpg" in summary.examples["landmark outside the image"][0]
    manifest = load_manifest(out)
    assert manifest["num_samples"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    assert manifest["summary"]["skipped"]["unreadable image"] == 1
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_round_trip_maps_landmarks_back_to_original_pixels(mtfl_like, tmp_path):
    out = tmp_path / "shards"
    prepare(_cfg(mtfl_like), out)
    lines = (mtfl_like / "training.txt").read_text().splitlines()
    annotations = {ln.split()[0]: np.array(ln.split()[1:11], float) for ln in lines if len(ln.split()) == 15}
    meta = load_samples_meta(out)
    samples = list(read_dataset(out))
    assert [s.id for s in samples] == list(meta["ids"]) == [0, 1, 2, 3, 4, 5]
    for s in samples:
        truth = annotations[s.path].reshape(2, 5).T
        back = to_original(s.landmarks.astype(np.float64), s.box, 64)
        assert np.abs(back - truth).max() < 0.5  # stored as float32 crop pixels
        assert s.image().shape == (64, 64, 3)
        assert len(s.keypoints) == len(s.descriptors) > 0
        assert ((s.keypoints >= -0.5) & (s.keypoints < 63.5)).all()
        image = cv2.imread(str(mtfl_like / s.path))
        assert s.orig_size == (image.shape[1], image.shape[0])
    offsets = meta["kp_offsets"]
    np.testing.assert_array_equal(meta["keypoints"][offsets[1] : offsets[2]], samples[1].keypoints)


def test_strict_turns_a_skip_into_an_error_naming_the_file(mtfl_like, tmp_path):
    with pytest.raises(PrepareError, match="imgs/short.jpg"):
        prepare(_cfg(mtfl_like, strict=True), tmp_path / "shards")
    assert not (tmp_path / "shards" / "index.json").exists()


def test_truncated_jpeg_is_skipped_or_under_strict_an_error_naming_it(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    root.mkdir()
    cv2.imwrite(str(root / "good.jpg"), _textured(rng))
    _write_truncated_jpeg(root / "cut.jpg", _textured(rng))
    assert cv2.imread(str(root / "cut.jpg")) is not None  # OpenCV alone does not notice
    cfg = load_config(None, [f"data.root={root}", "data.format=folder", "data.size=32", "data.workers=0",
                             "keypoints.method=none"])
    summary = prepare(cfg, tmp_path / "a")
    assert summary.written == 1 and summary.skipped == {"truncated image": 1}
    assert "cut.jpg" in summary.examples["truncated image"][0]
    from k2l_dist.config import apply_values

    with pytest.raises(PrepareError, match="cut.jpg: truncated image"):
        prepare(apply_values(cfg, {"data": {"strict": True}}), tmp_path / "b")


def test_jpeg_completeness_follows_the_markers():
    image = _textured(np.random.default_rng(2))
    for flags in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]):
        data = cv2.imencode(".jpg", image, flags)[1].tobytes()
        assert jpeg_is_complete(data)
        assert jpeg_is_complete(data + b"appended video \xff\xd8")  # bytes after the EOI are allowed
        assert not any(jpeg_is_complete(data[:n]) for n in range(len(data)))
    # an EOI inside a segment (as in an EXIF thumbnail) is not the image's end
    payload = b"Exif\0\0\xff\xd8thumbnail\xff\xd9"
    with_app1 = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    assert jpeg_is_complete(with_app1)
    assert not jpeg_is_complete(with_app1[: 6 + len(payload) + 200])


def test_non_finite_annotation_is_skipped_or_under_strict_an_error_naming_file_and_line(mtfl_like, tmp_path, capsys):
    good = (mtfl_like / "training.txt").read_text().splitlines()[:2]
    (mtfl_like / "training.txt").write_text("\n".join([*good, "imgs/2.jpg" + " nan" * 10 + " 1 2 2 3"]) + "\n")
    summary = prepare(_cfg(mtfl_like), tmp_path / "a")
    assert summary.written == 2 and summary.skipped == {"malformed annotation line": 1}
    args = ["prepare", "--format", "mtfl", "--root", str(mtfl_like), "--box", "landmarks", "--size", "64",
            "--workers", "0", "--out", str(tmp_path / "b")]
    capsys.readouterr()
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "imgs/2.jpg" in err and "training.txt line 3" in err


def test_existing_output_needs_overwrite(mtfl_like, tmp_path):
    out = tmp_path / "shards"
    prepare(_cfg(mtfl_like), out)
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare(_cfg(mtfl_like), out)
    assert prepare(_cfg(mtfl_like), out, overwrite=True).written == 6


def test_outlier_removal_drops_the_configured_share(mtfl_like, tmp_path):
    cfg = _cfg(mtfl_like)
    from k2l_dist.config import apply_values

    summary = prepare(apply_values(cfg, {"keypoints": {"outlier_fraction": 0.25}}), tmp_path / "a")
    assert summary.keypoints_after == pytest.approx(0.75 * summary.keypoints_before, abs=1)


def test_cli_errors_are_one_line_and_name_the_path(tmp_path, capsys):
    assert main(["prepare", "--format", "mtfl", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "missing") in err
    assert main(["prepare", "--format", "mtfl", "--root", str(tmp_path), "--annotations", str(tmp_path / "nope.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_cli_synthetic_prepare_in_parallel(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["prepare", "--format", "synthetic", "--synthetic-count", "40", "--size", "64", "--workers", "2",
               "--samples-per-shard", "16", "--out", str(out)])
    assert rc == 0
    assert "prepared" in capsys.readouterr().out
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["num_samples"] >= 36 and len(manifest["shards"]) == 3
    assert len(manifest["flip_permutation"]) == manifest["num_landmarks"]
    s = next(read_dataset(out))
    assert s.landmarks is not None and s.image().shape == (64, 64, 3)


@pytest.mark.skipif(not (SHARED / "lsp").is_dir(), reason="../shared/data absent")
def test_lsp_prepare_on_real_data(tmp_path):
    cfg = load_config(None, [f"data.root={SHARED / 'lsp'}", "data.format=lsp", "data.box=landmarks",
                             "data.box_scale=1.2", "data.size=64", "data.limit=30", "data.workers=0"])
    summary = prepare(cfg, tmp_path / "lsp")
    assert summary.written >= 28
    s = next(read_dataset(tmp_path / "lsp"))
    assert s.landmarks.shape == (14, 2) and s.path == "images/im0001.jpg"


def _faces(root, names, rng):
    """Textured images with 5 in-image landmarks; MTFL lines ``name x1..x5 y1..y5 attrs``."""
    lines = []
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), _textured(rng))
        xs, ys = rng.uniform(40, 80, 5), rng.uniform(35, 65, 5)
        lines.append(name.replace("/", "\\") + " " + " ".join(f"{v:.2f}" for v in [*xs, *ys]) + " 1 2 2 3")
    return lines


def test_aflw_prepare_records_the_protocol_test_ids_for_the_split(tmp_path, capsys):
    from k2l_dist.config import EvalConfig
    from k2l_dist.eval.split import split_for_run

    rng = np.random.default_rng(3)
    root = tmp_path / "mtfl"
    train = _faces(root, [f"lfw_5590/{i}.jpg" for i in range(5)], rng)
    test = _faces(root, ["AFLW/a.jpg", "AFLW/b.jpg", "AFLW/c.jpg"], rng)
    (root / "training.txt").write_text("\n".join(train) + "\n")
    (root / "testing.txt").write_text("".join(f" {ln}\n" for ln in test))
    out = tmp_path / "shards"
    args = ["prepare", "--format", "aflw", "--root", str(root), "--box", "landmarks", "--box-scale", "2.2",
            "--size", "64", "--workers", "0", "--out", str(out), "--count", "20"]
    assert main(args) == 0
    assert (out / "test_ids.txt").read_text().split() == ["5", "6", "7"]  # after the 5 training lines
    assert (out / "train_ids.txt").read_text().split() == ["0", "1", "2", "3", "4"]
    manifest = load_manifest(out)
    assert manifest["protocol"] == {"test_images": 3, "train_images": 5, "files": ["test_ids.txt", "train_ids.txt"]}
    assert manifest["norm_indices"] == [0, 1] and manifest["landmark_names"][2] == "nose"
    split = split_for_run(EvalConfig(split="protocol"), load_samples_meta(out), out)
    assert split.test.tolist() == [5, 6, 7] and split.train.tolist() == [0, 1, 2, 3, 4]
    # prepared again without a protocol: no stale list is left to hold out the wrong images
    (root / "plain.txt").write_text("\n".join(train) + "\n")
    assert main([*args, "--format", "mtfl", "--annotations", str(root / "plain.txt"), "--overwrite"]) == 0
    assert not (out / "test_ids.txt").exists() and "protocol" not in load_manifest(out)
    with pytest.raises(PrepareError, match="data.test_list: only formats mafl and aflw"):
        prepare(_cfg(root, test_list=str(root / "testing.txt")), tmp_path / "other")


def test_mafl_prepare_crops_around_the_five_points(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "img_align_celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    mtfl = _faces(root, names, rng)
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    rows = []
    for ln in mtfl:  # MTFL order x1..x5 y1..y5 -> CelebA's interleaved x1 y1 ... x5 y5
        f = ln.split()
        rows.append(f[0] + " " + " ".join(f"{f[1 + k]} {f[6 + k]}" for k in range(5)))
    (tmp_path / "landmarks.txt").write_text(f"{len(rows)}\n{header}\n" + "\n".join(rows) + "\n")
    (tmp_path / "training.txt").write_text("000001.jpg\n000002.jpg\n000003.jpg\n")
    (tmp_path / "testing.txt").write_text("000006.jpg\n")
    cfg = load_config(None, [f"data.root={root}", "data.format=mafl", f"data.annotations={tmp_path / 'landmarks.txt'}",
                             f"data.train_list={tmp_path / 'training.txt'}",
                             f"data.test_list={tmp_path / 'testing.txt'}",
                             "data.box=landmarks", "data.box_scale=2.2", "data.size=64", "data.workers=0",
                             "keypoints.count=20"])
    out = tmp_path / "shards"
    assert prepare(cfg, out).written == 6
    assert (out / "test_ids.txt").read_text().split() == ["5"]
    assert (out / "train_ids.txt").read_text().split() == ["0", "1", "2"]
    s = next(read_dataset(out))
    lm = np.array(rows[0].split()[1:], float).reshape(5, 2)
    side = 2.2 * (lm.max(0) - lm.min(0)).max()
    assert s.box[2] == pytest.approx(side)  # the face protocol's square: 2.2 x the points' longer side
    np.testing.assert_allclose(to_original(s.landmarks.astype(np.float64), s.box, 64), lm, atol=0.01)


def test_progress_false_silences_the_progress_bars(mtfl_like, tmp_path, capsys):
    import dataclasses

    prepare(_cfg(mtfl_like), tmp_path / "a")
    assert "keypoints:" in capsys.readouterr().err  # the bars, on stderr
    prepare(dataclasses.replace(_cfg(mtfl_like), progress=False), tmp_path / "b")
    assert capsys.readouterr().err == ""
