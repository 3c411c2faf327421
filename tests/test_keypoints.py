"""Initial keypoints: ANMS, ORB/SIFT/SuperPoint detectors, descriptor floats, outlier removal."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from k2l_dist.config import KeypointConfig
from k2l_dist.keypoints import (
    KeypointDetector,
    anms,
    descriptors_to_float,
    outlier_keep_masks,
    outlier_scores,
    suppression_radii,
)

# The package re-exports the function `anms`, which shadows the submodule's name.
anms_module = importlib.import_module("k2l_dist.keypoints.anms")

# --------------------------------------------------------------------------- helpers


def brute_force_radii(points: np.ndarray, responses: np.ndarray, robustness: float = 0.9) -> np.ndarray:
    n = len(points)
    radii = np.full(n, np.inf)
    for i in range(n):
        for j in range(n):
            if responses[j] * robustness > responses[i]:
                radii[i] = min(radii[i], float(np.hypot(*(points[i] - points[j]))))
    return radii


def brute_force_anms(points: np.ndarray, responses: np.ndarray, count: int) -> list[int]:
    radii = brute_force_radii(points, responses)
    # Largest radius first; among the undominated (inf) points the largest distance to
    # a strictly stronger point first; then stronger response, then lower index.
    strict = brute_force_radii(points, responses, robustness=1.0)
    secondary = np.where(np.isinf(radii), strict, 0.0)
    return sorted(range(len(points)), key=lambda i: (-radii[i], -secondary[i], -responses[i], i))[:count]


def textured_image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 40, np.uint8)
    for _ in range(30):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(2, max(3, size // 6))), colour, -1)
        else:
            w, h = (int(v) for v in rng.integers(3, max(4, size // 4), 2))
            cv2.rectangle(img, (x, y), (x + w, y + h), colour, -1)
    return img


@contextlib.contextmanager
def one_torch_thread():
    # On a small shared machine torch's OpenMP threads contend badly (10x slower).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- ANMS


def test_anms_matches_brute_force_reference() -> None:
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        pts = rng.uniform(0, 64, (n, 2))
        # Every other trial uses few distinct response levels to exercise ties.
        resp = rng.integers(1, 4, n).astype(float) if trial % 2 else rng.random(n)
        np.testing.assert_allclose(suppression_radii(pts, resp), brute_force_radii(pts, resp))
        count = int(rng.integers(1, n + 1))
        assert anms(pts, resp, count).tolist() == brute_force_anms(pts, resp, count)


def test_anms_blocked_computation_matches_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 256, (600, 2))
    resp = rng.random(600)
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    dist[~(resp[None, :] * 0.9 > resp[:, None])] = np.inf
    expected = dist.min(axis=1)
    monkeypatch.setattr(anms_module, "_BLOCK_ELEMENTS", 997)  # many small blocks
    np.testing.assert_allclose(suppression_radii(pts, resp), expected)


def test_anms_count_distinct_and_strongest_kept() -> None:
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 100, (300, 2))
    resp = rng.random(300)
    idx = anms(pts, resp, 25)
    assert idx.dtype == np.int64 and len(idx) == 25 and len(set(idx.tolist())) == 25
    assert idx[0] == int(np.argmax(resp))
    assert len(anms(pts[:10], resp[:10], 25)) == 10  # count > N: all of them
    assert len(anms(pts, resp, 0)) == 0
    assert anms(np.zeros((0, 2)), np.zeros(0), 5).shape == (0,)


def test_anms_spreads_points_better_than_top_responses() -> None:
    rng = np.random.default_rng(4)
    cluster = rng.uniform(0, 12, (60, 2))  # strong responses packed in one corner
    spread = rng.uniform(0, 200, (40, 2))
    pts = np.concatenate([cluster, spread])
    # Corner-like (Harris) responses spread over orders of magnitude; every spread
    # point is weaker than every clustered one.
    resp = np.concatenate([10 ** rng.uniform(-2, 0, 60), 10 ** rng.uniform(-4, -2.1, 40)])
    count = 16

    def min_pairwise(sel: np.ndarray) -> float:
        d = np.linalg.norm(pts[sel, None] - pts[None, sel], axis=2)
        return float(d[np.triu_indices(len(sel), 1)].min())

    def cells_covered(sel: np.ndarray) -> int:  # 4x4 grid over the 200x200 area
        return len({(int(x // 50), int(y // 50)) for x, y in pts[sel]})

    chosen = anms(pts, resp, count)
    top = np.argsort(-resp)[:count]
    assert chosen[0] == np.argmax(resp)
    assert min_pairwise(chosen) > 3 * min_pairwise(top)
    assert cells_covered(chosen) >= cells_covered(top) + 5


def test_anms_spreads_points_with_near_equal_responses() -> None:
    # All responses within 10 % of each other: none dominates another at robustness
    # 0.9, and the choice must still be spread rather than the top responses.
    rng = np.random.default_rng(5)
    pts = np.concatenate([rng.uniform(0, 5, (30, 2)), [[100.0, 100.0], [0.0, 100.0], [100.0, 0.0]]])
    resp = np.concatenate([rng.uniform(0.97, 1.0, 30), [0.95, 0.95, 0.95]])
    chosen = set(anms(pts, resp, 4).tolist())
    assert {30, 31, 32} <= chosen and int(np.argmax(resp)) in chosen


# --------------------------------------------------------------------------- ORB / SIFT


@pytest.mark.parametrize("method, dim", [("orb", 32), ("sift", 128)])
@pytest.mark.parametrize("size", [48, 128])
def test_detector_on_textured_image(method: str, dim: int, size: int) -> None:
    det = KeypointDetector(KeypointConfig(method=method, count=30, candidates=500))
    assert det.descriptor_dim == dim and det.descriptor_dtype == np.uint8
    pts, desc = det(textured_image(size))
    assert pts.dtype == np.float32 and pts.shape[1] == 2
    assert desc.dtype == np.uint8 and desc.shape == (len(pts), dim)
    # Small crops still give a useful pool (ORB's border is scaled to the image).
    assert 10 <= len(pts) <= 30
    assert (pts >= 0).all() and (pts[:, 0] <= size - 1).all() and (pts[:, 1] <= size - 1).all()
    if method == "orb":
        # Not all pushed away from a wide 31-px border.
        assert (np.minimum(pts, size - 1 - pts).min(axis=1) < 0.25 * size).any()


def test_orb_keypoints_land_on_drawn_corners() -> None:
    img = np.zeros((128, 128, 3), np.uint8)
    img[30:70, 50:100] = 255  # rows 30..69, columns 50..99: not symmetric in x and y
    corners = np.array([[49.5, 29.5], [99.5, 29.5], [49.5, 69.5], [99.5, 69.5]])  # (x, y)
    pts, _ = KeypointDetector(KeypointConfig(method="orb", count=50))(img)
    dist = np.linalg.norm(pts[:, None] - corners[None], axis=2)
    # FAST/Harris place a corner about one pyramid pixel inside it: allow 2 px.
    assert (dist.min(axis=0) < 2.0).all(), dist.min(axis=0)


@pytest.mark.parametrize("method", ["orb", "sift"])
def test_keypoints_mirror_symmetric_on_symmetric_image(method: str) -> None:
    # A square centred in a 96x128 image: with the pixel-centre convention held at
    # every pyramid level, detections come in exact mirror pairs (x -> W-1-x, y -> H-1-y).
    # OpenCV's raw ORB coordinates at levels > 0 miss this by up to ~1.5 px.
    h, w = 96, 128
    img = np.zeros((h, w), np.uint8)
    img[28:68, 44:84] = 255
    for x in (20, w - 1 - 20):  # four small discs (blobs for SIFT), mirror-placed
        for y in (15, h - 1 - 15):
            cv2.circle(img, (x, y), 3, 255, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    pts, _ = KeypointDetector(KeypointConfig(method=method, count=1000, candidates=1000))(img)
    assert len(pts) >= 5
    # SIFT's own sub-pixel fit is biased by ~0.1 px at coarse octaves; ORB is exact.
    tolerance = 0.1 if method == "orb" else 0.25
    for mirrored in (np.c_[w - 1 - pts[:, 0], pts[:, 1]], np.c_[pts[:, 0], h - 1 - pts[:, 1]]):
        gap = np.linalg.norm(mirrored[:, None] - pts[None], axis=2).min(axis=1)
        assert gap.max() < tolerance, gap.max()


def test_sift_keypoint_on_blob_centre() -> None:
    img = np.zeros((96, 96, 3), np.uint8)
    cv2.circle(img, (37, 61), 4, (255, 255, 255), -1)  # centre x=37, y=61
    pts, _ = KeypointDetector(KeypointConfig(method="sift", count=10))(img)
    assert np.linalg.norm(pts - [37, 61], axis=1).min() < 1.0


@pytest.mark.parametrize("method", ["orb", "sift"])
def test_grayscale_bgra_and_blank_images(method: str) -> None:
    det = KeypointDetector(KeypointConfig(method=method, count=20))
    bgr = textured_image(96, seed=5)
    ref_pts, ref_desc = det(bgr)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    for variant in (gray, gray[:, :, None], cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), gray.astype(np.float32) / 255):
        pts, desc = det(variant)
        np.testing.assert_array_equal(pts, ref_pts)
        np.testing.assert_array_equal(desc, ref_desc)
    for blank in (np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 128, np.uint8), np.zeros((4, 4), np.uint8)):
        pts, desc = det(blank)
        assert pts.shape == (0, 2) and pts.dtype == np.float32
        assert desc.shape == (0, det.descriptor_dim) and desc.dtype == det.descriptor_dtype
    with pytest.raises(ValueError, match="shape"):
        det(np.zeros((8, 8, 2), np.uint8))


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="method"):
        KeypointDetector(KeypointConfig(method="akaze"))
    with pytest.raises(ValueError, match="superpoint_weights"):
        KeypointDetector(KeypointConfig(method="superpoint"))


# --------------------------------------------------------------------------- descriptors


def test_orb_float_squared_l2_equals_hamming() -> None:
    rng = np.random.default_rng(6)
    desc = rng.integers(0, 256, (20, 32), dtype=np.uint8)
    f = descriptors_to_float(desc)
    assert f.dtype == np.float32 and f.shape == (20, 256) and set(np.unique(f)) <= {0.0, 1.0}
    for i in range(20):
        for j in range(i + 1, 20):
            hamming = cv2.norm(desc[i], desc[j], cv2.NORM_HAMMING)
            assert float(np.sum((f[i] - f[j]) ** 2)) == hamming


def test_sift_and_superpoint_floats() -> None:
    rng = np.random.default_rng(7)
    sift = rng.integers(0, 256, (5, 128), dtype=np.uint8)
    f = descriptors_to_float(sift)
    assert f.shape == (5, 128) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(f * np.linalg.norm(sift.astype(float), axis=1, keepdims=True), sift, rtol=1e-5)
    sp = rng.normal(size=(4, 256))
    np.testing.assert_array_equal(descriptors_to_float(sp), sp.astype(np.float32))
    assert descriptors_to_float(np.zeros((0, 32), np.uint8)).shape == (0, 256)


# --------------------------------------------------------------------------- outliers


def clustered_descriptors(seed: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-image float descriptors: 4 tight clusters shared by all images + planted far outliers."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 32)).astype(np.float32) * 3
    images, planted = [], []
    for img in range(12):
        inliers = centres[rng.integers(0, 4, 9)] + rng.normal(scale=0.05, size=(9, 32)).astype(np.float32)
        is_out = np.zeros(9, bool)
        if img % 3 == 0:  # 4 images each carry 3 outliers far from everything
            inliers[:3] = rng.normal(size=(3, 32)).astype(np.float32) * 30
            is_out[:3] = True
        images.append(inliers)
        planted.append(is_out)
    images.insert(5, np.zeros((0, 32), np.float32))  # an image without keypoints
    planted.insert(5, np.zeros(0, bool))
    return images, np.concatenate(planted)


@pytest.mark.parametrize("max_reference", [200_000, 60])
def test_outlier_removal_drops_planted_outliers(max_reference: int) -> None:
    images, planted = clustered_descriptors()
    total = len(planted)  # 108
    masks = outlier_keep_masks(images, fraction=0.25, neighbours=5, max_reference=max_reference)
    assert [len(m) for m in masks] == [len(d) for d in images]
    assert all(m.dtype == bool for m in masks)
    keep = np.concatenate(masks)
    assert (~keep).sum() == round(0.25 * total)
    assert not keep[planted].any()  # all 12 planted outliers removed


def test_outlier_fraction_exact_with_ties() -> None:
    # Identical ORB descriptors: every score ties, the dropped count is still exact.
    images = [np.full((n, 32), 7, np.uint8) for n in (5, 0, 8, 3)]
    for fraction in (0.0, 0.4, 1.0):
        keep = np.concatenate(outlier_keep_masks(images, fraction, neighbours=3))
        assert (~keep).sum() == round(fraction * 16)
    assert outlier_keep_masks([], 0.4, 3) == []
    assert [m.tolist() for m in outlier_keep_masks([np.zeros((0, 32), np.uint8)], 0.4, 3)] == [[]]
    with pytest.raises(ValueError):
        outlier_keep_masks(images, 1.5, 3)


def test_outlier_score_excludes_the_point_itself() -> None:
    x = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [13.0, 4.0]], np.float32)
    # Point 0's nearest other point is its duplicate (0); point 2's is point 3 (5).
    np.testing.assert_allclose(outlier_scores(x, neighbours=1), [0.0, 0.0, 5.0, 5.0])
    # Median over 3 neighbours of point 2: distances 10, 10, 5 -> 10.
    assert outlier_scores(x, neighbours=3)[2] == pytest.approx(10.0)


# --------------------------------------------------------------------------- SuperPoint

RELEASED_KEYS = {
    f"{name}.{kind}"
    for name in (
        *(f"conv{i}{ab}" for i in range(1, 5) for ab in "ab"),
        "convPa", "convPb", "convDa", "convDb",
    )
    for kind in ("weight", "bias")
}


@pytest.fixture
def superpoint_file(tmp_path: Path) -> Path:
    import torch

    from k2l_dist.keypoints.superpoint import SuperPoint

    torch.manual_seed(0)
    path = tmp_path / "superpoint_random.pth"
    torch.save(SuperPoint().state_dict(), path)
    return path


def test_superpoint_state_dict_names_match_release() -> None:
    from k2l_dist.keypoints.superpoint import SuperPoint

    state = SuperPoint().state_dict()
    assert set(state) == RELEASED_KEYS
    assert tuple(state["conv1a.weight"].shape) == (64, 1, 3, 3)
    assert tuple(state["convPb.weight"].shape) == (65, 256, 1, 1)
    assert tuple(state["convDb.weight"].shape) == (256, 256, 1, 1)


def test_superpoint_loads_and_detects(superpoint_file: Path) -> None:
    cfg = KeypointConfig(method="superpoint", count=20, superpoint_weights=str(superpoint_file))
    with one_torch_thread():
        det = KeypointDetector(cfg)
        assert det.descriptor_dim == 256 and det.descriptor_dtype == np.float32
        pts, desc = det(textured_image(64, seed=9))
        pts_odd, desc_odd = det(textured_image(64, seed=9)[:61, :53])  # not a multiple of 8
    assert 1 <= len(pts) <= 20 and desc.shape == (len(pts), 256) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    assert (pts >= 0).all() and (pts <= 63).all()
    assert 1 <= len(pts_odd) <= 20 and desc_odd.shape == (len(pts_odd), 256)
    assert (pts_odd[:, 0] <= 52).all() and (pts_odd[:, 1] <= 60).all()


def test_superpoint_score_layout_and_descriptor_sampling() -> None:
    import torch

    from k2l_dist.keypoints.superpoint import SuperPoint, sample_descriptors

    net = SuperPoint().eval()
    with torch.no_grad():
        net.convPb.weight.zero_()
        net.convPb.bias.zero_()
        net.convPb.bias[8 * 2 + 5] = 20.0  # channel i*8+j: row offset 2, column offset 5
        with one_torch_thread():
            scores, coarse = net(torch.rand(1, 1, 32, 48))
    assert scores.shape == (1, 32, 48) and coarse.shape == (1, 256, 4, 6)
    rows, cols = torch.nonzero(scores[0] > 0.5, as_tuple=True)
    assert len(rows) == 4 * 6 and (rows % 8 == 2).all() and (cols % 8 == 5).all()
    # A cell's descriptor sits at its centre pixel 8c + 3.5.
    at_centres = sample_descriptors(coarse, torch.tensor([[8 * 4 + 3.5, 8 * 1 + 3.5], [3.5, 3.5]]))
    torch.testing.assert_close(at_centres[0], coarse[0, :, 1, 4])
    torch.testing.assert_close(at_centres[1], coarse[0, :, 0, 0])


def test_superpoint_bad_weight_files(tmp_path: Path, superpoint_file: Path) -> None:
    import torch

    from k2l_dist.keypoints.superpoint import load_superpoint

    state = torch.load(superpoint_file, weights_only=True)
    renamed = dict(state)
    renamed["convXa.weight"] = renamed.pop("convDa.weight")
    bad_key = tmp_path / "renamed.pth"
    torch.save(renamed, bad_key)
    with pytest.raises(ValueError, match=r"renamed\.pth.*convDa\.weight"):
        load_superpoint(bad_key)

    wrong_shape = dict(state)
    wrong_shape["convPb.weight"] = torch.zeros(64, 256, 1, 1)
    bad_shape = tmp_path / "shape.pth"
    torch.save(wrong_shape, bad_shape)
    with pytest.raises(ValueError, match=r"shape\.pth.*convPb\.weight"):
        load_superpoint(bad_shape)

    pickled = tmp_path / "object.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a module, not tensors
    with pytest.raises(ValueError, match=r"object\.pth"):
        load_superpoint(pickled)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_superpoint(tmp_path / "missing.pth")

    prefixed = tmp_path / "dataparallel.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    assert set(load_superpoint(prefixed).state_dict()) == RELEASED_KEYS
