"""Sharded K-means and sharded rounds (k2l_dist.clustering.sharded) on planted data."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from k2l_dist.clustering.flip import flip_count_matrix, flip_permutation, is_involution
from k2l_dist.clustering.kmeans import assign
from k2l_dist.clustering.rounds import pseudo_labels
from k2l_dist.clustering.sharded import (
    DescriptorShard,
    ShardGroup,
    sharded_final_labels,
    sharded_kmeans,
    sharded_pseudo_labels,
    split_canonical,
)
from k2l_dist.config import ClusterConfig

K, SUBS, PER_LANDMARK = 10, 3, 3  # M = K * SUBS planted sub-centres


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    faiss.omp_set_num_threads(1)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted(n_images: int, d: int = 32, noise: float = 0.02, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical arrays: each image shows most of K landmarks, each seen in one of SUBS variants.

    A landmark gives PER_LANDMARK nearby descriptors (only the closest may survive the
    dedup); its flipped descriptor is drawn around the partner landmark (0<->1, 2<->3, ...).
    ``points[:, 0]`` = the landmark, ``points[:, 1]`` = the row index, so tests can trace
    every returned point back to its truth. Image ids are sparse (odd numbers); every
    20th image shows one landmark only, so it is skipped by min_points_per_image=2.
    """
    rng = np.random.default_rng(seed)
    land = _unit(rng.normal(size=(K, d)))
    centres = _unit(land[:, None, :] + 0.5 * _unit(rng.normal(size=(K, SUBS, d))))
    img = np.repeat(np.arange(n_images), K * PER_LANDMARK)
    lm = np.tile(np.repeat(np.arange(K), PER_LANDMARK), n_images)
    sub = rng.integers(SUBS, size=(n_images, K))[img, lm]
    present = rng.random((n_images, K)) > 0.1
    present[::20] = np.arange(K) == 0
    rows = present[img, lm]
    img, lm, sub = img[rows], lm[rows], sub[rows]
    n = img.size
    desc = _unit(centres[lm, sub] + noise * rng.normal(size=(n, d)))
    flipped = _unit(centres[lm ^ 1, sub] + noise * rng.normal(size=(n, d)))
    points = np.stack([lm, np.arange(n)], axis=1).astype(np.float32)
    return {"image_ids": (2 * img + 1).astype(np.int64), "points": points, "scores": np.ones(n, np.float32),
            "descriptors": desc, "flipped_descriptors": flipped, "landmark": lm, "sub": sub,
            "sample_ids": np.arange(2 * n_images + 2, dtype=np.int64)}  # even ids: images without points


def blobs(n: int, k: int = 10, d: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    """Overlapping Gaussian blobs: the partition depends on every Lloyd step, not just the seeding."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = (centres[rng.integers(k, size=n)] + 2.5 * rng.normal(size=(n, d))).astype(np.float32)
    ids = np.sort(rng.integers(0, n // 20, size=n)).astype(np.int64)
    return {"image_ids": ids, "points": np.zeros((n, 2), np.float32), "scores": np.ones(n, np.float32),
            "descriptors": x}


def local_group(merged: dict[str, np.ndarray], n_shards: int) -> ShardGroup:
    return ShardGroup.local([DescriptorShard(part) for part in split_canonical(merged, n_shards)])


def cfg(**kw) -> ClusterConfig:
    base = dict(K=K, M=K * SUBS, niter=30, nredo=8, seed=3, min_points_per_image=2)
    return ClusterConfig(**{**base, **kw})


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def majority(truth: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Majority truth value per cluster and the share of points that agree with it (purity)."""
    table = np.zeros((n, truth.max() + 1), np.int64)
    np.add.at(table, (labels, truth), 1)
    return table.argmax(1), float(table.max(1).sum() / labels.size)


# --------------------------------------------------------------------------- split


def test_split_canonical_cuts_at_image_boundaries():
    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(300), rng.integers(1, 40, size=300)).astype(np.int64)
    n = ids.size
    merged = {"image_ids": ids, "points": np.zeros((n, 2), np.float32), "scores": np.arange(n, dtype=np.float32),
              "descriptors": np.zeros((n, 4), np.float32), "sample_ids": np.arange(300)}
    for n_shards in (1, 2, 3, 7):
        parts = split_canonical(merged, n_shards)
        assert len(parts) == n_shards
        assert all(set(p) == {"image_ids", "points", "scores", "descriptors"} for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["scores"] for p in parts]), merged["scores"])
        seen = [set(p["image_ids"].tolist()) for p in parts]
        assert sum(len(s) for s in seen) == len(set().union(*seen)) == 300  # no image in two slices
        sizes = np.array([len(p["image_ids"]) for p in parts])
        assert np.abs(sizes - n / n_shards).max() <= 2 * 40  # each cut within one image of its share
    tiny = split_canonical({k: v[ids < 2] for k, v in merged.items() if k != "sample_ids"}, 4)
    assert sorted(len(p["image_ids"]) for p in tiny)[:2] == [0, 0]  # 2 images, 4 shards: 2 empty


# --------------------------------------------------------------------------- k-means


def test_sharded_kmeans_same_for_1_2_3_shards():
    data = blobs(60_000)
    c = cfg(niter=60)
    ref = sharded_kmeans(local_group(data, 1), 10, c)
    x = data["descriptors"]
    ref_labels, ref_dist = assign(x, ref.centroids)
    assert ref.n_points == len(x) and ref.trained_on == 10 * 256
    # the reported objective is that of the returned centroids, and Lloyd improved on the seeding
    assert ref.objective == pytest.approx(float(ref_dist.astype(np.float64).sum()), rel=1e-5)
    assert ref.objective < float(assign(x, ref.init.centroids)[1].astype(np.float64).sum())
    # converged: every centroid is the mean of its points, up to the few that still swap clusters
    means = np.stack([x[ref_labels == j].mean(0) for j in range(10)])
    assert np.abs(means - ref.centroids).max() < 1e-2
    # the blobs overlap, so the Lloyd steps over all points (not the seeding) decide the partition
    assert agreement(assign(x, ref.init.centroids)[0], ref_labels) < 0.95

    parts = split_canonical(data, 3)
    empty = {k: v[:0] for k, v in parts[0].items()}
    groups = {2: local_group(data, 2), 3: local_group(data, 3),
              "3+empty": ShardGroup.local([DescriptorShard(p) for p in [*parts, empty]])}
    for name, group in groups.items():
        res = sharded_kmeans(group, 10, c)
        assert agreement(assign(x, res.centroids)[0], ref_labels) >= 0.999, name
        assert res.objective == pytest.approx(ref.objective, rel=1e-4), name
        assert res.n_points == ref.n_points


# --------------------------------------------------------------------------- rounds


def test_sharded_pseudo_labels_recover_planted_structure():
    data = planted(3000)
    c = cfg()
    out = sharded_pseudo_labels(local_group(data, 1), c, data["sample_ids"])
    rows = out.points[:, 1].astype(np.int64)
    lm, sub = data["landmark"][rows], data["sub"][rows]

    # every planted landmark is one K cluster; M clusters split landmarks, never mix them,
    # and find most planted variants (K-means may merge two variants of one landmark)
    to_land, purity_k = majority(lm, out.labels_k, K)
    assert purity_k > 0.99 and sorted(to_land) == list(range(K))
    assert majority(lm, out.labels, K * SUBS)[1] > 0.99
    to_var, purity_m = majority(lm * SUBS + sub, out.labels, K * SUBS)
    assert purity_m > 0.9 and len(set(to_var)) >= K * SUBS - 3
    # flipped descriptors of landmark l sit on partner l^1: same variant, partner landmark
    assert agreement(to_var[out.flipped_labels] // SUBS, lm ^ 1) > 0.95

    # layout + at most one point per (image, cluster) for both passes
    counts = np.diff(out.offsets)
    img = np.repeat(out.ids, counts)
    np.testing.assert_array_equal(img, data["image_ids"][rows])
    for lab in (out.labels, out.labels_k):
        assert len(np.unique(img * 1000 + lab)) == len(lab)
    assert counts[counts > 0].min() >= c.min_points_per_image
    assert set(out.ids) == set(data["sample_ids"]) | set(data["image_ids"])
    one_landmark = np.unique(data["image_ids"])[::20]
    assert counts[np.searchsorted(out.ids, one_landmark)].sum() == 0  # skipped

    # same statistics as the single-process round, and the same partition
    single = pseudo_labels(data, c, data["sample_ids"])
    assert list(out.stats) == list(single.stats)
    for key in ("points", "images", "skipped_images", "empty_k_clusters", "points_per_image_extracted"):
        assert out.stats[key] == single.stats[key], key
    assert out.stats["inertia_k"] > 0 and out.stats["trained_on_m"] == min(out.stats["kept_first_pass"], 256 * K * SUBS)
    single_rows = single.points[:, 1].astype(np.int64)
    single_land, _ = majority(data["landmark"][single_rows], single.labels_k, K)
    common, i_single, i_out = np.intersect1d(single_rows, rows, return_indices=True)
    assert len(common) > 0.95 * len(rows)  # M-pass local minima may differ, changing a few survivors
    assert agreement(single_land[single.labels_k[i_single]], to_land[out.labels_k[i_out]]) > 0.99


def test_sharded_pseudo_labels_same_for_1_and_3_local_shards():
    data = planted(2000, seed=4)
    c = cfg()
    one = sharded_pseudo_labels(local_group(data, 1), c, data["sample_ids"])
    three = sharded_pseudo_labels(local_group(data, 3), c, data["sample_ids"])
    _assert_same_round(one, three)


def _assert_same_round(a, b) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.points, b.points)  # the same survivors
    assert agreement(a.labels, b.labels) >= 0.999
    assert agreement(a.labels_k, b.labels_k) >= 0.999
    assert agreement(a.flipped_labels, b.flipped_labels) >= 0.999
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)
    np.testing.assert_allclose(a.centroids_k, b.centroids_k, atol=1e-4)
    assert a.stats["inertia_m"] == pytest.approx(b.stats["inertia_m"], rel=1e-4)


def test_sharded_final_labels_flip_permutation_and_layout():
    data = planted(2000, seed=2)
    c = cfg()
    group = local_group(data, 2)
    out = sharded_final_labels(group, c, data["sample_ids"])
    rows = out.points[:, 1].astype(np.int64)
    lm = data["landmark"][rows]

    perm = out.flip_permutation
    assert is_involution(perm) and sorted(perm) == list(range(K))
    to_land, purity = majority(lm, out.labels, K)
    assert purity > 0.99
    np.testing.assert_array_equal(to_land[perm], to_land ^ 1)  # the planted mirror pairs
    np.testing.assert_array_equal(out.flipped_labels, perm[out.labels])
    np.testing.assert_array_equal(out.labels_k, out.labels)

    # layout: offsets cover the points in id order; stage 2 drops no image for having few points
    counts = np.diff(out.offsets)
    assert out.offsets[0] == 0 and out.offsets[-1] == len(out.points) == len(out.labels)
    assert len(out.offsets) == len(out.ids) + 1 and (np.diff(out.ids) > 0).all()
    np.testing.assert_array_equal(np.repeat(out.ids, counts), data["image_ids"][rows])
    assert (counts[np.searchsorted(out.ids, np.unique(data["image_ids"]))] >= 1).all()
    assert len(np.unique(np.repeat(out.ids, counts) * 1000 + out.labels)) == len(out.labels)
    assert set(out.stats) == {"points_per_image", "cluster_sizes_min", "images_kept_share"}
    assert out.stats["points_per_image"] == pytest.approx(len(out.labels) / len(out.ids))

    # the shards' flip count matrices add up to the matrix the permutation was solved on
    C = np.sum(group.run("flip_counts", K), axis=0)
    assert C.sum() == len(out.labels)
    flat = np.repeat(np.arange(K * K), C.ravel())
    np.testing.assert_array_equal(C, flip_count_matrix(flat // K, flat % K, K))
    np.testing.assert_array_equal(flip_permutation(flat // K, flat % K, K), perm)

    # without mirrored descriptors: no flip evidence, so the identity
    plain = {k: v for k, v in data.items() if k != "flipped_descriptors"}
    bare = sharded_final_labels(local_group(plain, 2), c, data["sample_ids"])
    np.testing.assert_array_equal(bare.flip_permutation, np.arange(K))
    np.testing.assert_array_equal(bare.labels, out.labels)

    # one shard gives the same labels
    one = sharded_final_labels(local_group(data, 1), c, data["sample_ids"])
    np.testing.assert_array_equal(one.flip_permutation, perm)
    np.testing.assert_array_equal(one.points, out.points)
    assert agreement(one.labels, out.labels) >= 0.999


# --------------------------------------------------------------------------- ray


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300_000_000, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_shards_match_one_local_shard(ray_session):
    ray = ray_session
    data = planted(2000, seed=6)
    c = cfg()
    ref = sharded_pseudo_labels(local_group(data, 1), c, data["sample_ids"])
    remote = ray.remote(DescriptorShard).options(num_cpus=0)
    for n_shards in (2, 3):
        actors = [remote.remote(part, 1) for part in split_canonical(data, n_shards)]
        out = sharded_pseudo_labels(ShardGroup.ray(actors), c, data["sample_ids"])
        _assert_same_round(ref, out)
        assert out.stats == pytest.approx(ref.stats, rel=1e-4)
        for actor in actors:
            ray.kill(actor)


# --------------------------------------------------------------------------- imports


def test_sharded_module_imports_without_torch():
    code = "import sys, k2l_dist.clustering.sharded; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
