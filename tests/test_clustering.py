"""Clustering: faiss K-means wrapper, per-image dedup, two-way K-means, flip permutation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from k2l_dist.clustering import (
    ClusterConfig,
    assign,
    assign_flipped,
    cluster_dedup,
    dedup_per_image,
    flip_count_matrix,
    flip_permutation,
    is_involution,
    kmeans,
    two_way_cluster,
)
from k2l_dist.clustering.flip import _split_long_cycles


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- kmeans


def test_kmeans_honours_max_points_per_centroid(capfd: pytest.CaptureFixture) -> None:
    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    capped = kmeans(x, 4, ClusterConfig(max_points_per_centroid=100, niter=3, verbose=True))
    out = capfd.readouterr().out
    assert capped.trained_on == 400 and capped.max_points_per_centroid == 100
    assert "Clustering 400 points" in out  # faiss itself says it trained on 400
    full = kmeans(x, 4, ClusterConfig(max_points_per_centroid=0, niter=3, verbose=True))
    out = capfd.readouterr().out
    assert full.trained_on == 3000 and "Clustering 3000 points" in out
    assert capped.centroids.shape == full.centroids.shape == (4, 8)
    assert capped.centroids.dtype == np.float32


def test_the_sample_handed_to_faiss_is_the_one_faiss_draws_itself() -> None:
    """Handing faiss only its subsample (drawn here) trains exactly what faiss trains when it
    subsamples all the points itself: the same centroids, bit for bit."""
    import faiss

    from k2l_dist.clustering.kmeans import faiss_subsample

    x = np.random.default_rng(5).standard_normal((5000, 8)).astype(np.float32)
    for seed in (0, 7926):
        own = faiss.Kmeans(8, 6, niter=4, nredo=1, seed=seed, max_points_per_centroid=50)
        own.train(x)
        ours = faiss.Kmeans(8, 6, niter=4, nredo=1, seed=seed, max_points_per_centroid=50)
        ours.train(x[faiss_subsample(len(x), 300, seed)])
        np.testing.assert_array_equal(ours.centroids, own.centroids)
    res = kmeans(x, 6, ClusterConfig(niter=4, nredo=1, seed=0, max_points_per_centroid=50, init="random"))
    own = faiss.Kmeans(8, 6, niter=4, nredo=1, seed=0, max_points_per_centroid=50)
    own.train(x)
    np.testing.assert_array_equal(res.centroids, own.centroids)


def test_kmeans_deterministic_given_seed() -> None:
    x = np.random.default_rng(1).standard_normal((2000, 16)).astype(np.float32)
    cfg = ClusterConfig(niter=5, max_points_per_centroid=50)
    a, b = kmeans(x, 8, cfg), kmeans(x, 8, cfg)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    c = kmeans(x, 8, ClusterConfig(niter=5, max_points_per_centroid=50, seed=7))
    assert not np.array_equal(a.centroids, c.centroids)


def test_fewer_points_than_clusters_leaves_the_rest_empty_with_a_warning(caplog) -> None:
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    with caplog.at_level("WARNING"):
        res = kmeans(x, 5)
    assert res.centroids.shape == (5, 4)
    labels, dist = assign(np.concatenate([x, x + 0.01]), res.centroids)
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])  # every point its own cluster, 3 and 4 empty
    assert dist[:3].max() == 0
    assert "only 3 points for 5 clusters: 2 cluster(s) stay empty" in caplog.text
    with pytest.raises(ValueError, match="no points to cluster"):
        kmeans(np.zeros((0, 4), np.float32), 5)


def test_assign_is_nearest_centroid() -> None:
    rng = np.random.default_rng(2)
    x, c = rng.standard_normal((500, 6)).astype(np.float32), rng.standard_normal((7, 6)).astype(np.float32)
    lab, dist = assign(x, c)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(lab, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-4)
    assert lab.dtype == np.int64
    np.testing.assert_array_equal(assign_flipped(x, c), lab)


# --------------------------------------------------------------------------- dedup


def test_dedup_invariants_random() -> None:
    rng = np.random.default_rng(3)
    n, K = 6000, 8
    img = rng.integers(0, 300, n)
    lab = rng.integers(-1, K, n)  # -1: already dropped
    dist = rng.integers(0, 20, n).astype(np.float32)  # many exact ties
    keep = dedup_per_image(img, lab, dist)

    assert not keep[lab < 0].any()
    key = img[keep] * K + lab[keep]
    assert np.unique(key).size == key.size  # <= 1 point per (image, cluster)
    assert np.bincount(img[keep]).max() <= K  # hence <= K per image
    # every non-empty (image, cluster) group keeps exactly one point ...
    valid = lab >= 0
    assert np.unique(img[valid] * K + lab[valid]).size == keep.sum()
    # ... the closest one, ties to the lowest index
    for i in np.flatnonzero(valid)[:800]:
        grp = np.flatnonzero((img == img[i]) & (lab == lab[i]))
        best = grp[np.lexsort((grp, dist[grp]))[0]]
        assert keep[i] == (i == best)


def _dedup_by_loop(img: np.ndarray, lab: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Reference: per (image, label) the lowest distance (NaN last, negatives as 0), ties to the lowest index."""
    d = np.where(np.isnan(dist), np.inf, np.maximum(dist, 0))
    keep = np.zeros(len(lab), bool)
    for key in {(a, b) for a, b in zip(img.tolist(), lab.tolist()) if b >= 0}:
        grp = np.flatnonzero((img == key[0]) & (lab == key[1]))
        keep[grp[np.lexsort((grp, d[grp]))[0]]] = True
    return keep


@pytest.mark.parametrize("layout", ["sorted by image (a merged round)", "unsorted", "labels too wide to pack"])
def test_dedup_matches_a_per_image_loop(layout: str) -> None:
    rng = np.random.default_rng(5)
    n = 3000
    img = rng.integers(0, 120, n) * 7
    lab = rng.integers(-1, 6, n)
    dist = rng.integers(-2, 15, n).astype(np.float32) / 4  # ties, and negatives from rounding
    dist[rng.random(n) < 0.02] = np.nan
    if layout.startswith("sorted"):
        order = np.argsort(img, kind="stable")
        img, lab, dist = img[order], lab[order], dist[order]
    if layout.startswith("labels"):
        lab = np.where(lab >= 0, lab * 2**30, -1)  # (image, label) no longer fits 32 bits: the lexsort path
    np.testing.assert_array_equal(dedup_per_image(img, lab, dist), _dedup_by_loop(img, lab, dist))


def test_dedup_independent_of_input_order_except_ties() -> None:
    rng = np.random.default_rng(4)
    n = 2000
    img, lab, dist = rng.integers(0, 50, n), rng.integers(0, 5, n), rng.random(n)  # no ties
    keep = dedup_per_image(img, lab, dist)
    perm = rng.permutation(n)
    np.testing.assert_array_equal(dedup_per_image(img[perm], lab[perm], dist[perm]), keep[perm])


# --------------------------------------------------------------------------- two-way


def _planted(n_img: int = 200, K: int = 5, d: int = 32, junk: bool = True, seed: int = 0):
    """K prototypes; each image holds a tight copy of each (proto id 0..K-1) plus, when
    ``junk``, a looser duplicate of one prototype (-1: a second detection of the same
    landmark that dedup must drop) and, in every 5th image, a random point (-2).

    Junk is kept sparse on purpose: isotropic junk in every image pulls a centroid of its
    own (its mean sits nearer to it than any prototype), and then K-means merges two
    prototypes -- the reason the paper removes outlier keypoints first.
    """
    rng = np.random.default_rng(seed)
    protos = _unit(rng.standard_normal((K, d)))
    desc, ids, proto_of = [], [], []
    for i in range(n_img):
        pts = [protos + 0.03 * rng.standard_normal((K, d))]
        tag = [np.arange(K)]
        if junk:
            pts.append(protos[rng.integers(K)][None] + 0.1 * rng.standard_normal((1, d)))
            tag.append([-1])
            if i % 5 == 0:
                pts.append(rng.standard_normal((1, d)))
                tag.append([-2])
        pts, tag = np.concatenate(pts), np.concatenate(tag)
        order = rng.permutation(len(pts))  # real points are not first in their image
        desc.append(pts[order])
        proto_of.append(tag[order])
        ids.append(np.full(len(pts), 1000 + 3 * i))  # non-contiguous ids
    return _unit(np.concatenate(desc)), np.concatenate(ids), np.concatenate(proto_of)


def test_two_way_cluster_recovers_planted_structure() -> None:
    K, M = 5, 15
    desc, ids, proto = _planted(K=K)
    res = two_way_cluster(desc, ids, K, M, ClusterConfig(seed=0, niter=20, nredo=3))

    real = proto >= 0
    # every real point survives both passes, junk never does
    assert res.keep[real].all()
    assert not res.keep[~real].any()
    # within each image the 5 real points have 5 distinct K labels ...
    lab = res.labels_k[real].reshape(-1, K)  # real points are K per image, in image order
    pr = proto[real].reshape(-1, K)
    for row_l in lab:
        assert np.unique(row_l).size == K
    # ... and the labels agree with the prototypes across images (one bijection)
    mapping = {}
    for lk, p in zip(lab.ravel(), pr.ravel()):
        assert mapping.setdefault(int(p), int(lk)) == lk
    assert sorted(mapping.values()) == list(range(K))

    # M pass: at most one point per (image, M cluster); dropped points carry -1
    kept = res.keep
    key = ids[kept] * M + res.labels_m[kept]
    assert np.unique(key).size == key.size
    assert (res.labels_k[~kept] == -1).all() and (res.labels_m[~kept] == -1).all()
    assert (res.labels_m[kept] >= 0).all() and (res.labels_m[kept] < M).all()
    assert not (res.keep & ~res.keep_first).any()
    assert res.centroids_k.shape == (K, desc.shape[1]) and res.centroids_m.shape == (M, desc.shape[1])

    st = res.stats
    assert st.n_images == 200 and st.n_points == desc.shape[0] and st.n_kept == kept.sum()
    assert st.points_per_image_before.sum() == desc.shape[0] and (st.points_per_image_after == K).all()
    assert st.cluster_sizes_k.sum() == kept.sum() == st.cluster_sizes_m.sum()
    assert st.kmeans_k.trained_on == desc.shape[0] and st.n_skipped_images == 0
    assert res.usable.sum() == kept.sum()


def test_two_way_cluster_skips_images_with_too_few_points() -> None:
    desc, ids, _ = _planted(n_img=60, junk=False)
    rng = np.random.default_rng(9)
    lonely = _unit(rng.standard_normal((3, desc.shape[1])))
    desc = np.concatenate([desc, lonely])
    ids = np.concatenate([ids, [7, 8, 9]])  # three images with a single point
    res = two_way_cluster(desc, ids, 5, 10, ClusterConfig(nredo=2))
    assert res.stats.n_skipped_images == 3
    np.testing.assert_array_equal(np.sort(res.skipped_images), [7, 8, 9])
    assert res.keep[-3:].all() and not res.usable[-3:].any()
    assert res.usable[:-3].sum() == res.keep[:-3].sum()


def test_two_way_cluster_max_points_reported() -> None:
    desc, ids, proto = _planted(n_img=100)
    assert desc.shape[0] == 620
    res = two_way_cluster(desc, ids, 5, 10, ClusterConfig(max_points_per_centroid=40))
    assert res.stats.kmeans_k.trained_on == 200  # 5 * 40 of 620
    assert res.stats.kmeans_m.trained_on == min(400, res.stats.n_kept_first)
    assert res.stats.summary()["trained_on_k"] == 200


def test_cluster_dedup_mask() -> None:
    desc, ids, _ = _planted(n_img=50)
    mask = np.zeros(len(desc), bool)
    mask[::2] = True
    r = cluster_dedup(desc, ids, 5, ClusterConfig(), mask=mask)
    assert not r.keep[~mask].any() and (r.labels[~mask] == -1).all()
    assert r.kmeans.n_points == mask.sum()


# --------------------------------------------------------------------------- flip


def _weight(C: np.ndarray, perm: np.ndarray) -> float:
    return float(C[np.arange(len(perm)), perm].sum())


def _labels_from_counts(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.nonzero(C)
    reps = C[a, b]
    return np.repeat(a, reps), np.repeat(b, reps)


def test_flip_permutation_valid_when_argmax_collides() -> None:
    C = np.array([[5, 4, 0, 0], [6, 0, 1, 0], [0, 1, 3, 0], [0, 0, 2, 1]])
    assert C.argmax(1)[0] == C.argmax(1)[1]  # a per-row argmax is not a permutation
    lab, flab = _labels_from_counts(C)
    np.testing.assert_array_equal(flip_count_matrix(lab, flab, 4), C)
    perm = flip_permutation(lab, flab, 4, symmetrize=False)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == [0, 1, 2, 3]
    best = max(_weight(C, np.array(p)) for p in itertools.permutations(range(4)))
    assert _weight(C, perm) == best  # Hungarian = exact maximum-weight permutation
    sym = flip_permutation(lab, flab, 4)
    assert sorted(sym.tolist()) == [0, 1, 2, 3] and is_involution(sym)


def test_flip_permutation_recovers_planted_involution() -> None:
    rng = np.random.default_rng(5)
    K = 12
    true = np.arange(K)
    pairs = rng.permutation(K)[:10].reshape(5, 2)  # 5 swapped pairs, 2 self-symmetric clusters
    true[pairs[:, 0]], true[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
    lab = rng.integers(0, K, 20000)
    flab = true[lab]
    noisy = rng.random(lab.size) < 0.5  # half of the flipped labels are random
    flab[noisy] = rng.integers(0, K, noisy.sum())
    lab[rng.random(lab.size) < 0.05] = -1  # dropped points are ignored
    perm = flip_permutation(lab, flab, K)
    np.testing.assert_array_equal(perm, true)
    np.testing.assert_array_equal(flip_permutation(lab, flab, K, symmetrize=False), true)


def test_flip_split_long_cycles_gives_involution() -> None:
    rng = np.random.default_rng(6)
    S = rng.random((7, 7))
    S = S + S.T
    perm = np.array([1, 2, 3, 0, 5, 6, 4])  # a 4-cycle and a 3-cycle
    out = _split_long_cycles(perm, S)
    assert is_involution(out) and sorted(out.tolist()) == list(range(7))
    # an even cycle's best alternating pairing weighs at least as much as the cycle
    w_cycle = sum(S[i, perm[i]] for i in range(4))
    w_pairs = sum(S[i, out[i]] for i in range(4))
    assert w_pairs >= w_cycle - 1e-12
    for _ in range(20):  # random count matrices: always a valid involutive permutation
        C = rng.integers(0, 20, (6, 6))
        p = flip_permutation(*_labels_from_counts(C), 6)
        assert sorted(p.tolist()) == list(range(6)) and is_involution(p)


def test_kmeans_init_validated() -> None:
    x = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="unknown K-means init"):
        kmeans(x, 3, ClusterConfig(init="best"))
    for init in ("random", "kmeans++"):
        assert kmeans(x, 3, ClusterConfig(init=init, niter=2)).centroids.shape == (3, 4)


def test_mirrored_descriptors_join_the_fit_but_are_never_labelled() -> None:
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((4, 8)).astype(np.float32) * 5
    ids = np.repeat(np.arange(30), 4)
    desc = centres[np.tile(np.arange(4), 30)] + rng.normal(0, .05, (120, 8)).astype(np.float32)
    mirrored = desc[:, ::-1].copy()  # another set of points the centroids must also cover
    cfg = ClusterConfig(K=4, M=8, niter=10)
    alone = two_way_cluster(desc, ids, cfg=cfg)
    both = two_way_cluster(desc, ids, cfg=cfg, fit_also=mirrored)
    assert alone.stats.kmeans_k.n_points == 120 and both.stats.kmeans_k.n_points == 240
    assert both.keep.shape == (120,)  # labels and dedup are for the originals only
    # the centroids now also describe the mirrored points, which are assigned closer
    near = lambda res: assign(mirrored, res.centroids_m)[1].mean()  # noqa: E731
    assert near(both) < 0.5 * near(alone)
