"""Networks Φ/Ψ and point operations (coordinate conventions, NMS, sampling, peaks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from k2l_dist.config import ModelConfig
from k2l_dist.loss import gaussian_heatmaps
from k2l_dist.models import (
    STRIDE,
    KeypointNet,
    LandmarkNet,
    count_parameters,
    heatmap_peaks,
    nms_peaks,
    sample_descriptors,
    sample_negative_locations,
    to_feature_coords,
    to_image_coords,
)

TINY = ModelConfig(width=16, depth=2, stacks=1, descriptor_dim=8, groups=4)


# --------------------------------------------------------------------------- networks


def test_keypoint_net_shapes_and_range() -> None:
    torch.manual_seed(0)
    net = KeypointNet(TINY)
    with torch.no_grad():
        # Non-square, and a size whose 1/4 map (10) is not divisible by 2**depth.
        for h, w in ((32, 48), (40, 40)):
            heat, desc = net(torch.rand(2, 3, h, w))
            assert heat.shape == (2, 1, h // STRIDE, w // STRIDE)
            assert desc.shape == (2, TINY.descriptor_dim, h // STRIDE, w // STRIDE)
            assert heat.min() > 0 and heat.max() < 1


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(width=16, depth=2, stacks=2, descriptor_dim=8, groups=4, blocks=2)  # all code paths
    net = KeypointNet(cfg)
    heat, desc = net(torch.rand(2, 3, 32, 32))
    (heat.square().sum() + desc.square().sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_landmark_net_from_keypoint_net_copies_backbone() -> None:
    torch.manual_seed(0)
    phi = KeypointNet(TINY)
    # Make Φ's weights distinct from any fresh init so a silent re-init would show.
    with torch.no_grad():
        for p in phi.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    psi = LandmarkNet.from_keypoint_net(phi, num_landmarks=5)
    phi_state, psi_state = phi.backbone.state_dict(), psi.backbone.state_dict()
    assert phi_state.keys() == psi_state.keys()
    for key in phi_state:
        assert torch.equal(phi_state[key], psi_state[key]), key
        assert phi_state[key].data_ptr() != psi_state[key].data_ptr(), key  # a copy, not shared
    assert psi.head.weight.shape == (5, TINY.width, 1, 1)
    assert phi.detector.weight.shape == (1, TINY.width, 1, 1)
    assert phi.descriptor.weight.shape == (TINY.descriptor_dim, TINY.width, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    phi.eval(), psi.eval()
    assert torch.equal(phi.backbone(x), psi.backbone(x))
    out = psi(x)
    assert out.shape == (2, 5, 8, 8) and out.min() > 0 and out.max() < 1
    # Everything except the head is copied: the number of parameters differs by the heads only.
    heads_phi = count_parameters(phi.detector) + count_parameters(phi.descriptor)
    assert count_parameters(psi) - count_parameters(psi.head) == count_parameters(phi) - heads_phi


def test_bf16_autocast_forward() -> None:
    torch.manual_seed(0)
    net = KeypointNet(TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heat, desc = net(torch.rand(1, 3, 32, 32))
    assert torch.isfinite(heat.float()).all() and torch.isfinite(desc.float()).all()
    pts = sample_descriptors(desc, torch.tensor([[[5.0, 9.0]]]), STRIDE)
    assert pts.dtype == torch.float32 and torch.allclose(pts.norm(dim=-1), torch.ones(1, 1))


# --------------------------------------------------------------------------- coordinates


def test_coordinate_mapping() -> None:
    # Stride 4: image pixels 0..3 form feature pixel 0, whose centre is image x = 1.5.
    assert to_feature_coords(1.5, 4) == 0.0
    assert to_feature_coords(5.5, 4) == 1.0
    assert to_feature_coords(-0.5, 4) == -0.5  # left edge of the image = left edge of the map
    assert to_image_coords(2.0, 4) == 9.5
    x = torch.rand(10, 2) * 100 - 10
    assert torch.allclose(to_image_coords(to_feature_coords(x, 4), 4), x, atol=1e-5)


# --------------------------------------------------------------------------- NMS


def test_nms_finds_planted_peaks_and_suppresses_neighbours() -> None:
    hm = torch.zeros(2, 1, 16, 20)  # non-square: catches an x/y swap
    hm[0, 0, 3, 5] = 0.9
    hm[0, 0, 3, 6] = 0.5  # neighbour of the strongest peak: suppressed
    hm[0, 0, 3, 8] = 0.4  # 3 px away: a peak for radius 1, suppressed for radius 3
    hm[0, 0, 10, 17] = 0.7
    hm[0, 0, 12, 12] = hm[0, 0, 12, 13] = 0.6  # plateau: exactly one survives
    hm[0, 0, 0, 0] = 0.05  # below threshold
    hm[1, 0, 15, 19] = 0.8  # corner of the second image

    pts, scores, valid = nms_peaks(hm, max_points=6, threshold=0.1, radius=1)
    assert pts.shape == (2, 6, 2) and scores.shape == valid.shape == (2, 6)
    assert valid[0].tolist() == [True, True, True, True, False, False]
    assert pts[0, :4].tolist() == [[5.0, 3.0], [17.0, 10.0], [12.0, 12.0], [8.0, 3.0]]
    assert torch.allclose(scores[0, :4], torch.tensor([0.9, 0.7, 0.6, 0.4]))
    assert valid[1].tolist() == [True] + [False] * 5
    assert pts[1, 0].tolist() == [19.0, 15.0]
    assert (scores[~valid] == 0).all() and (pts[~valid] == 0).all()

    pts3, _, valid3 = nms_peaks(hm, max_points=6, threshold=0.1, radius=3)
    assert pts3[0][valid3[0]].tolist() == [[5.0, 3.0], [17.0, 10.0], [12.0, 12.0]]


def test_nms_pads_when_map_is_tiny_and_subpixel_refines() -> None:
    hm = torch.zeros(1, 1, 2, 2)
    hm[0, 0, 1, 0] = 1.0
    pts, _, valid = nms_peaks(hm, max_points=7, threshold=0.5)
    assert pts.shape == (1, 7, 2) and valid.sum() == 1 and pts[0, 0].tolist() == [0.0, 1.0]

    truth = torch.tensor([[[7.3, 4.6]]])
    hm = gaussian_heatmaps(truth, torch.ones(1, 1, dtype=torch.bool), (12, 16), sigma=1.2)
    pts, _, valid = nms_peaks(hm, max_points=2, threshold=0.1, subpixel=True)
    assert valid[0].tolist() == [True, False]
    assert torch.allclose(pts[0, 0], truth[0, 0], atol=1e-3)


# --------------------------------------------------------------------------- descriptors


def test_sample_descriptors_exact_at_feature_pixel_centres() -> None:
    torch.manual_seed(0)
    desc = torch.randn(2, 5, 6, 7)
    rows = torch.tensor([[0, 2, 5, 3], [1, 4, 0, 5]])
    cols = torch.tensor([[0, 6, 3, 1], [2, 5, 6, 0]])
    feat_pts = torch.stack([cols, rows], dim=-1).float()
    out = sample_descriptors(desc, to_image_coords(feat_pts, STRIDE), STRIDE)
    expect = torch.stack([desc[b, :, rows[b], cols[b]].T for b in range(2)])
    assert torch.allclose(out, F.normalize(expect, dim=-1), atol=1e-6)


def test_sample_descriptors_bilinear_between_centres() -> None:
    torch.manual_seed(0)
    desc = torch.randn(1, 4, 5, 5)
    a, b_, c, d = desc[0, :, 2, 1], desc[0, :, 2, 2], desc[0, :, 3, 1], desc[0, :, 3, 2]
    feat_pts = torch.tensor([[[1.25, 2.0], [1.0, 2.75], [1.5, 2.5]]])
    out = sample_descriptors(desc, to_image_coords(feat_pts, STRIDE), STRIDE, normalize=False)
    assert torch.allclose(out[0, 0], 0.75 * a + 0.25 * b_, atol=1e-6)
    assert torch.allclose(out[0, 1], 0.25 * a + 0.75 * c, atol=1e-6)
    assert torch.allclose(out[0, 2], (a + b_ + c + d) / 4, atol=1e-6)
    # Normalisation happens after interpolation.
    out_n = sample_descriptors(desc, to_image_coords(feat_pts, STRIDE), STRIDE)
    assert torch.allclose(out_n[0, 0], F.normalize(0.75 * a + 0.25 * b_, dim=0), atol=1e-6)


def test_sample_descriptors_matches_avg_pooled_pixel_grid() -> None:
    # An image whose channels are its own pixel-centre x and y, average-pooled by the
    # stride, is a feature map holding each feature pixel's image coordinates. Sampling
    # it at any interior image point must return that point: this pins the mapping.
    h, w, s = 24, 32, STRIDE
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    fmap = F.avg_pool2d(torch.stack([xs, ys])[None], s)
    torch.manual_seed(0)
    lo = (s - 1) / 2  # first feature-pixel centre, in image pixels
    span = torch.tensor([w - 1 - 2 * lo, h - 1 - 2 * lo])  # between first and last centre
    pts = torch.rand(1, 50, 2) * span + lo
    out = sample_descriptors(fmap, pts, s, normalize=False)
    assert torch.allclose(out, pts, atol=1e-4)
    # Beyond the outermost centres the border value is repeated (clamped, not zero-padded).
    far = torch.tensor([[[-20.0, 100.0]]])
    edge = sample_descriptors(fmap, far, s, normalize=False)
    assert torch.allclose(edge, torch.tensor([[[lo, h - 1 - lo]]]))


def test_sample_negative_locations_respects_distance_and_image() -> None:
    points = torch.tensor([[[4.0, 4.0], [10.0, 3.0], [0.0, 0.0]], [[12.0, 9.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    gen = torch.Generator().manual_seed(0)
    locs, ok = sample_negative_locations(points, valid, (12, 16), count=40, min_distance=3.0, generator=gen)
    assert locs.shape == (2, 40, 2) and ok.all()
    assert (locs == locs.round()).all()
    assert (locs[..., 0] < 16).all() and (locs[..., 1] < 12).all()
    for b in range(2):
        d = torch.cdist(locs[b], points[b][valid[b]])
        assert (d >= 3.0).all()
        assert len({tuple(p) for p in locs[b].tolist()}) == 40  # without replacement
    gen = torch.Generator().manual_seed(0)
    again, _ = sample_negative_locations(points, valid, (12, 16), count=40, min_distance=3.0, generator=gen)
    assert torch.equal(locs, again)  # reproducible with a generator
    # Invalid points do not repel: with none valid, every pixel is admissible.
    all_locs, all_ok = sample_negative_locations(
        points[:1, 2:], torch.zeros(1, 1, dtype=torch.bool), (5, 5), count=25, min_distance=2.0
    )
    assert all_ok.all() and len({tuple(p) for p in all_locs[0].tolist()}) == 25
    # Too few admissible pixels: the surplus slots are flagged.
    few, ok_few = sample_negative_locations(
        torch.tensor([[[2.0, 2.0]]]), torch.tensor([[True]]), (5, 5), count=10, min_distance=2.5
    )
    admissible = sum(1 for y in range(5) for x in range(5) if math.hypot(x - 2, y - 2) >= 2.5)
    assert ok_few.sum() == admissible and ok_few[0, :admissible].all()


# --------------------------------------------------------------------------- peaks


@pytest.mark.parametrize("background", [0.0, 0.02])
def test_heatmap_peaks_subpixel(background: float) -> None:
    truth = torch.tensor([[[10.3, 7.7], [3.0, 20.45], [25.8, 5.1]], [[0.4, 0.6], [17.65, 12.2], [9.5, 9.5]]])
    hm = gaussian_heatmaps(truth, torch.ones(2, 3, dtype=torch.bool), (24, 32), sigma=1.5) * 0.8 + background
    pts, conf = heatmap_peaks(hm)
    assert pts.shape == (2, 3, 2) and conf.shape == (2, 3)
    err = (pts - truth).norm(dim=-1)
    assert (err < 0.1).all(), err
    assert torch.allclose(conf, hm.flatten(2).amax(-1))
    # The local soft-argmax is only approximately unbiased, and only away from borders.
    pts_sa, _ = heatmap_peaks(hm, method="soft_argmax", radius=3)
    interior = torch.tensor([[True, False, True], [False, True, True]])
    assert ((pts_sa - truth).norm(dim=-1)[interior] < 0.15).all()
    pts_int, _ = heatmap_peaks(hm, method="none")
    assert (pts_int == pts_int.round()).all() and ((pts_int - truth).abs() <= 0.5 + 1e-6).all()


def test_extraction_recovers_planted_fractional_peaks_within_a_tenth_of_a_pixel() -> None:
    from k2l_dist.models.extract import extract

    planted = torch.tensor([[[5.3, 7.8], [11.6, 3.25], [2.5, 12.1]]])  # (x, y) heatmap pixels
    heat = gaussian_heatmaps(planted, torch.ones(1, 3, dtype=torch.bool), (16, 16), 1.0).amax(1, keepdim=True)

    class Planted(torch.nn.Module):
        def forward(self, images):
            return heat.expand(len(images), -1, -1, -1), torch.ones(len(images), 4, 16, 16)

    batch = {"view0": torch.zeros(1, 3, 64, 64), "matrix0": torch.eye(3)[:2][None], "id": torch.tensor([7])}
    for subpixel, tol in ((True, 0.1), (False, 0.75)):
        ext = extract(Planted(), [batch], max_points=5, threshold=0.2, flip=False, subpixel=subpixel,
                      show_progress=False)
        found = (torch.from_numpy(ext.points) + 0.5) / 4 - 0.5  # crop pixels → heatmap pixels
        err = torch.cdist(found, planted[0]).min(dim=1).values
        assert len(err) == 3 and err.max() < tol, (subpixel, err)
    assert err.max() > 0.1  # integer peaks alone are off by more than the bound


def test_extraction_mirror_pass_shares_the_batch_without_mixing_images():
    """One forward over originals + mirrored images gives each image's own detections and,
    for the mirrored descriptors, what a separate pass over the mirrored images gives."""
    from k2l_dist.models.extract import extract
    from k2l_dist.models.points import sample_descriptors

    torch.manual_seed(0)
    net = KeypointNet(TINY).eval()
    images = torch.rand(3, 3, 32, 32)
    batch = {"view0": images, "matrix0": torch.eye(3)[:2].expand(3, 2, 3), "id": torch.tensor([4, 9, 2])}
    shared = extract(net, [batch], max_points=6, threshold=0.0, show_progress=False)
    alone = extract(net, [batch], max_points=6, threshold=0.0, flip=False, show_progress=False)
    np.testing.assert_array_equal(shared.image_ids, alone.image_ids)
    np.testing.assert_allclose(shared.points, alone.points, atol=1e-4)
    np.testing.assert_allclose(shared.descriptors, alone.descriptors, atol=1e-4)
    with torch.no_grad():
        _, fdmap = net(torch.flip(images, dims=[-1]))
    want = []
    for i, sid in enumerate(batch["id"].tolist()):
        pts = torch.from_numpy(alone.points[alone.image_ids == sid]).clone()
        pts[:, 0] = 31 - pts[:, 0]  # x ↔ S-1-x
        want.append(sample_descriptors(fdmap[i:i + 1], pts[None], STRIDE)[0])
    np.testing.assert_allclose(shared.flipped_descriptors, torch.cat(want).numpy(), atol=1e-4)


def test_psi_can_keep_phis_descriptor_layer_before_its_heatmaps():
    import dataclasses

    from k2l_dist.config import ModelConfig
    from k2l_dist.models import KeypointNet, LandmarkNet

    cfg = dataclasses.replace(ModelConfig(width=16, depth=2, descriptor_dim=8, groups=4), psi_head="descriptor")
    phi = KeypointNet(cfg)
    psi = LandmarkNet.from_keypoint_net(phi, 5)
    assert torch.equal(psi.head[0].weight, phi.descriptor.weight) and psi.head[1].out_channels == 5
    assert psi(torch.rand(2, 3, 32, 32)).shape == (2, 5, 8, 8)
    plain = LandmarkNet.from_keypoint_net(KeypointNet(dataclasses.replace(cfg, psi_head="conv")), 5)
    assert isinstance(plain.head, torch.nn.Conv2d)


def test_compiled_extraction_gives_the_plain_networks_points_and_descriptors():
    """Extraction goes through `compile` like training (`Run.phi_extract`): with the eager
    backend (dynamo tracing, eager kernels) it finds the plain network's points and
    descriptors, mirrored ones included; the module it wraps stays in training mode."""
    from k2l_dist.models.extract import extract
    from k2l_dist.training.phases import compiled

    torch.manual_seed(0)
    net = KeypointNet(TINY).train()
    batch = {"view0": torch.rand(3, 3, 32, 32), "matrix0": torch.eye(3)[:2].expand(3, 2, 3),
             "id": torch.tensor([4, 9, 2])}
    torch._dynamo.reset()
    plain = extract(net, [batch], max_points=6, threshold=0.0, show_progress=False)
    traced = compiled(net, "eager")
    assert traced is not net
    got = extract(traced, [batch], max_points=6, threshold=0.0, show_progress=False)
    assert net.training and traced.training
    np.testing.assert_array_equal(got.image_ids, plain.image_ids)
    for name in ("points", "scores", "descriptors", "flipped_descriptors"):
        np.testing.assert_allclose(getattr(got, name), getattr(plain, name), rtol=1e-5, atol=1e-6, err_msg=name)
