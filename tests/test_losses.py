"""Detector / landmark heatmap losses and the contrastive descriptor loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from k2l_dist.loss import (
    LossConfig,
    contrastive_loss,
    detector_loss,
    detector_target,
    gaussian_heatmaps,
    landmark_loss,
)

# --------------------------------------------------------------------------- heatmaps


def test_gaussian_heatmaps_orientation_peak_and_mask() -> None:
    pts = torch.tensor([[[5.0, 2.0], [1.0, 6.0]]])
    valid = torch.tensor([[True, False]])
    maps = gaussian_heatmaps(pts, valid, (8, 10), sigma=2.0)
    assert maps.shape == (1, 2, 8, 10)
    assert maps[0, 0, 2, 5] == 1.0 and maps[0, 0].argmax() == 2 * 10 + 5  # row y, column x
    assert torch.isclose(maps[0, 0, 2, 6], torch.tensor(math.exp(-1 / 8)))
    assert torch.isclose(maps[0, 0, 3, 6], torch.tensor(math.exp(-2 / 8)))
    assert (maps[0, 1] == 0).all()


def test_detector_target_is_max_not_sum() -> None:
    pts = torch.tensor([[[3.0, 3.0], [4.0, 3.0]]])
    target = detector_target(pts, torch.ones(1, 2, dtype=torch.bool), (8, 8), sigma=1.0)
    assert target.shape == (1, 1, 8, 8) and target.max() == 1.0
    assert torch.isclose(target[0, 0, 3, 3], torch.tensor(1.0))


def test_detector_loss_zero_at_target_and_mse_otherwise() -> None:
    pts = torch.tensor([[[3.0, 2.0], [6.5, 5.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    target = detector_target(pts, valid, (8, 9), sigma=1.0)
    assert detector_loss(target.clone(), pts, valid, sigma=1.0) == 0
    # The invalid (0,0) slot must not add a Gaussian: (0,0) only sees the tail of (3,2).
    assert torch.isclose(target[0, 0, 0, 0], torch.tensor(math.exp(-13 / 2)))
    zeros = torch.zeros(2, 1, 8, 9)
    assert torch.isclose(detector_loss(zeros, pts, valid, sigma=1.0), target.square().mean())
    ones = torch.ones(2, 1, 8, 9, dtype=torch.bfloat16)
    assert detector_loss(ones, pts, valid, 1.0).dtype == torch.float32


def test_landmark_loss_ignores_empty_channels() -> None:
    torch.manual_seed(0)
    pts = torch.tensor([[[2.0, 3.0], [5.0, 1.0], [0.0, 0.0]], [[4.0, 4.0], [0.0, 0.0], [1.0, 6.0]]])
    valid = torch.tensor([[True, True, False], [True, False, True]])
    pred = torch.rand(2, 3, 7, 7, requires_grad=True)
    loss = landmark_loss(pred, pts, valid, sigma=1.0)
    target = gaussian_heatmaps(pts, valid, (7, 7), 1.0)
    per = (pred - target).square().mean(dim=(2, 3))
    assert torch.isclose(loss, per[valid].mean())
    loss.backward()
    assert (pred.grad[~valid] == 0).all() and (pred.grad[valid] != 0).any()
    # Changing an empty channel's prediction leaves the loss unchanged.
    other = pred.detach().clone()
    other[0, 2] = 5.0
    other[1, 1] = -3.0
    assert torch.equal(landmark_loss(other, pts, valid, 1.0), loss.detach())
    # Exact prediction on labelled channels: zero, whatever the empty channels hold.
    exact = target.clone()
    exact[~valid] = 0.7
    assert landmark_loss(exact, pts, valid, 1.0) == 0
    none = landmark_loss(pred, pts, torch.zeros(2, 3, dtype=torch.bool), 1.0)
    assert none == 0 and none.requires_grad


# --------------------------------------------------------------------------- contrastive

U, V, W = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 images × 3 slots, 2-d descriptors. Slot 2 of image 0 is unlabelled (-1)."""
    desc_a = torch.tensor([[U, V, W], [U, W, V]])
    desc_b = torch.tensor([[U, V, V], [V, W, V]])
    labels = torch.tensor([[1, 2, -1], [1, 3, 2]])
    return desc_a, desc_b, labels, labels.clone()


def test_contrastive_hand_case_same_image_clustering() -> None:
    # Squared distances: u-v = v-w = 2, u-w = 4, equal = 0. Margin 1.
    # Positives. Slot identity: img0 (u,u)=0 (v,v)=0; img1 (u,v)=2 (w,w)=0 (v,v)=0 → 5 pairs, sum 2.
    # Cross-image, label 1: {u,u}×{u,v} → 0+2+0+2; label 2: {v,v}×{v,v} → 0 → 8 pairs, sum 4.
    # Label 3 is in one image only; the -1 slot is excluded. Total 13 pairs, sum 6.
    # Negatives (same image, different slots). img0: {A0,B0}=u vs {A1,B1}=v: 4 pairs at 2 → hinge 0.
    # img1: slot0 {u,v}, slot1 {w,w}, slot2 {v,v}: 12 pairs, only the two v–v pairs of
    # slots 0/2 have hinge 1 → 16 pairs, sum 2.
    out = contrastive_loss(*_hand_case(), margin=1.0)
    assert out["num_pos"] == 13 and out["num_neg"] == 16
    assert torch.isclose(out["positive"], torch.tensor(6 / 13))
    assert torch.isclose(out["negative"], torch.tensor(2 / 16))
    assert torch.isclose(out["loss"], torch.tensor(6 / 13 + 2 / 16))
    out2 = contrastive_loss(*_hand_case(), margin=1.0, neg_weight=3.0)
    assert torch.isclose(out2["loss"], torch.tensor(6 / 13 + 3 * 2 / 16))

    # Margin 3: hinge(2)=1, hinge(0)=3, hinge(4)=0. img0: 4×1; img1: slots(0,1) 0+0+1+1,
    # slots(0,2) 1+1+3+3, slots(1,2) 4×1 → 4 + 14 = 18 over 16 pairs.
    out3 = contrastive_loss(*_hand_case(), margin=3.0)
    assert torch.isclose(out3["negative"], torch.tensor(18 / 16))


def test_contrastive_hand_case_random_negatives_same_image_only() -> None:
    r = [1 / math.sqrt(2), 1 / math.sqrt(2)]
    neg_a = torch.tensor([[r], [V]])  # image 1's random descriptor equals its v points...
    neg_valid = torch.tensor([[True], [False]])  # ...but is flagged invalid
    out = contrastive_loss(*_hand_case(), neg_a, margin=1.0, neg_valid_a=neg_valid)
    # r vs the 4 valid points of image 0 (u, v, u, v): ‖r−u‖² = 2−√2, hinge √2−1 each.
    assert out["num_neg"] == 16 + 4
    assert torch.isclose(out["negative"], torch.tensor((2 + 4 * (math.sqrt(2) - 1)) / 20))
    # Image 0's random negative placed exactly on image 1's points adds nothing across images.
    out_b = contrastive_loss(*_hand_case(), None, torch.tensor([[V], [W]]), margin=1.0)
    # img0: v vs (u,v,u,v) → hinge 0,1,0,1 = 2; img1: w vs (u,w,v,v,w,v) → hinge 0,1,0,0,1,0 = 2
    assert out_b["num_neg"] == 16 + 4 + 6
    assert torch.isclose(out_b["negative"], torch.tensor((2 + 2 + 2) / 26))


def test_contrastive_hand_case_equivariance_and_different_clusters() -> None:
    eq = contrastive_loss(*_hand_case(), correspondence="equivariance")
    assert eq["num_pos"] == 5 and torch.isclose(eq["positive"], torch.tensor(2 / 5))
    assert eq["num_neg"] == 16 and torch.isclose(eq["negative"], torch.tensor(2 / 16))
    # Different clusters, margin 3: 16 cross-image labelled pairs with different labels.
    # img0 label1 (u,u) vs img1 label3 (w,w): 0 ×4, vs label2 (v,v): 1 ×4 → 4.
    # img0 label2 (v,v) vs img1 label1 (u,v): (1+3) ×2 → 8, vs label3 (w,w): 1 ×4 → 4.
    dc = contrastive_loss(*_hand_case(), margin=3.0, negatives="different_clusters")
    assert dc["num_neg"] == 16 and torch.isclose(dc["negative"], torch.tensor(16 / 16))
    assert dc["num_pos"] == 13
    # Random negatives are a same-image concept: ignored here.
    dc_r = contrastive_loss(*_hand_case(), torch.randn(2, 4, 2), margin=3.0, negatives="different_clusters")
    assert torch.equal(dc_r["negative"], dc["negative"]) and dc_r["num_neg"] == 16


def _reference(desc_a, desc_b, la, lb, va, vb, neg, neg_valid, margin, negatives, correspondence):
    """Pair-by-pair loop: an independent statement of which pairs count."""
    bsz, p, _ = desc_a.shape
    na = torch.nn.functional.normalize
    items = []  # (image, slot, label, vector)
    for b in range(bsz):
        for view_desc, lab, val in ((desc_a, la, va), (desc_b, lb, vb)):
            for s in range(p):
                if val[b, s]:
                    items.append((b, s, int(lab[b, s]), na(view_desc[b, s], dim=0)))
    pos, negs = [], []
    for (b1, s1, l1, f1), (b2, s2, l2, f2) in itertools.combinations(items, 2):
        d = float((f1 - f2).square().sum())
        if b1 == b2:
            if s1 == s2:
                pos.append(d)
            elif negatives == "same_image":
                negs.append(max(0.0, margin - d))
        elif l1 >= 0 and l2 >= 0:
            if l1 == l2 and correspondence == "clustering":
                pos.append(d)
            elif l1 != l2 and negatives == "different_clusters":
                negs.append(max(0.0, margin - d))
    if negatives == "same_image":
        for b in range(bsz):
            for r in range(neg.shape[1]):
                if neg_valid[b, r]:
                    for b2, _, _, f in items:
                        if b2 == b:
                            negs.append(max(0.0, margin - float((na(neg[b, r], dim=0) - f).square().sum())))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(pos), mean(negs), len(pos), len(negs)


@pytest.mark.parametrize("negatives", ["same_image", "different_clusters"])
@pytest.mark.parametrize("correspondence", ["clustering", "equivariance"])
def test_contrastive_matches_pairwise_reference(negatives: str, correspondence: str) -> None:
    g = torch.Generator().manual_seed(1)
    bsz, p, d, r = 3, 5, 4, 3
    desc_a, desc_b = torch.randn(bsz, p, d, generator=g), torch.randn(bsz, p, d, generator=g)
    labels_a = torch.randint(-1, 4, (bsz, p), generator=g)
    labels_b = labels_a.clone()
    labels_b[0, 1] = 3  # a flipped view may carry another label for the same point
    valid_a = torch.rand(bsz, p, generator=g) > 0.2
    valid_b = torch.rand(bsz, p, generator=g) > 0.2
    neg = torch.randn(bsz, r, d, generator=g)
    neg_valid = torch.rand(bsz, r, generator=g) > 0.3
    out = contrastive_loss(
        desc_a, desc_b, labels_a, labels_b, neg,
        valid_a=valid_a, valid_b=valid_b, neg_valid_a=neg_valid,
        margin=1.3, negatives=negatives, correspondence=correspondence,
    )  # fmt: skip
    pos, negv, npos, nneg = _reference(
        desc_a, desc_b, labels_a, labels_b, valid_a, valid_b, neg, neg_valid, 1.3, negatives, correspondence
    )
    assert out["num_pos"] == npos and out["num_neg"] == nneg
    assert abs(out["positive"].item() - pos) < 1e-5 and abs(out["negative"].item() - negv) < 1e-5


def _reference_loss(desc_a, desc_b, la, lb, va, vb, neg, neg_valid, points, min_dist, margin, negatives,
                    correspondence) -> torch.Tensor:
    """The loss pair by pair in torch (autograd through every pair), for gradient parity."""
    na = torch.nn.functional.normalize
    items = [(b, s, int(lab[b, s]), na(desc[b, s], dim=0))
             for b in range(desc_a.shape[0]) for desc, lab, val in ((desc_a, la, va), (desc_b, lb, vb))
             for s in range(desc_a.shape[1]) if val[b, s]]
    pos, negs = [], []
    for (b1, s1, l1, f1), (b2, s2, l2, f2) in itertools.combinations(items, 2):
        d = (f1 - f2).square().sum()
        if b1 == b2:
            if s1 == s2:
                pos.append(d)
            elif negatives == "same_image" and float((points[b1, s1] - points[b1, s2]).norm()) >= min_dist:
                negs.append(torch.relu(margin - d))
        elif l1 >= 0 and l2 >= 0:
            if l1 == l2 and correspondence == "clustering":
                pos.append(d)
            elif l1 != l2 and negatives == "different_clusters":
                negs.append(torch.relu(margin - d))
    if negatives == "same_image":
        negs += [torch.relu(margin - (na(neg[b, r], dim=0) - f).square().sum())
                 for b in range(neg.shape[0]) for r in range(neg.shape[1]) if neg_valid[b, r]
                 for b2, _, _, f in items if b2 == b]
    mean = lambda xs: torch.stack(xs).mean() if xs else desc_a.sum() * 0  # noqa: E731
    return mean(pos) + mean(negs)


@pytest.mark.parametrize("negatives", ["same_image", "different_clusters"])
@pytest.mark.parametrize("correspondence", ["clustering", "equivariance"])
def test_contrastive_gradients_match_the_pairwise_reference(negatives: str, correspondence: str) -> None:
    """The per-image blocks and per-label sums give the pair-by-pair loss's gradients."""
    g = torch.Generator().manual_seed(2)
    bsz, p, d, r = 4, 6, 5, 3
    leaves = [torch.randn(bsz, p, d, generator=g, requires_grad=True) for _ in range(2)]
    neg = torch.randn(bsz, r, d, generator=g, requires_grad=True)
    labels_a = torch.randint(-1, 3, (bsz, p), generator=g)  # few labels: many same-label pairs, in and across images
    labels_b = labels_a.clone()
    labels_b[1, 2] = 2
    valid_a, valid_b = torch.rand(bsz, p, generator=g) > 0.2, torch.rand(bsz, p, generator=g) > 0.2
    neg_valid = torch.rand(bsz, r, generator=g) > 0.3
    points = torch.rand(bsz, p, 2, generator=g) * 4
    ours = contrastive_loss(*leaves, labels_a, labels_b, neg, valid_a=valid_a, valid_b=valid_b,
                            neg_valid_a=neg_valid, margin=1.3, negatives=negatives, correspondence=correspondence,
                            points=points, neg_min_distance=1.5)["loss"]
    got = torch.autograd.grad(ours, [*leaves, neg], allow_unused=True)  # different_clusters: no random negatives
    ref = _reference_loss(*leaves, labels_a, labels_b, valid_a, valid_b, neg, neg_valid, points, 1.5, 1.3,
                          negatives, correspondence)
    want = torch.autograd.grad(ref, [*leaves, neg], allow_unused=True)
    assert abs(ours.item() - ref.item()) < 1e-5
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_contrastive_unlabelled_points_excluded_by_default() -> None:
    desc_a, desc_b, la, lb = _hand_case()
    base = contrastive_loss(desc_a, desc_b, la, lb)
    desc_a2, desc_b2 = desc_a.clone(), desc_b.clone()
    desc_a2[0, 2] = torch.tensor([0.3, -0.8])  # the label -1 slot
    desc_b2[0, 2] = torch.tensor([-0.6, 0.1])
    other = contrastive_loss(desc_a2, desc_b2, la, lb)
    for key in base:
        assert torch.equal(base[key], other[key]), key


def _grad_of_image1(desc_a: torch.Tensor, desc_b: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
    a, b = desc_a.clone().requires_grad_(True), desc_b.clone().requires_grad_(True)
    contrastive_loss(a, b, labels, labels, **kw)["loss"].backward()
    return torch.cat([a.grad[1], b.grad[1]])


def test_contrastive_negatives_never_cross_images_in_same_image_mode() -> None:
    torch.manual_seed(0)
    desc_a, desc_b = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])  # no label shared across images
    changed_a, changed_b = desc_a.clone(), desc_b.clone()
    changed_a[0] = desc_a[1]  # image 0 now sits right on image 1's descriptors
    changed_b[0] = desc_b[1]
    kw = {"margin": 2.0}
    assert torch.allclose(
        _grad_of_image1(desc_a, desc_b, labels, **kw), _grad_of_image1(changed_a, changed_b, labels, **kw)
    )
    # Control: the earlier work's different-cluster negatives do couple the images.
    kw = {"margin": 2.0, "negatives": "different_clusters"}
    assert not torch.allclose(
        _grad_of_image1(desc_a, desc_b, labels, **kw), _grad_of_image1(changed_a, changed_b, labels, **kw)
    )


def test_contrastive_equivariance_ignores_cross_image_labels() -> None:
    torch.manual_seed(0)
    desc_a, desc_b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    valid = torch.ones(3, 4, dtype=torch.bool)
    shared = torch.zeros(3, 4, dtype=torch.long)  # every point in one cluster
    distinct = torch.arange(12).view(3, 4)
    kw = {"valid_a": valid, "valid_b": valid, "correspondence": "equivariance"}
    one = contrastive_loss(desc_a, desc_b, shared, shared, **kw)
    two = contrastive_loss(desc_a, desc_b, distinct, distinct, **kw)
    assert one["num_pos"] == two["num_pos"] == 12
    assert torch.allclose(one["loss"], two["loss"])
    # Warm-up: no labels at all, but known correspondences via the valid masks.
    none = -torch.ones(3, 4, dtype=torch.long)
    warm = contrastive_loss(desc_a, desc_b, none, none, **kw)
    assert torch.allclose(warm["loss"], one["loss"]) and warm["num_pos"] == 12
    clustered = contrastive_loss(desc_a, desc_b, shared, shared, valid_a=valid, valid_b=valid)
    assert clustered["num_pos"] > 12  # clustering mode does use the shared label


def test_contrastive_empty_and_bf16_and_options() -> None:
    desc = torch.randn(2, 3, 4, requires_grad=True)
    none = -torch.ones(2, 3, dtype=torch.long)
    out = contrastive_loss(desc, desc, none, none)
    assert out["loss"] == 0 and out["num_pos"] == 0 and out["num_neg"] == 0
    out["loss"].backward()  # attached to the graph even with no pairs
    desc_a, desc_b, la, lb = _hand_case()
    ref = contrastive_loss(desc_a, desc_b, la, lb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = contrastive_loss(desc_a.bfloat16(), desc_b.bfloat16(), la, lb)
    assert low["loss"].dtype == torch.float32 and torch.allclose(low["loss"], ref["loss"], atol=1e-3)
    with pytest.raises(ValueError):
        contrastive_loss(desc_a, desc_b, la, lb, negatives="everything")
    with pytest.raises(ValueError):
        contrastive_loss(desc_a, desc_b, la, lb, correspondence="magic")
    cfg = LossConfig()
    assert cfg.negatives == "same_image" and cfg.correspondence == "clustering" and 0 < cfg.margin < 4


def test_detector_loss_leaves_out_images_that_sit_the_round_out() -> None:
    pred = torch.rand(3, 1, 8, 8)
    pts = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]], [[5.0, 2.0]]])
    valid = torch.tensor([[True], [False], [True]])
    full = detector_loss(pred, pts, valid, 1.0)
    only = detector_loss(pred, pts, valid, 1.0, images=torch.tensor([True, False, True]))
    kept = detector_loss(pred[[0, 2]], pts[[0, 2]], valid[[0, 2]], 1.0)
    torch.testing.assert_close(only, kept)  # image 1 (no labels) no longer pulls its map to zero
    assert not torch.isclose(only, full)
    none = detector_loss(pred.requires_grad_(), pts, valid, 1.0, images=torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0 and none.requires_grad


def test_two_detections_closer_than_the_minimum_are_not_negatives() -> None:
    torch.manual_seed(0)
    desc = F.normalize(torch.randn(1, 3, 8), dim=-1)
    labels = torch.tensor([[0, 1, 2]])
    points = torch.tensor([[[10.0, 10.0], [10.5, 10.0], [20.0, 4.0]]])  # slots 0 and 1: 0.5 apart
    base = dict(negatives="same_image", correspondence="equivariance", margin=4.0)
    far = contrastive_loss(desc, desc, labels, labels, points=points, neg_min_distance=1.5, **base)
    every = contrastive_loss(desc, desc, labels, labels, **base)
    # 6 points (3 slots × 2 views): 12 negative pairs, of which 0–1 across and within views: 4
    assert int(every["num_neg"]) == 12 and int(far["num_neg"]) == 8


def test_the_warm_up_draws_same_image_negatives_whatever_loss_negatives_says():
    """Warm-up points carry no cluster label: with different-cluster negatives they would
    give no negative pair at all (and the warm-up would collapse)."""
    from k2l_dist.config import LossConfig
    from k2l_dist.training.phases import warmup_loss

    g = torch.Generator().manual_seed(0)
    desc_a, desc_b = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    unlabelled = torch.full((2, 6), -1)
    present = torch.ones(2, 6, dtype=torch.bool)

    def pairs(loss):
        return contrastive_loss(desc_a, desc_b, unlabelled, unlabelled, valid_a=present, valid_b=present,
                                negatives=loss.negatives, correspondence=loss.correspondence)["num_neg"]

    asked = LossConfig(negatives="different_clusters")
    assert pairs(asked) == 0  # what the warm-up trained on before: positives only
    warm = warmup_loss(asked)
    assert warm.negatives == "same_image" and warm.correspondence == "equivariance"
    assert pairs(warm) == 2 * (12 * 11 // 2 - 6)  # every pair of two slots of one image, both views


def test_radii_scale_with_the_heatmap_size():
    from k2l_dist.config import RADIUS_REFERENCE, heatmap_radius
    from k2l_dist.models.extract import extract

    assert RADIUS_REFERENCE == 64 and heatmap_radius(5.7, 64) == 5.7
    assert heatmap_radius(5.7, 32) == pytest.approx(2.85) and heatmap_radius(2.0, 16) == 0.5

    class TwoPeaks(torch.nn.Module):
        """Φ stand-in: two peaks 2 heatmap pixels apart, whatever the input size."""

        def forward(self, images):
            side = images.shape[-1] // 4
            heat = torch.zeros(images.shape[0], 1, side, side)
            heat[:, 0, 10, 10], heat[:, 0, 10, 12] = 0.9, 0.8
            return heat, torch.ones(images.shape[0], 4, side, side)

    # stage1.nms_radius=2 (the official ±2 box at 64²): both peaks on a 32² map (radius 1), one on a 64² map
    for side, kept in ((32, 2), (64, 1)):
        batch = {"view0": torch.zeros(1, 3, 4 * side, 4 * side), "matrix0": torch.eye(3)[:2][None],
                 "id": torch.tensor([0])}
        ext = extract(TwoPeaks(), [batch], max_points=4, threshold=0.1, nms_radius=2.0, flip=False, subpixel=False,
                      show_progress=False)
        assert len(ext.points) == kept, side


def test_the_official_balance_is_one_mean_over_every_pair_with_the_hinge_on_the_distance():
    g = torch.Generator().manual_seed(3)
    desc_a, desc_b = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    labels = torch.tensor([[0, 1, 2]])
    out = contrastive_loss(desc_a, desc_b, labels, labels, margin=0.8, balance="official",
                           correspondence="equivariance")
    x = F.normalize(torch.cat([desc_a, desc_b], 1)[0], dim=-1)  # slots 0..2 in A, then in B
    sq = torch.cdist(x, x).square()
    pos = [sq[i, i + 3] for i in range(3)]
    neg = [sq[i, j] for i in range(6) for j in range(i + 1, 6) if i % 3 != j % 3]
    hinge = [torch.relu(0.8 - (d + 1e-9).sqrt()).square() for d in neg]
    expected = (sum(pos) + sum(hinge)) / (len(pos) + len(neg))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(out["num_pos"]) == 3 and int(out["num_neg"]) == len(neg) == 12


def test_cutout_hides_a_square_inside_the_image_half_the_time_reproducibly():
    from k2l_dist.training.steps import cut_out

    images = torch.ones(200, 3, 32, 32)
    out = cut_out(images, 0.25, 0.5, torch.Generator().manual_seed(1))
    hidden = (out == 0).all(1).sum((1, 2))  # black pixels per image
    assert set(hidden.tolist()) == {0, 64}  # an 8 × 8 square, whole, or nothing
    assert 70 < int((hidden > 0).sum()) < 130 and torch.equal(images, torch.ones_like(images))  # the input kept
    assert torch.equal(out, cut_out(images, 0.25, 0.5, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("negatives", ["same_image", "different_clusters"])
def test_fixed_label_bins_give_the_found_labels_loss_and_gradients(negatives: str) -> None:
    """`label_bins` (the table's label count, known on the host) sums per label in fixed bins
    without a host sync: the loss and gradients of the path that finds the labels on the
    device, and of the pair-by-pair reference."""
    g = torch.Generator().manual_seed(3)
    bsz, p, d, r = 4, 6, 5, 3
    labels_a = torch.randint(-1, 4, (bsz, p), generator=g)
    labels_b = labels_a.clone()
    labels_b[2, 0] = 6  # the largest label: the bins reach it
    valid_a, valid_b = torch.rand(bsz, p, generator=g) > 0.2, torch.rand(bsz, p, generator=g) > 0.2
    neg_valid = torch.rand(bsz, r, generator=g) > 0.3
    points = torch.rand(bsz, p, 2, generator=g) * 4
    start = [torch.randn(bsz, p, d, generator=g) for _ in range(2)] + [torch.randn(bsz, r, d, generator=g)]
    out = {}
    for bins in (None, 7, 40):  # exactly the labels' count, and more bins than labels
        leaves = [t.clone().requires_grad_(True) for t in start]
        loss = contrastive_loss(leaves[0], leaves[1], labels_a, labels_b, leaves[2], valid_a=valid_a, valid_b=valid_b,
                                neg_valid_a=neg_valid, margin=1.3, negatives=negatives, points=points,
                                neg_min_distance=1.5, label_bins=bins)
        grads = torch.autograd.grad(loss["loss"], leaves, allow_unused=True)
        out[bins] = ({k: float(v.detach()) for k, v in loss.items()}, grads)
    ref = _reference_loss(*[t.clone().requires_grad_(True) for t in start[:2]], labels_a, labels_b, valid_a, valid_b,
                          start[2], neg_valid, points, 1.5, 1.3, negatives, "clustering")
    for bins in (7, 40):
        assert out[bins][0].keys() == out[None][0].keys()
        for key, value in out[None][0].items():
            assert out[bins][0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (bins, key)
        for a, b in zip(out[bins][1], out[None][1]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert out[bins][0]["loss"] == pytest.approx(float(ref), abs=1e-5)


def test_fixed_label_bins_leave_no_graph_break_in_the_loss() -> None:
    """Under torch.compile the loss with `label_bins` is one graph; finding the labels on the
    device (torch.unique, boolean indexing) breaks it."""
    import torch._dynamo

    g = torch.Generator().manual_seed(4)
    desc_a, desc_b = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    labels = torch.randint(-1, 4, (3, 5), generator=g)
    neg = torch.randn(3, 2, 4, generator=g)

    def breaks(bins):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(
            lambda a, b: contrastive_loss(a, b, labels, labels, neg, label_bins=bins)["loss"])(desc_a, desc_b)
        return explained.graph_break_count
    assert breaks(4) == 0
    assert breaks(None) > 0
