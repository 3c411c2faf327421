"""The DALI data path (CPU backend) and its torch point geometry."""

from __future__ import annotations

import io
import logging
import math
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from k2l_dist.augment import build_loader
from k2l_dist.config import AugmentConfig
from k2l_dist.data.shards import (
    SHARD_PATTERN,
    Sample,
    ShardError,
    dali_index_text,
    encode_sample,
    write_index,
    write_shard,
)
from k2l_dist.utils.devices import resolve_device
from k2l_dist.utils.geometry import (
    compose_affine,
    inside_view,
    inverse_affine,
    relative_affine,
    select_by_flip,
    transform_points,
)

pytest.importorskip("nvidia.dali")

NO_PHOTO = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, blur_prob=0.0, noise_std=0.0)


# --------------------------------------------------------------------------- helpers


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _sample(i: int, jpeg: bytes, size: int) -> Sample:
    return Sample(
        id=i,
        path=f"img{i:04d}.png",
        image_jpeg=jpeg,
        box=(0.0, 0.0, float(size)),
        orig_size=(size, size),
        keypoints=np.zeros((2, 2), np.float32),
        descriptors=np.zeros((2, 4), np.uint8),
    )


def make_dataset(out: Path, images: list[np.ndarray], shard_sizes: list[int], quality: int = 95) -> Path:
    """A prepared folder: ids 0..n-1 in order, split into shards of the given sizes."""
    assert sum(shard_sizes) == len(images)
    out.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for k, n in enumerate(shard_sizes):
        name = SHARD_PATTERN.format(k)
        samples = [_sample(i, _jpeg(images[i], quality), images[i].shape[0]) for i in range(start, start + n)]
        write_shard(out / name, samples)
        shards.append({"name": name, "count": n})
        start += n
    write_index(out, {"count": len(images), "shards": shards}, {"id": np.arange(len(images))})
    return out


def random_pictures(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = np.full((size, size, 3), rng.integers(0, 80, 3), np.uint8)
        for _ in range(3):
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            cv2.circle(img, centre, int(rng.integers(4, size // 3)), rng.integers(80, 255, 3).tolist(), -1)
        images.append(img)
    return images


def blob_image(size: int, x: float, y: float, sigma: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)  # pixel (i, j) has centre (x=j, y=i)
    g = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat((255 * g).round().astype(np.uint8)[..., None], 3, axis=2)


def centroid(view: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted centre (x, y) of a (3, S, S) view holding one blob on black."""
    w = view.sum(0).double()
    w = torch.clamp(w - 0.05 * w.max(), min=0)  # ignore JPEG ringing far from the blob
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


def ids_of_epoch(loader) -> tuple[list[int], int]:
    ids, batches = [], 0
    for batch in loader:
        batches += 1
        valid = batch.get("valid", torch.ones_like(batch["id"], dtype=torch.bool))
        ids += batch["id"][valid].tolist()
    return ids, batches


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """25 random pictures, 64 px, in three uneven shards."""
    root = tmp_path_factory.mktemp("small")
    return make_dataset(root / "data", random_pictures(25, 64, seed=1), [10, 7, 8])


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# --------------------------------------------------------------------------- torch geometry


def test_transform_points_and_inverse():
    gen = torch.Generator().manual_seed(0)
    mats = torch.randn(4, 2, 3, generator=gen) + torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    pts = torch.rand(4, 7, 2, generator=gen) * 100
    want = np.einsum("bij,bnj->bni", mats[:, :, :2].numpy(), pts.numpy()) + mats[:, None, :, 2].numpy()
    got = transform_points(pts, mats)
    assert got.shape == (4, 7, 2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-3)
    back = transform_points(got, inverse_affine(mats))
    np.testing.assert_allclose(back.numpy(), pts.numpy(), atol=1e-2)
    other = torch.randn(4, 2, 3, generator=gen)
    np.testing.assert_allclose(
        transform_points(pts, compose_affine(mats, other)).numpy(),
        transform_points(transform_points(pts, mats), other).numpy(),
        rtol=1e-4,
        atol=1e-2,
    )
    np.testing.assert_allclose(  # view0 → view1 of the same crop point
        transform_points(transform_points(pts, mats), relative_affine(mats, other)).numpy(),
        transform_points(pts, other).numpy(),
        rtol=1e-4,
        atol=1e-2,
    )
    nan = pts.clone()
    nan[0, 0] = float("nan")
    assert torch.isnan(transform_points(nan, mats)[0, 0]).all()
    with pytest.raises(ValueError):
        transform_points(pts[:, :, :1], mats)


def test_select_by_flip_and_inside_view():
    labels = torch.arange(6).view(2, 3)
    flipped = labels + 100
    out = select_by_flip(labels, flipped, torch.tensor([False, True]))
    assert out.tolist() == [[0, 1, 2], [103, 104, 105]]
    pts = torch.tensor([[[-0.5, 0.0], [9.49, 9.49], [9.5, 0.0], [float("nan"), 1.0]]])
    assert inside_view(pts, 10).tolist() == [[True, True, False, False]]
    assert inside_view(pts, (10, 10), margin=1.0).tolist() == [[False, False, False, False]]


def test_resolve_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError):
        resolve_device("mps")


# --------------------------------------------------------------------------- DALI pipeline


def test_dot_lands_where_the_matrix_says(tmp_path, cache):
    """Random rotation/scale/translation/flip: the blob's centroid in each view is where
    transform_points puts the crop point (within 0.5 px at the view resolution)."""
    rng = np.random.default_rng(7)
    size, n = 96, 16
    points = rng.uniform(size / 2 - 18, size / 2 + 18, (n, 2))
    images = [blob_image(size, x, y, sigma=1.5) for x, y in points]
    root = make_dataset(tmp_path / "dots", images, [n], quality=100)
    cfg = AugmentConfig(size=64, batch_size=8, **NO_PHOTO)
    loader = build_loader(root, cfg, seed=3, cache_dir=cache, shuffle=True)
    errors, flips = [], []
    for batch in loader:
        pts = torch.as_tensor(points, dtype=torch.float32)[batch["id"]][:, None, :]
        for k in (0, 1):
            want = transform_points(pts, batch[f"matrix{k}"])[:, 0]
            for b in range(len(batch["id"])):
                cx, cy = centroid(batch[f"view{k}"][b])
                errors.append(math.hypot(cx - float(want[b, 0]), cy - float(want[b, 1])))
                flips.append(bool(batch[f"flip{k}"][b]))
    assert len(errors) == 2 * n
    assert any(flips) and not all(flips), "the test must cover flipped and unflipped views"
    assert max(errors) < 0.5, f"max error {max(errors):.3f} px"
    # Exact conventions give hundredths of a pixel; a half-pixel slip gives ~0.6 on average.
    assert float(np.mean(errors)) < 0.1


def test_identity_views_for_extraction(small, cache):
    cfg = AugmentConfig(enabled=False, batch_size=8)
    loader = build_loader(small, cfg, views=1, shuffle=False, cache_dir=cache, padded="drop")
    batches = list(loader)
    ids = torch.cat([b["id"] for b in batches]).tolist()
    assert ids == list(range(25))
    assert [len(b["id"]) for b in batches] == [8, 8, 8, 1]  # the last partial batch, no repeats
    first = batches[0]
    assert set(first) == {"view0", "matrix0", "flip0", "id"}
    assert first["view0"].shape == (8, 3, 64, 64) and first["view0"].dtype == torch.float32
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert torch.allclose(first["matrix0"], eye.expand(8, 2, 3), atol=1e-6)
    assert not first["flip0"].any()
    # RGB in [0, 1], the crop itself (DALI's and OpenCV's JPEG decoders may differ by a level or two).
    img = cv2.imdecode(np.frombuffer(_jpeg(random_pictures(25, 64, seed=1)[0]), np.uint8), cv2.IMREAD_COLOR)
    want = torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    assert (first["view0"][0] - want).abs().max() < 4 / 255

    half = build_loader(small, AugmentConfig(enabled=False, size=32, batch_size=8), views=1, shuffle=False,
                        cache_dir=cache)
    m = next(iter(half))["matrix0"][0]
    # crop size 64 → view 32, pixel centres: x' = (x + 0.5) / 2 - 0.5
    assert torch.allclose(m, torch.tensor([[0.5, 0, -0.25], [0, 0.5, -0.25]]), atol=1e-6)


def test_same_seed_same_batches(small, cache):
    cfg = AugmentConfig(batch_size=8)

    def run(seed: int) -> list[dict[str, torch.Tensor]]:
        return list(build_loader(small, cfg, seed=seed, cache_dir=cache))

    a, b, c = run(5), run(5), run(6)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert any(not torch.equal(x["view0"], z["view0"]) for x, z in zip(a, c))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_disjoint_and_cover_the_dataset(small, cache, world_size):
    cfg = AugmentConfig(batch_size=4)
    loaders = [
        build_loader(small, cfg, rank=r, world_size=world_size, seed=0, cache_dir=cache) for r in range(world_size)
    ]
    per_rank_batches = {len(ld) for ld in loaders}
    assert per_rank_batches == {math.ceil(math.ceil(25 / world_size) / 4)}  # equal on every rank (DDP)
    for _epoch in range(2):  # ranks move to another part each epoch: still a partition
        seen = []
        for ld in loaders:
            ids, batches = ids_of_epoch(ld)
            assert batches == len(ld)
            assert len(ids) == len(set(ids)) == ld.last_epoch_samples
            seen.append(set(ids))
        for i in range(world_size):
            for j in range(i + 1, world_size):
                assert not seen[i] & seen[j]
        assert set().union(*seen) == set(range(25))


def test_drop_mode_removes_padding(small, cache):
    cfg = AugmentConfig(batch_size=4)
    ids, _ = ids_of_epoch(build_loader(small, cfg, rank=1, world_size=2, cache_dir=cache, padded="drop"))
    assert len(ids) == len(set(ids)) in (12, 13)


def test_gpu_graph_is_the_same_graph_on_gpu(small, cache):
    """No GPU here: define (not build) the CUDA pipeline and check where its outputs live."""
    from k2l_dist.augment.pipeline import build_pipeline
    from k2l_dist.augment.validate import check_dataset

    data = check_dataset(small, cache_dir=cache)
    kwargs = dict(rank=0, world_size=1, seed=0, build=False)
    pipe, gpu = build_pipeline(data, AugmentConfig(batch_size=4), device=torch.device("cuda", 1), **kwargs)
    _, cpu = build_pipeline(data, AugmentConfig(batch_size=4), device=torch.device("cpu"), **kwargs)
    assert pipe.device_id == 1
    assert list(gpu) == list(cpu) == ["view0", "view1", "matrix0", "matrix1", "flip0", "flip1", "id"]
    assert gpu["view0"] == gpu["view1"] == "gpu" and cpu["view0"] == "cpu"
    assert {gpu[k] for k in ("matrix0", "flip0", "id")} == {"cpu"}  # moved to the GPU by the loader


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def damaged(tmp_path) -> Path:
    """Three shards of 6: a corrupt JPEG in shard 0, a sample without .jpg in shard 1, shard 2 truncated."""
    images = random_pictures(18, 48, seed=2)
    root = tmp_path / "damaged"
    make_dataset(root, images, [6, 6, 6])
    # Corrupt sample 2's JPEG in place (same length, so the index stays right).
    tar0 = root / "shard-000000.tar"
    idx = (root / "shard-000000.idx").read_text().splitlines()[3].split()
    offset, size = int(idx[1]), int(idx[2])
    data = bytearray(tar0.read_bytes())
    data[offset : offset + size] = bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8))
    tar0.write_bytes(bytes(data))
    # Sample 8 without its .jpg: rewrite shard 1 (and its index) with that member left out.
    tar1 = root / "shard-000001.tar"
    with tarfile.open(tar1, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(6, 12):
            for ext, data in encode_sample(_sample(i, _jpeg(images[i]), 48)).items():
                if i == 8 and ext == "jpg":
                    continue
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "shard-000001.idx").write_text(dali_index_text(tar1))
    # Truncate shard 2 in the middle of its fifth sample (ids 16, 17 are lost).
    tar2 = root / "shard-000002.tar"
    line = (root / "shard-000002.idx").read_text().splitlines()[5].split()
    with open(tar2, "r+b") as handle:
        handle.truncate(int(line[1]) + 10)
    return root


def test_bad_samples_are_skipped_with_a_warning(damaged, cache, caplog):
    cfg = AugmentConfig(batch_size=4, **NO_PHOTO)
    with caplog.at_level(logging.WARNING, logger="k2l_dist.augment"):
        loader = build_loader(damaged, cfg, cache_dir=cache)
    text = caplog.text
    assert "shard-000000.tar" in text and "corrupt image" in text
    assert "shard-000001.tar" in text and "missing component" in text
    assert "shard-000002.tar" in text and "truncated" in text
    assert loader.skipped == {"corrupt image": 1, "missing component": 1, "truncated": 2}
    assert loader.num_samples == 14
    ids, _ = ids_of_epoch(loader)
    assert sorted(ids) == sorted(set(range(18)) - {2, 8, 16, 17})

    # The second start reads the cached check and warns again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="k2l_dist.augment"):
        again = build_loader(damaged, cfg, cache_dir=cache)
    assert "shard-000002.tar" in caplog.text and again.num_samples == 14


def test_strict_raises_naming_the_shard(damaged, cache):
    with pytest.raises(ShardError, match="shard-000000.tar.*corrupt image"):
        build_loader(damaged, AugmentConfig(), strict=True, cache_dir=cache)
    (damaged / "shard-000000.idx").unlink()  # strict also refuses a missing index ...
    with pytest.raises(ShardError, match="shard-000000"):
        build_loader(damaged, AugmentConfig(strict=True), cache_dir=cache)
    loader = build_loader(damaged, AugmentConfig(), cache_dir=cache)  # ... the default rebuilds it
    assert loader.num_samples == 14


@pytest.mark.parametrize("which", ["missing", "truncated"])
def test_strict_each_kind(damaged, cache, which):
    # Remove the other damages' shards from the manifest so the first problem is `which`.
    import json

    manifest = json.loads((damaged / "index.json").read_text())
    keep = "shard-000001.tar" if which == "missing" else "shard-000002.tar"
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] == keep]
    (damaged / "index.json").write_text(json.dumps(manifest))
    reason = "missing component" if which == "missing" else "truncated"
    with pytest.raises(ShardError, match=f"{keep}.*{reason}"):
        build_loader(damaged, AugmentConfig(), strict=True, cache_dir=cache)


def test_missing_shard_dir_is_a_one_line_error(tmp_path, cache):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ShardError) as err:
        build_loader(missing, AugmentConfig(), cache_dir=cache)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_missing_shard_file_is_a_one_line_error(damaged, cache):
    (damaged / "shard-000002.tar").unlink()
    with pytest.raises(ShardError) as err:
        build_loader(damaged, AugmentConfig(), cache_dir=cache)
    assert "shard-000002.tar" in str(err.value) and "\n" not in str(err.value)


def test_ids_subset_restricts_the_loader_without_counting_skips(small, cache):
    wanted = np.array([1, 4, 7, 8, 20, 24])
    loader = build_loader(small, AugmentConfig(batch_size=4), seed=0, cache_dir=cache, ids=wanted)
    ids, _ = ids_of_epoch(loader)
    assert sorted(ids) == wanted.tolist()
    assert loader.skipped == {}
    with pytest.raises(ShardError, match="none of the requested"):
        build_loader(small, AugmentConfig(batch_size=4), seed=0, cache_dir=cache, ids=np.array([999]))


@pytest.mark.parametrize("shared", [True, False])
def test_flip_is_shared_between_the_views_of_a_pair(small, cache, shared):
    cfg = AugmentConfig(batch_size=8, flip_prob=0.5, shared_flip=shared)
    loader = build_loader(small, cfg, seed=3, cache_dir=cache)
    same, total = 0, 0
    for batch in loader:
        same += int((batch["flip0"] == batch["flip1"]).sum())
        total += batch["flip0"].numel()
        # the flip is part of the matrix: a mirrored view has a negative x scale
        m = batch["matrix0"]
        det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
        assert torch.equal(det < 0, batch["flip0"])
    if shared:
        assert same == total
    else:
        assert same < total


def test_noise_is_seeded_per_image_and_clipped(small, cache):
    """Noise (added in torch after DALI): reproducible for a seed, its spread bounded by noise_std."""
    quiet = AugmentConfig(batch_size=8, **{**NO_PHOTO, "noise_std": 0.0})
    noisy = AugmentConfig(batch_size=8, **{**NO_PHOTO, "noise_std": 0.05})
    clean = next(iter(build_loader(small, quiet, seed=3, cache_dir=cache)))
    a = next(iter(build_loader(small, noisy, seed=3, cache_dir=cache)))
    b = next(iter(build_loader(small, noisy, seed=3, cache_dir=cache)))
    assert torch.equal(a["view0"], b["view0"]) and torch.equal(a["id"], clean["id"])
    diff = (a["view0"] - clean["view0"]).flatten(1)
    spread = diff.std(dim=1)
    assert float(spread.max()) <= 0.05 * 1.1 and float(spread.max()) > 0.005  # per-image std in [0, noise_std]
    assert spread.unique().numel() > 1  # each image its own strength
    assert float(a["view0"].min()) >= 0.0 and float(a["view0"].max()) <= 1.0
