"""Rounds over descriptors kept by several holders (k2l_dist.clustering.store / ray_store) on planted data.

One algorithm for every layout: the labels of 1, 2 or 3 holders, local or Ray actors,
must equal those of one process holding everything.
"""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from k2l_dist.clustering.flip import is_involution
from k2l_dist.clustering.ray_store import call_ray, plan_runs, remote_store
from k2l_dist.clustering.rounds import final_labels, pseudo_labels
from k2l_dist.clustering.store import DESCRIPTOR_KEYS, INDEX_KEYS, DescriptorStore, PointSet, SegmentHolder
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


def as_parts(data: dict[str, np.ndarray], n_parts: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The planted images dealt to ``n_parts`` ranks at random, each part in its own image order."""
    images = np.unique(data["image_ids"])
    owner = np.random.default_rng(seed).integers(0, n_parts, len(images))
    parts = []
    for p in range(n_parts):
        mine = np.random.default_rng(seed + p).permutation(images[owner == p])
        rows = np.concatenate([np.flatnonzero(data["image_ids"] == i) for i in mine]) if len(mine) else []
        rows = np.asarray(rows, np.int64)
        part = {k: data[k][rows] for k in (*INDEX_KEYS, *DESCRIPTOR_KEYS) if k in data}
        part["sample_ids"] = data["sample_ids"][np.isin(data["sample_ids"], mine)] if p else \
            data["sample_ids"][np.isin(data["sample_ids"], mine) | ~np.isin(data["sample_ids"], images)]
        parts.append(part)
    return parts


def held(parts: list[dict[str, np.ndarray]], n_holders: int) -> PointSet:
    """The parts' points with their descriptors cut over ``n_holders`` in-process holders."""
    runs = [r for r in plan_runs([p["image_ids"] for p in parts], n_holders) if r]
    holders = [SegmentHolder([{k: parts[q][k][a:b] for k in DESCRIPTOR_KEYS if k in parts[q]} for q, a, b in run])
               for run in runs]
    store = DescriptorStore.from_holders(holders, [h.info() for h in holders])
    return PointSet.from_parts(parts, store)


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


def assert_same(a, b) -> None:
    for key, value in a.arrays().items():
        np.testing.assert_array_equal(b.arrays()[key], value, err_msg=key)
    assert a.stats == b.stats


# --------------------------------------------------------------------------- layout


def test_runs_cut_only_at_image_boundaries_and_balance_the_rows():
    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(300), rng.integers(1, 40, size=300)).astype(np.int64)
    parts = [ids[ids < 150], ids[ids >= 150]]
    n = ids.size
    for n_runs in (1, 2, 3, 7):
        runs = plan_runs(parts, n_runs)
        assert len(runs) == n_runs
        flat = [(q, a, b) for run in runs for q, a, b in run]
        covered = np.concatenate([parts[q][a:b] for q, a, b in flat])
        np.testing.assert_array_equal(covered, np.concatenate(parts))  # every row once, in part order
        seen = [set(np.concatenate([parts[q][a:b] for q, a, b in run]).tolist()) if run else set() for run in runs]
        assert sum(len(s) for s in seen) == len(set().union(*seen)) == 300  # no image in two runs
        sizes = np.array([sum(b - a for _, a, b in run) for run in runs])
        assert np.abs(sizes - n / n_runs).max() <= 2 * 40  # each cut within one image of its share
    tiny = plan_runs([ids[ids < 2]], 4)
    assert sorted(len(r) for r in tiny)[:2] == [0, 0]  # 2 images, 4 runs: 2 empty


def test_store_reads_rows_and_assigns_across_holders_like_one_array():
    data = planted(400, seed=8)
    parts = as_parts(data, 3)
    one, three = held(parts, 1), held(parts, 3)
    assert len(three.store.holders) == 3 and three.store.n == one.store.n == len(data["image_ids"])
    idx = np.random.default_rng(0).permutation(one.n)[:500]
    for mirrored in (False, True):
        np.testing.assert_array_equal(three.rows(idx, mirrored), one.rows(idx, mirrored))
    centroids = one.rows(np.arange(12))
    mask = np.random.default_rng(1).random(one.n) < 0.5
    for m in (None, mask):
        for mirrored in (False, True):
            a, b = one.assign(centroids, m, mirrored), three.assign(centroids, m, mirrored)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
    labels, dist = one.assign(centroids, mask)
    assert (labels[~mask] == -1).all() and np.isinf(dist[~mask]).all() and (labels[mask] >= 0).all()


# --------------------------------------------------------------------------- rounds


def test_pseudo_labels_over_holders_recover_planted_structure():
    data = planted(3000)
    c = cfg()
    parts = as_parts(data, 3)
    out = pseudo_labels(held(parts, 3), c)
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

    # exactly the round of one process holding every descriptor
    assert_same(pseudo_labels(PointSet.from_parts(parts), c), out)
    assert out.stats["inertia_k"] > 0 and out.stats["trained_on_m"] == min(out.stats["kept_first_pass"], 256 * K * SUBS)


def test_pseudo_labels_same_for_1_and_3_holders_and_any_rank_split():
    data = planted(2000, seed=4)
    c = cfg()
    ref = pseudo_labels(held(as_parts(data, 1), 1), c)
    for n_parts, n_holders in ((2, 3), (3, 2), (4, 1)):
        assert_same(ref, pseudo_labels(held(as_parts(data, n_parts, seed=n_parts), n_holders), c))


def test_final_labels_over_holders_flip_permutation_and_layout():
    data = planted(2000, seed=2)
    c = cfg()
    parts = as_parts(data, 2)
    out = final_labels(held(parts, 2), c)
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

    # without mirrored descriptors: no flip evidence, so the identity
    plain = [{k: v for k, v in p.items() if k != "flipped_descriptors"} for p in parts]
    bare = final_labels(held(plain, 2), cfg(mirror_together=False))
    np.testing.assert_array_equal(bare.flip_permutation, np.arange(K))
    # the mirrored descriptors join the fit only with mirror_together: the same labels without it
    np.testing.assert_array_equal(bare.labels, final_labels(held(parts, 2), cfg(mirror_together=False)).labels)

    # one holder gives the same labels
    assert_same(final_labels(held(parts, 1), c), out)


# --------------------------------------------------------------------------- ray


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300_000_000, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_holders_match_one_process(ray_session):
    """Holders as actors, each reading only its parts from the object store."""
    ray = ray_session
    data = planted(2000, seed=6)
    c = cfg()
    parts = as_parts(data, 2)
    ref = pseudo_labels(PointSet.from_parts(parts), c)
    payload_refs = [ray.put({k: p[k] for k in DESCRIPTOR_KEYS}) for p in parts]
    for n_holders in (2, 3):
        store, holders = remote_store(payload_refs, [p["image_ids"] for p in parts], [{"num_cpus": 0}] * n_holders,
                                      [1] * n_holders, use_gpu=False)
        try:
            assert store._call is call_ray and len(store.holders) == n_holders
            assert_same(ref, pseudo_labels(PointSet.from_parts(parts, store), c))
        finally:
            for holder in holders:
                ray.kill(holder)


# --------------------------------------------------------------------------- imports


def test_clustering_modules_import_without_torch():
    code = ("import sys, k2l_dist.clustering.ray_store, k2l_dist.clustering.rounds, k2l_dist.clustering.actor; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
