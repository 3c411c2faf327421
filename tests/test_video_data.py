"""Video datasets: the readers of k2l_dist/data/video.py on tiny copies of each real layout,
and the split that keeps every video on one side."""

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from k2l_dist.config import Config, ConfigError, EvalConfig, validate
from k2l_dist.data import video as video_mod
from k2l_dist.data.readers import DatasetError, read_items
from k2l_dist.data.video import (
    BBCPOSE_JOINTS,
    DECODE_MARKER,
    H36M_ALL_JOINTS,
    H36M_EVALUATED,
    H36M_JOINTS,
    PENN_ACTION_JOINTS,
    read_bbcpose,
    read_human36m,
    read_penn_action,
    read_video_folder,
    shoulder_indices,
)
from k2l_dist.eval.split import make_split, split_for_run, video_split


def _image(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((size, size, 3), value, np.uint8))


# ----------------------------------------------------------------------------- folders of videos


def test_frame_folders_are_videos_in_natural_order_with_every_n(tmp_path):
    for name in ("1.jpg", "2.jpg", "10.jpg"):
        _image(tmp_path / "clipA" / name, 0)
    for i in range(4):
        _image(tmp_path / "clipB" / f"f{i}.png", 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a video")

    items, skips = read_video_folder(tmp_path)
    assert [i.path for i in items[:3]] == ["clipA/1.jpg", "clipA/2.jpg", "clipA/10.jpg"]  # 2 before 10
    assert [(i.id, i.video, i.frame) for i in items] == [
        (0, "clipA", 0), (1, "clipA", 1), (2, "clipA", 2),
        (3, "clipB", 0), (4, "clipB", 1), (5, "clipB", 2), (6, "clipB", 3)]
    assert all(i.landmarks is None for i in items)
    assert sorted((s.path, s.reason) for s in skips) == [("empty", "unreadable video"), ("notes.txt", "not a video")]

    thinned, _ = read_video_folder(tmp_path, every=2)
    # ids stay the frames' positions: thinning does not renumber
    assert [(i.id, i.video, i.frame) for i in thinned] == [(0, "clipA", 0), (2, "clipA", 2), (3, "clipB", 0),
                                                         (5, "clipB", 2)]


def _write_avi(path: Path, values: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 32))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write an MJPG .avi here")
    for v in values:
        writer.write(np.full((32, 32, 3), v, np.uint8))
    writer.release()
    if not path.is_file() or path.stat().st_size == 0:
        pytest.skip("OpenCV wrote no .avi here")


def test_video_files_are_decoded_once_atomically_and_reused(tmp_path, monkeypatch):
    values = [0, 50, 100, 150, 200]
    _write_avi(tmp_path / "data" / "walk.avi", values)
    decode = tmp_path / "decoded"

    items, skips = read_video_folder(tmp_path / "data", every=2, decode_dir=decode)
    assert not skips
    assert [(i.id, i.video, i.frame) for i in items] == [(0, "walk", 0), (2, "walk", 2), (4, "walk", 4)]
    assert [Path(i.path) for i in items] == [(decode / "walk" / f"{f:06d}.jpg").resolve() for f in (0, 2, 4)]
    assert all(Path(i.path).is_absolute() for i in items)  # outside the root
    # the frames are the video's, in order (MJPG is lossy: compare the mean brightness)
    means = [cv2.imread(i.path).mean() for i in items]
    np.testing.assert_allclose(means, [0, 100, 200], atol=6)
    assert (decode / "walk" / DECODE_MARKER).is_file()
    assert not list((decode / "walk").glob("*.tmp")) and not (decode / "walk" / "000001.jpg").exists()

    # a complete decode is reused when the asked rate is a multiple of the decoded one
    def no_decode(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(video_mod, "_decode", no_decode)
    again, _ = read_video_folder(tmp_path / "data", every=4, decode_dir=decode)
    assert [(i.id, i.frame) for i in again] == [(0, 0), (4, 4)]
    monkeypatch.undo()

    # every=3 needs frame 3, which the first decode did not keep: decoded again
    third, _ = read_video_folder(tmp_path / "data", every=3, decode_dir=decode)
    assert [i.frame for i in third] == [0, 3] and Path(third[1].path).is_file()
    assert cv2.imread(third[1].path).mean() == pytest.approx(150, abs=6)


def test_video_files_decode_inside_the_root_by_default_and_that_folder_is_no_video(tmp_path):
    _write_avi(tmp_path / "clip.avi", [10, 20, 30])
    first, _ = read_video_folder(tmp_path)
    assert [i.path for i in first] == [f".k2l_frames/clip/{f:06d}.jpg" for f in range(3)]
    assert all((tmp_path / i.path).is_file() for i in first)
    second, skips = read_video_folder(tmp_path)
    assert second == first and not skips


def test_unreadable_video_file_is_a_skip_and_missing_root_an_error(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    items, skips = read_video_folder(tmp_path, decode_dir=tmp_path / "out")
    assert not items and [(s.path, s.reason) for s in skips] == [("broken.mp4", "unreadable video")]
    with pytest.raises(DatasetError, match="nowhere"):
        read_video_folder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- Penn Action


def _penn_video(root: Path, number: int, action: str, frames: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 300, (frames, 13))
    y = rng.uniform(0, 200, (frames, 13))
    vis = rng.integers(0, 2, (frames, 13)).astype(bool)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "labels" / f"{number:04d}.mat", {
        "action": action, "pose": "back", "x": x, "y": y, "visibility": vis, "train": 1 if seed % 2 else -1,
        "bbox": np.zeros((frames, 4)), "dimensions": np.array([[200, 300, frames]], float),
        "nframes": float(frames)})
    return x, y, vis


def _penn_dataset(root: Path) -> dict[int, tuple[np.ndarray, ...]]:
    """Videos 1-7 tennis_serve, 8 bowling (not a paper category), 9 golf_swing; 3 frames each."""
    actions = ["tennis_serve"] * 7 + ["bowling", "golf_swing"]
    return {n: _penn_video(root, n, a, 3, n) for n, a in enumerate(actions, 1)}


def test_penn_action_protocol_first_five_videos_per_category_test(tmp_path):
    labels = _penn_dataset(tmp_path)
    items, skips = read_penn_action(tmp_path)
    assert not skips
    by_video = {}
    for item in items:
        by_video.setdefault(item.video, set()).add(item.split)
    assert by_video == {"0001": {"test"}, "0002": {"test"}, "0003": {"test"}, "0004": {"test"}, "0005": {"test"},
                        "0006": {"train"}, "0007": {"train"}, "0009": {"test"}}  # bowling left out
    # ids count the frames of every label file, the left-out bowling video's too
    assert [i.id for i in items if i.video == "0009"] == [24, 25, 26]
    first = items[0]
    assert (first.path, first.frame, first.id) == ("frames/0001/000001.jpg", 0, 0)
    x, y, vis = labels[9]
    item = next(i for i in items if i.video == "0009" and i.frame == 2)
    assert item.path == "frames/0009/000003.jpg"
    np.testing.assert_array_equal(item.landmarks, np.stack([x[2], y[2]], 1).astype(np.float32))
    np.testing.assert_array_equal(item.visible, vis[2])
    assert item.landmarks.shape == (len(PENN_ACTION_JOINTS), 2)


def test_penn_action_every_n_thins_training_videos_only_and_all_categories_on_request(tmp_path):
    _penn_dataset(tmp_path)
    items, _ = read_penn_action(tmp_path, every=2)
    assert [i.frame for i in items if i.video == "0006"] == [0, 2]
    assert [i.frame for i in items if i.video == "0001"] == [0, 1, 2]  # the test set is the protocol's
    everything, _ = read_penn_action(tmp_path, categories=None)
    assert {i.split for i in everything if i.video == "0008"} == {"test"}  # bowling's first video
    assert [i.id for i in everything if i.video == "0008"] == [21, 22, 23]


def test_penn_action_malformed_label_is_a_skip_and_missing_labels_an_error(tmp_path):
    _penn_dataset(tmp_path)
    scipy.io.savemat(tmp_path / "labels" / "0003.mat", {"action": "tennis_serve", "x": np.zeros((3, 12)),
                                                        "y": np.zeros((3, 12)), "visibility": np.ones((3, 12))})
    items, skips = read_penn_action(tmp_path)
    assert [(s.path, s.reason) for s in skips] == [("labels/0003.mat", "malformed annotation")]
    assert "0003" not in {i.video for i in items}
    assert {i.split for i in items if i.video == "0006"} == {"test"}  # the fifth readable serve video
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "none" / "labels"))):
        read_penn_action(tmp_path / "none")


# ----------------------------------------------------------------------------- BBCPose

BBC_FIELDS = ("videoName", "type", "source", "train_frames", "train_joints", "test_frames", "test_joints")


def _bbc_entry(kind: str, train: list[int], test: list[int], rng) -> tuple:
    def joints(n):
        return rng.uniform(0, 400, (2, 7, n)) if n else np.zeros((2, 7, 0))

    return (f"video_{kind}", kind, "buehler11", np.array([train], float).reshape(1, -1), joints(len(train)),
            np.array([test], float).reshape(1, -1), joints(len(test)))


def _bbcpose(root: Path) -> np.ndarray:
    """21 entries: 1 and 2 train, 3-19 val, 20 test, 21 an Extended BBC Pose video."""
    rng = np.random.default_rng(0)
    entries = np.empty((1, 21), dtype=[(f, object) for f in BBC_FIELDS])
    entries[0, 0] = _bbc_entry("train", list(range(1, 26)), [], rng)
    entries[0, 1] = _bbc_entry("train", [1, 2], [], rng)
    for i in range(2, 19):
        entries[0, i] = _bbc_entry("val", [1], [7], rng)
    entries[0, 19] = _bbc_entry("test", [1, 2, 3], [5, 9], rng)
    entries[0, 20] = _bbc_entry("train", [1, 11], [], rng)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "bbcpose.mat", {"bbcpose": entries})
    return entries


def test_bbcpose_protocol_train_every_tenth_and_test_annotated_frames(tmp_path):
    entries = _bbcpose(tmp_path)
    items, skips = read_bbcpose(tmp_path, tmp_path / "bbcpose.mat")
    assert not skips
    train = [(i.id, i.video, i.frame, i.path) for i in items if i.split == "train"]
    assert train == [(0, "1", 0, "1/1.jpg"), (10, "1", 10, "1/11.jpg"), (20, "1", 20, "1/21.jpg"),
                     (25, "2", 0, "2/1.jpg")]
    # ids: videos 1, 2 hold 27 positions, each val video 2 (17 videos), video 20's 3 train frames
    first_test = 27 + 17 * 2 + 3
    test = [(i.id, i.video, i.frame, i.path) for i in items if i.split == "test"]
    assert test == [(first_test, "20", 4, "20/5.jpg"), (first_test + 1, "20", 8, "20/9.jpg")]
    assert {i.video for i in items} == {"1", "2", "20"}  # no val video, nothing past the 20th entry
    joints = entries[0, 19]["test_joints"]
    np.testing.assert_allclose(items[-1].landmarks, joints[:, :, 1].T.astype(np.float32))
    assert items[-1].landmarks.shape == (len(BBCPOSE_JOINTS), 2) and items[-1].visible.all()
    every_frame, _ = read_bbcpose(tmp_path, tmp_path / "bbcpose.mat", every=1)
    assert sum(i.video == "1" for i in every_frame) == 25


def test_bbcpose_bad_video_is_a_skip_and_missing_annotations_an_error(tmp_path):
    entries = _bbcpose(tmp_path)
    entries[0, 1]["train_joints"] = np.zeros((2, 6, 2))  # 6 joints for 2 frames
    scipy.io.savemat(tmp_path / "bbcpose.mat", {"bbcpose": entries})
    items, skips = read_bbcpose(tmp_path, tmp_path / "bbcpose.mat")
    assert [(s.path, s.reason) for s in skips] == [("2", "malformed annotation")]
    assert "train_joints" in skips[0].detail and "2" not in {i.video for i in items}
    missing = tmp_path / "code" / "bbcpose.mat"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        read_bbcpose(tmp_path, missing)
    scipy.io.savemat(tmp_path / "other.mat", {"something": np.zeros(3)})
    with pytest.raises(DatasetError, match="bbcpose"):
        read_bbcpose(tmp_path, tmp_path / "other.mat")


# ----------------------------------------------------------------------------- Human3.6M


def _h36m(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    poses = {"S1/Directions 1.54138969": rng.uniform(0, 1000, (120, 32, 2)),
             "S1/Eating.54138969": rng.uniform(0, 1000, (60, 32, 2)),  # not one of the six activities
             "S1/Walking.60457274": rng.uniform(0, 1000, (51, 32, 2)),
             "S11/Walking 1.55011271": rng.uniform(0, 1000, (250, 32, 2))}
    for name, array in poses.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / f"{name}.npy", array)
    return poses


def test_human36m_protocol_subjects_activities_and_rates(tmp_path):
    poses = _h36m(tmp_path)
    items, skips = read_human36m(tmp_path)
    assert {s.path for s in skips} == {"S5", "S6", "S7", "S8", "S9"}
    assert {s.reason for s in skips} == {"missing subject folder"}
    seen = [(i.video, i.frame, i.id, i.split) for i in items]
    assert seen == [("S1/Directions 1.54138969", 0, 0, "train"), ("S1/Directions 1.54138969", 50, 50, "train"),
                    ("S1/Directions 1.54138969", 100, 100, "train"),
                    ("S1/Walking.60457274", 0, 180, "train"), ("S1/Walking.60457274", 50, 230, "train"),
                    ("S11/Walking 1.55011271", 0, 231, "test"), ("S11/Walking 1.55011271", 100, 331, "test"),
                    ("S11/Walking 1.55011271", 200, 431, "test")]
    assert items[1].path == "S1/Directions 1.54138969/000050.jpg"
    np.testing.assert_array_equal(items[1].landmarks,
                                  poses["S1/Directions 1.54138969"][50, list(H36M_EVALUATED)].astype(np.float32))
    left, right = shoulder_indices("human36m")
    assert H36M_ALL_JOINTS[H36M_EVALUATED[left]] == "left_shoulder"
    walking = poses["S11/Walking 1.55011271"]
    np.testing.assert_array_equal(items[-1].landmarks[right], walking[200, 25].astype(np.float32))
    denser, _ = read_human36m(tmp_path, every=25)
    assert [i.frame for i in denser if i.video.startswith("S11")] == [0, 100, 200]  # the test rate is fixed


def test_human36m_bad_pose_file_is_a_skip_and_no_subject_an_error(tmp_path):
    _h36m(tmp_path)
    np.save(tmp_path / "S1" / "Posing.54138969.npy", np.zeros((10, 31, 2)))
    items, skips = read_human36m(tmp_path)
    assert ("S1/Posing.54138969.npy", "malformed annotation") in [(s.path, s.reason) for s in skips]
    assert not any(i.video.startswith("S1/Posing") for i in items)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no subject folder"):
        read_human36m(tmp_path / "empty")


def test_read_items_dispatches_video_formats_with_their_protocol_rates(tmp_path):
    _h36m(tmp_path / "h36m")
    items, _ = read_items("human36m", str(tmp_path / "h36m"))
    assert [i.frame for i in items if i.video == "S1/Directions 1.54138969"] == [0, 50, 100]
    items, _ = read_items("human36m", str(tmp_path / "h36m"), frame_every=30)
    assert [i.frame for i in items if i.video == "S1/Directions 1.54138969"] == [0, 30, 60, 90]
    _bbcpose(tmp_path / "bbc")
    items, _ = read_items("bbcpose", str(tmp_path / "bbc"))  # bbcpose.mat in the root by default
    assert [i.frame for i in items if i.video == "1"] == [0, 10, 20]
    _penn_dataset(tmp_path / "penn")
    items, _ = read_items("penn_action", str(tmp_path / "penn"), frame_every=3)
    assert [i.frame for i in items if i.video == "0007"] == [0]


def test_shoulders_and_frame_every_config_rule():
    assert [BBCPOSE_JOINTS[i] for i in shoulder_indices("bbcpose")] == ["left_shoulder", "right_shoulder"]
    assert [PENN_ACTION_JOINTS[i] for i in shoulder_indices("penn_action")] == ["left_shoulder", "right_shoulder"]
    assert [H36M_JOINTS[i] for i in shoulder_indices("human36m")] == ["left_shoulder", "right_shoulder"]
    with pytest.raises(ValueError, match="mtfl"):
        shoulder_indices("mtfl")
    cfg = Config()
    cfg.data.frame_every = -1
    with pytest.raises(ConfigError, match="data.frame_every"):
        validate(cfg)


# ----------------------------------------------------------------------------- split by video


def _video_frames(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """40 videos of 1-30 frames and 10 still images, ids shuffled against the videos."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 31, 40)
    videos = np.concatenate([np.repeat([f"v{k}" for k in range(40)], sizes), [""] * 10])
    ids = rng.permutation(len(videos)).astype(np.int64) * 3
    return ids, videos


@pytest.mark.parametrize("seed", range(8))
def test_video_split_keeps_each_video_on_one_side_near_the_asked_count(seed):
    ids, videos = _video_frames()
    split = video_split(ids, videos, 120, seed)
    test, train = set(split.test.tolist()), set(split.train.tolist())
    assert test.isdisjoint(train) and test | train == set(ids.tolist())
    side = {}
    for i, v in zip(ids.tolist(), videos.tolist()):
        if v:
            side.setdefault(v, set()).add(i in test)
    assert all(len(s) == 1 for s in side.values())  # no video on both sides
    assert abs(len(test) - 120) <= 15  # half the largest video
    again = video_split(ids[::-1], videos[::-1], 120, seed)
    np.testing.assert_array_equal(again.test, split.test)  # the order of the listing does not matter


def test_video_split_depends_on_the_seed_and_caps_at_half():
    ids, videos = _video_frames()
    tests = {tuple(video_split(ids, videos, 120, s).test.tolist()) for s in range(5)}
    assert len(tests) > 1
    capped = video_split(ids, videos, 10**6, 0)
    assert 0 < len(capped.test) <= len(ids) // 2 + 15 and len(capped.train) > 0
    for seed in range(6):  # the nearest prefix may pass half the frames but always leaves a video to train
        lopsided = video_split(np.arange(101), np.array(["big"] * 100 + ["small"]), 50, seed)
        assert len(lopsided.test) in (1, 100) and len(lopsided.train) == 101 - len(lopsided.test)
    one_video = video_split(np.arange(6), np.array(["a"] * 6), 3, 0)
    assert len(one_video.test) == 0 and len(one_video.train) == 6


def test_split_for_run_draws_videos_only_when_samples_name_them(tmp_path):
    ids, videos = _video_frames()
    ecfg = EvalConfig(split="random", test_count=100, seed=3)
    meta = {"ids": np.sort(ids), "landmarks": np.zeros((len(ids), 2, 2))}
    still = split_for_run(ecfg, meta, tmp_path)
    np.testing.assert_array_equal(still.test, make_split(ids, 100, "random", 3).test)  # unchanged for images
    unnamed = split_for_run(ecfg, {**meta, "videos": np.array([""] * len(ids))}, tmp_path)
    np.testing.assert_array_equal(unnamed.test, still.test)
    order = np.argsort(ids)
    by_video = split_for_run(ecfg, {**meta, "videos": videos[order]}, tmp_path)
    np.testing.assert_array_equal(by_video.test, video_split(ids, videos, 100, 3).test)
    assert not np.array_equal(by_video.test, still.test)


# ----------------------------------------------------------------------------- prepare


def test_prepare_synthetic_video_records_each_frames_video_and_the_random_split_keeps_videos_whole(tmp_path):
    from k2l_dist.config import load_config
    from k2l_dist.data.shards import load_samples_meta
    from k2l_dist.prepare import prepare

    cfg = load_config(None, ["progress=false", "data.format=synthetic_video", "data.synthetic_count=6",
                             "data.synthetic_frames=4", "data.size=48", "data.box=landmarks", "keypoints.count=20",
                             "eval.test_count=8"])
    prepare(cfg, tmp_path / "shards")
    meta = load_samples_meta(tmp_path / "shards")
    assert meta["videos"].tolist() == [f"{v:05d}" for v in range(6) for _ in range(4)]
    assert meta["frames"].tolist() == list(range(4)) * 6
    assert np.isfinite(meta["landmarks"]).all()
    split = split_for_run(cfg.eval, meta, tmp_path / "shards")
    test_videos = set(meta["videos"][np.isin(meta["ids"], split.test)])
    train_videos = set(meta["videos"][np.isin(meta["ids"], split.train)])
    assert len(split.test) == 8 and not test_videos & train_videos


def test_prepare_penn_action_names_the_joints_and_normalises_by_the_shoulders(tmp_path):
    from k2l_dist.config import load_config
    from k2l_dist.data.shards import load_manifest, load_samples_meta
    from k2l_dist.prepare import prepare

    root = tmp_path / "penn"
    _penn_dataset(root)
    rng = np.random.default_rng(0)
    for number in range(1, 10):
        for frame in range(1, 4):
            path = root / "frames" / f"{number:04d}" / f"{frame:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), rng.integers(0, 255, (200, 300, 3), np.uint8))
    cfg = load_config(None, ["progress=false", "data.format=penn_action", f"data.root={root}", "data.size=32",
                             "data.box=landmarks", "keypoints.method=none"])
    prepare(cfg, tmp_path / "shards")
    manifest = load_manifest(tmp_path / "shards")
    assert manifest["landmark_names"] == list(PENN_ACTION_JOINTS)
    assert manifest["norm_indices"] == list(shoulder_indices("penn_action"))
    held_out = [int(i) for i in (tmp_path / "shards" / "test_ids.txt").read_text().split()]
    prepared = set(load_samples_meta(tmp_path / "shards")["ids"].tolist())
    items, _ = read_penn_action(root)
    protocol_test = [i.id for i in items if i.split == "test" and i.id in prepared]
    assert held_out == protocol_test and len(held_out) >= 5 * 3 - 2  # the first 5 videos of each category
