"""Training pieces: label tables, clustering → pseudo-labels, Stage-2 targets, checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch

from k2l_dist.clustering.carry import carry_labels
from k2l_dist.clustering.rounds import recover
from k2l_dist.clustering.store import PointSet
from k2l_dist.config import Config, apply_values
from k2l_dist.models.extract import Extraction
from k2l_dist.training.labels import LabelTable
from k2l_dist.training.phases import initial_table, round_extract_ids
from k2l_dist.training.state import lr_for_world
from k2l_dist.training.steps import landmark_targets
from k2l_dist.utils.checkpoint import load_checkpoint, save_checkpoint


def test_label_table_lookup_pads_and_handles_unknown_ids():
    table = LabelTable.from_points(
        image_ids=np.array([5, 2, 5, 5, 2]),
        points=np.array([[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]], np.float32),
        labels=np.array([10, 20, 11, 12, 21]),
        flipped_labels=np.array([0, 1, 2, 3, 4]),
        all_ids=np.array([2, 5, 9]),
    )
    out = table.lookup(np.array([5, 9, 7, 2]), max_points=2)
    assert out["valid"].tolist() == [[True, True], [False, False], [False, False], [True, True]]
    assert out["labels"].tolist() == [[10, 11], [-1, -1], [-1, -1], [20, 21]]  # capped at max_points
    assert out["points"][3].tolist() == [[2, 2], [5, 5]]
    assert out["flipped_labels"][0].tolist() == [0, 2]
    back = LabelTable.from_state(table.state())
    assert np.array_equal(back.points, table.points) and np.array_equal(back.ids, [2, 5, 9])


def test_initial_table_takes_the_generic_keypoints_of_the_split():
    meta = {"ids": np.array([0, 1, 2]), "kp_offsets": np.array([0, 2, 2, 5]),
            "keypoints": np.arange(10, dtype=np.float32).reshape(5, 2)}
    table = initial_table(meta, np.array([0, 2]))
    out = table.lookup(np.array([0, 1, 2]), 4)
    assert out["valid"].sum(1).tolist() == [2, 0, 3]
    assert (out["labels"] == -1).all()  # warm-up: no clusters yet


def _planted_extraction(n_images=80, K=4, d=16, seed=0, flip_map=(1, 0, 2, 3)):
    """Each image shows K landmarks whose descriptors are noisy copies of K prototypes;
    its mirror image shows landmark k with the descriptor of flip_map[k]."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(K, d)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    ids = np.repeat(np.arange(n_images), K)
    which = np.tile(np.arange(K), n_images)
    noise = lambda: 0.05 * rng.normal(size=(len(ids), d)).astype(np.float32)  # noqa: E731
    desc = protos[which] + noise()
    fdesc = protos[np.asarray(flip_map)[which]] + noise()
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    points = np.stack([which * 10.0, which * 5.0 + 1], 1).astype(np.float32)
    return Extraction(ids, points, np.ones(len(ids), np.float32), norm(desc), norm(fdesc),
                      np.arange(n_images)), which


def _recover(kind, ext, cfg):
    labels = recover(kind, PointSet.from_parts([ext.as_dict()]), cfg.cluster)
    return LabelTable.from_round(labels), labels


def test_recover_correspondence_gives_consistent_labels_per_landmark():
    ext, which = _planted_extraction()
    cfg = apply_values(Config(), {"cluster": {"K": 4, "M": 8}})
    table, labels = _recover("round", ext, cfg)
    assert labels.centroids.shape == (8, 16)
    assert labels.stats["images_kept_share"] == 1.0
    out = table.lookup(np.arange(80), 4)
    labels = out["labels"].numpy()
    assert (labels >= 0).all()
    # ≤1 point per M-cluster per image, and every M-cluster holds a single landmark
    assert all(len(set(row)) == len(row) for row in labels)
    pts = out["points"].numpy()
    landmark = (pts[..., 0] / 10).round().astype(int)
    for m in np.unique(labels):
        assert len(np.unique(landmark[labels == m])) == 1


def test_final_landmarks_find_the_flip_permutation():
    ext, which = _planted_extraction(flip_map=(1, 0, 2, 3))
    cfg = apply_values(Config(), {"cluster": {"K": 4}})
    table, labels = _recover("final", ext, cfg)
    perm = labels.flip_permutation
    assert sorted(perm.tolist()) == [0, 1, 2, 3]  # a permutation, always
    # map cluster → landmark through the points, then check the permutation swaps 0 and 1
    out = table.lookup(np.arange(80), 4)
    cluster_to_landmark = {}
    for lab, p in zip(out["labels"].numpy().ravel(), out["points"].numpy().reshape(-1, 2)):
        cluster_to_landmark[int(lab)] = int(round(p[0] / 10))
    landmark_perm = {cluster_to_landmark[c]: cluster_to_landmark[int(perm[c])] for c in range(4)}
    assert landmark_perm == {0: 1, 1: 0, 2: 2, 3: 3}
    assert np.array_equal(out["flipped_labels"].numpy(), perm[out["labels"].numpy()])


def test_learning_rate_rule_for_world_size():
    assert lr_for_world(1e-3, "none", 4) == 1e-3
    assert lr_for_world(1e-3, "linear", 4) == pytest.approx(4e-3)
    assert lr_for_world(1e-3, "sqrt", 4) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="dist.lr_scaling"):
        lr_for_world(1e-3, "cubic", 4)


def test_landmark_targets_move_mirrored_points_to_the_mirror_channel():
    table = LabelTable.from_points(np.array([0, 0]), np.array([[10.0, 20.0], [30.0, 5.0]], np.float32),
                                   labels=np.array([0, 2]), flipped_labels=np.array([1, 2]), all_ids=np.array([0]))
    size = 64
    mirror = torch.tensor([[[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]])
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    for matrix, flip, channel, x in [(identity, False, 0, 10.0), (mirror, True, 1, size - 1 - 10.0)]:
        batch = {"view0": torch.zeros(1, 3, size, size), "matrix0": matrix, "flip0": torch.tensor([flip]),
                 "id": torch.tensor([0])}
        targets, valid = landmark_targets(batch, table, 3)
        assert valid[0].tolist() == [channel == 0, channel == 1, True]
        assert targets[0, channel].tolist() == [x, 20.0]


class _Evil:  # an arbitrary object: loading it would need unpickling
    pass


def test_checkpoint_round_trip_and_refuses_pickles(tmp_path):
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "step": 7, "config": dataclasses.asdict(Config())}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 7 and all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert apply_values(Config(), back["config"]) == Config()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]  # no temp file left

    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_bf16_autocasts_the_network_and_keeps_the_losses_in_fp32():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fixtures import fixed_pairs

    from k2l_dist.config import LossConfig, ModelConfig
    from k2l_dist.models import KeypointNet
    from k2l_dist.training.steps import autocast, stage1_losses

    torch.manual_seed(0)
    phi = KeypointNet(ModelConfig(width=16, depth=2, descriptor_dim=16))
    batch, table = fixed_pairs(2, 32, 12, torch.device("cpu"))
    out = {}
    for precision in ("fp32", "bf16"):
        with autocast(torch.device("cpu"), precision):
            heat, _ = phi(batch["view0"])
            losses = stage1_losses(phi, batch, table, max_points=8, loss_cfg=LossConfig(),
                                   generator=torch.Generator().manual_seed(0))
        assert heat.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert all(v.dtype == torch.float32 for v in losses.values() if v.is_floating_point())
        out[precision] = losses
    for term in ("detector", "contrastive"):
        torch.testing.assert_close(out["bf16"][term], out["fp32"][term], rtol=0.05, atol=1e-3)


def test_learning_rate_steps_down_at_the_milestones_per_parameter_group():
    from k2l_dist.training.schedule import LRSchedule

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.RMSprop([{"params": net[0].parameters()}, {"params": net[1].parameters()}], lr=1.0)
    sched = LRSchedule((1e-4, 1e-3), milestones=(5, 8), gamma=0.1)  # backbone at a tenth of the head
    seen = {}
    for step in (0, 4, 5, 7, 8, 100):
        sched.apply(opt, step)
        seen[step] = [g["lr"] for g in opt.param_groups]
    assert seen[0] == seen[4] == [1e-4, 1e-3]
    assert seen[5] == pytest.approx([1e-5, 1e-4]) and seen[7] == seen[5]
    assert seen[8] == pytest.approx([1e-6, 1e-5]) and seen[100] == seen[8]
    with pytest.raises(ValueError, match="2 parameter groups for 1 base rates"):
        LRSchedule((1e-3,)).apply(opt, 0)


@pytest.mark.parametrize("sit_out", [True, False])
def test_an_image_without_pseudo_labels_sits_out_of_the_detector_loss_unless_switched_off(sit_out):
    """Image 1 has no pseudo-label: sitting out, the pair's detector loss is image 0's alone;
    switched off, image 1's heatmap is pulled towards zero as well."""
    from k2l_dist.config import LossConfig, ModelConfig
    from k2l_dist.loss import detector_loss
    from k2l_dist.models import STRIDE, KeypointNet
    from k2l_dist.models.points import to_feature_coords
    from k2l_dist.training.steps import stage1_losses

    torch.manual_seed(0)
    phi = KeypointNet(ModelConfig(width=16, depth=2, descriptor_dim=16))
    size = 32
    points = np.array([[8.0, 8.0], [20.0, 12.0], [12.0, 24.0]], np.float32)
    table = LabelTable.from_points(np.zeros(3, np.int64), points, labels=np.array([0, 1, 2]), all_ids=np.array([0, 1]))
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3).contiguous()
    batch = {"view0": torch.rand(2, 3, size, size), "view1": torch.rand(2, 3, size, size), "matrix0": eye,
             "matrix1": eye, "flip0": torch.zeros(2, dtype=torch.bool), "flip1": torch.zeros(2, dtype=torch.bool),
             "id": torch.tensor([0, 1])}
    with torch.no_grad():
        losses = stage1_losses(phi, batch, table, max_points=4, loss_cfg=LossConfig(sit_out_unlabelled=sit_out),
                               generator=torch.Generator().manual_seed(0))
        heat, _ = phi(torch.cat([batch["view0"], batch["view1"]]))
    fpts = to_feature_coords(torch.from_numpy(points)[None], STRIDE)
    per_view = []
    for v in (0, 1):
        h = heat[2 * v: 2 * v + 2]
        own = detector_loss(h[:1], fpts, torch.ones(1, 3, dtype=torch.bool), 1.0)
        silent = h[1].square().mean()  # image 1's target is an empty map
        per_view.append(own if sit_out else (own + silent) / 2)
    torch.testing.assert_close(losses["detector"], (per_view[0] + per_view[1]) / 2)
    assert float(losses["images_sitting_out"]) == (0.5 if sit_out else 0.0)


def test_compile_switch_gives_the_plain_networks_losses_and_gradients():
    """`compile=eager` (dynamo tracing, eager kernels): a Stage-1 step through the compiled
    Φ gives the plain step's losses and gradients; "" leaves the module as it is."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fixtures import fixed_pairs

    from k2l_dist.config import LossConfig, ModelConfig
    from k2l_dist.models import KeypointNet
    from k2l_dist.training.phases import compiled
    from k2l_dist.training.steps import stage1_losses

    torch.manual_seed(0)
    phi = KeypointNet(ModelConfig(width=16, depth=2, descriptor_dim=8, groups=4))
    assert compiled(phi, "") is phi
    assert isinstance(compiled(phi, "eager"), torch._dynamo.eval_frame.OptimizedModule)
    batch, table = fixed_pairs(2, 32, 6, torch.device("cpu"), per_image=4)
    torch._dynamo.reset()
    out = {}
    for backend in ("", "eager"):
        phi.zero_grad(set_to_none=True)
        losses = stage1_losses(compiled(phi, backend), batch, table, max_points=8, loss_cfg=LossConfig(),
                               generator=torch.Generator().manual_seed(1))
        losses["loss"].backward()
        out[backend] = (float(losses["loss"]), [p.grad.clone() for p in phi.parameters()])
    assert out["eager"][0] == pytest.approx(out[""][0], rel=1e-6)
    for a, b in zip(out["eager"][1], out[""][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_channels_last_gives_the_contiguous_steps_losses_and_gradients():
    """`memory_format=channels_last`: Φ's weights and activations in NHWC, and a Stage-1 step
    gives the losses and gradients of the contiguous (NCHW) network with the same weights."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fixtures import fixed_pairs

    from k2l_dist.config import LossConfig, ModelConfig
    from k2l_dist.distributed import DistInfo
    from k2l_dist.training.state import RunState
    from k2l_dist.training.steps import stage1_losses

    cfg = Config(model=ModelConfig(width=16, depth=2, descriptor_dim=8, groups=4), memory_format="channels_last")
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), 1)
    nhwc, _ = RunState._phi(cfg, info)
    nchw, _ = RunState._phi(dataclasses.replace(cfg, memory_format="contiguous"), info)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous() for w in convs if w.shape[-1] > 1)  # 1×1 kernels read the same either way
    batch, table = fixed_pairs(2, 32, 6, torch.device("cpu"), per_image=4)
    heat, dmap = nhwc(batch["view0"])
    assert dmap.is_contiguous(memory_format=torch.channels_last) and not dmap.is_contiguous()
    out = {}
    for name, phi in (("nhwc", nhwc), ("nchw", nchw)):
        losses = stage1_losses(phi, batch, table, max_points=8, loss_cfg=LossConfig(),
                               generator=torch.Generator().manual_seed(1))
        losses["loss"].backward()
        scalars = {k: float(v.detach()) for k, v in losses.items() if v.numel() == 1}
        out[name] = (scalars, [p.grad for p in phi.parameters()])
    assert out["nhwc"][0].keys() == out["nchw"][0].keys()
    for key, value in out["nchw"][0].items():
        assert out["nhwc"][0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for a, b in zip(out["nhwc"][1], out["nchw"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_partial_round_carries_the_other_images_labels_renumbered_into_the_new_clusters():
    ext, which = _planted_extraction(n_images=80, K=4, flip_map=(1, 0, 2, 3))
    cfg = apply_values(Config(), {"cluster": {"K": 4, "M": 4}})
    previous, _ = _recover("round", ext, cfg)
    old = previous.labels[:4][np.argsort(which[:4])]  # last round's cluster of landmark k
    new = (old + 1) % 4  # this round numbers every cluster differently
    # this round: images 0-39 again, points moved by under a pixel
    half = ext.image_ids < 40
    jitter = np.random.default_rng(1).uniform(-0.4, 0.4, size=(int(half.sum()), 2)).astype(np.float32)
    fresh_ext = Extraction(ext.image_ids[half], ext.points[half] + jitter, ext.scores[half], ext.descriptors[half],
                           ext.flipped_descriptors[half], np.arange(40))
    fresh = recover("round", PointSet.from_parts([fresh_ext.as_dict()]), cfg.cluster)
    flip_map = np.array([1, 0, 2, 3])
    fresh.labels, fresh.flipped_labels = new[which[half]], new[flip_map[which[half]]]
    carried = carry_labels(previous, fresh, radius=1.5)
    table = LabelTable.from_round(carried)
    assert carried.stats["extracted_share"] == 0.5 and carried.stats["carried_votes_agree_share"] == 1.0
    assert np.array_equal(table.ids, np.arange(80))
    out = table.lookup(np.arange(80), 4)
    landmark = (out["points"].numpy()[..., 0] / 10).round().astype(int)
    assert np.array_equal(out["labels"].numpy(), new[landmark])  # one numbering over all 80 images
    assert np.array_equal(out["flipped_labels"].numpy(), new[flip_map[landmark]])
    # the kept images' points and order are last round's
    assert np.array_equal(out["points"].numpy()[40:], previous.lookup(np.arange(40, 80), 4)["points"].numpy())


def test_round_extract_ids_draws_a_seeded_part_except_in_the_first_and_last_rounds():
    train_ids = np.arange(1000, 1200)
    assert round_extract_ids(train_ids, 0.4, 1, 4, seed=0) is None  # nothing to carry yet
    assert round_extract_ids(train_ids, 0.4, 4, 4, seed=0) is None  # the last round sees every image
    assert round_extract_ids(train_ids, 1.0, 2, 4, seed=0) is None
    two, three = round_extract_ids(train_ids, 0.4, 2, 4, seed=0), round_extract_ids(train_ids, 0.4, 3, 4, seed=0)
    assert len(two) == 80 and np.isin(two, train_ids).all() and (np.diff(two) > 0).all()
    assert np.array_equal(two, round_extract_ids(train_ids, 0.4, 2, 4, seed=0))  # every rank, every resume
    assert not np.array_equal(two, three)
    assert not np.array_equal(two, round_extract_ids(train_ids, 0.4, 2, 4, seed=1))
