import json
import tarfile

import cv2
import numpy as np
import pytest

from k2l_dist.data.shards import (
    Sample,
    ShardError,
    load_manifest,
    read_dataset,
    read_shard,
    shard_paths,
    write_index,
    write_shard,
)


def _sample(i, rng, landmarks=True):
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    lm = rng.uniform(0, 31, (5, 2)).astype(np.float32) if landmarks else None
    if lm is not None:
        lm[3] = np.nan
    return Sample(
        id=i, path=f"dir/img{i}.jpg", image_jpeg=jpeg, box=(1.5, -2.0, 40.0), orig_size=(50, 40),
        keypoints=rng.uniform(0, 31, (7, 2)).astype(np.float32),
        descriptors=rng.integers(0, 255, (7, 32), dtype=np.uint8),
        landmarks=lm, visible=None if lm is None else np.array([1, 1, 0, 0, 1], bool),
    )


def test_shard_round_trip_and_dali_index(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample(i, rng, landmarks=i % 2 == 0) for i in (3, 4, 9)]
    write_shard(tmp_path / "shard-000000.tar", samples)
    back = list(read_shard(tmp_path / "shard-000000.tar"))
    assert [s.id for s in back] == [3, 4, 9]
    for a, b in zip(samples, back):
        assert a.path == b.path and a.image_jpeg == b.image_jpeg and tuple(a.box) == tuple(b.box)
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
        if a.landmarks is None:
            assert b.landmarks is None
        else:
            np.testing.assert_array_equal(a.landmarks, b.landmarks)  # NaN rows survive
            np.testing.assert_array_equal(a.visible, b.visible)
    # the index points at the exact bytes of every member
    lines = (tmp_path / "shard-000000.idx").read_text().splitlines()
    assert lines[0] == "v1.2 3"
    raw = (tmp_path / "shard-000000.tar").read_bytes()
    fields = lines[1].split()
    members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
    off, size = members["id"]
    assert np.frombuffer(raw[off : off + size], "<i8")[0] == 3
    off, size = members["jpg"]
    assert raw[off : off + size] == samples[0].image_jpeg


def test_no_temporary_files_left_and_failed_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(1)
    good = _sample(0, rng)
    bad = _sample(1, rng)
    bad.keypoints = object()  # cannot be encoded → the write fails midway
    with pytest.raises(AttributeError):  # the object has no array interface
        write_shard(tmp_path / "shard-000000.tar", [good, bad])
    assert list(tmp_path.iterdir()) == []  # no torn shard, no temp file


def test_truncated_tar_is_a_named_error(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "shard-000000.tar"
    write_shard(path, [_sample(i, rng) for i in range(3)])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ShardError, match="shard-000000.tar"):
        list(read_shard(path))


def test_missing_member_is_a_named_error(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "shard-000000.tar"
    write_shard(path, [_sample(0, rng)])
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if not m.name.endswith(".jpg")]
    with tarfile.open(path, "w") as tar:
        import io

        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ShardError, match="missing member.*jpg"):
        list(read_shard(path))


def test_pickled_npy_member_is_refused(tmp_path):
    import io

    rng = np.random.default_rng(4)
    path = tmp_path / "shard-000000.tar"
    write_shard(path, [_sample(0, rng)])
    evil = io.BytesIO()
    np.save(evil, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.endswith("kpts.npy"):
                data = evil.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ShardError, match="kpts.npy"):
        list(read_shard(path))


def test_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(ShardError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ShardError, match="index.json"):
        load_manifest(tmp_path)
    write_index(tmp_path, {"shards": [{"name": "shard-000000.tar", "count": 1}]}, {"ids": np.arange(1)})
    with pytest.raises(ShardError, match="shard-000000.tar"):
        shard_paths(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["version"] == 1


def test_read_dataset_in_order(tmp_path):
    rng = np.random.default_rng(5)
    write_shard(tmp_path / "shard-000000.tar", [_sample(i, rng) for i in range(2)])
    write_shard(tmp_path / "shard-000001.tar", [_sample(i, rng) for i in range(2, 5)])
    write_index(tmp_path, {"shards": [{"name": "shard-000000.tar"}, {"name": "shard-000001.tar"}]},
                {"ids": np.arange(5)})
    assert [s.id for s in read_dataset(tmp_path)] == [0, 1, 2, 3, 4]
