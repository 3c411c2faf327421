"""One training step of each stage, on a batch of two augmented views.

Pseudo-labels live in a :class:`~k2l_dist.training.labels.LabelTable` in crop pixels;
here they are looked up by sample id, mapped into each view with the view's affine
matrix, and — for mirrored views — swapped for their flipped labels (paper Sec. 3.7).
"""

from __future__ import annotations

import torch

from k2l_dist.config import heatmap_radius
from k2l_dist.loss import contrastive_loss, detector_loss, landmark_loss
from k2l_dist.models import STRIDE
from k2l_dist.models.points import sample_descriptors, sample_negative_locations, to_feature_coords, to_image_coords
from k2l_dist.models.regions import CropRegions, pixel_mask, points_inside
from k2l_dist.training.labels import LabelTable
from k2l_dist.utils.geometry import inside_view, select_by_flip, transform_points


def _view_labels(batch: dict, lab: dict[str, torch.Tensor], view: int, device: torch.device):
    """Points (view pixels), presence and labels of the table's entries (``lab``, a
    :meth:`LabelTable.lookup`) in one view, and which images have any entry at all."""
    points = transform_points(lab["points"].to(device), batch[f"matrix{view}"].to(device))
    size = batch[f"view{view}"].shape[-2:]
    present = lab["valid"].to(device) & inside_view(points, tuple(size))
    labels = select_by_flip(lab["labels"], lab["flipped_labels"], batch[f"flip{view}"].cpu()).to(device)
    labelled = lab["valid"].any(dim=1).to(device)
    return points, present, torch.where(present, labels, torch.full_like(labels, -1)), labelled


def _tracked(batch: dict, lab: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The table's entries as view 1 sees them in a batch of temporal pairs: the points
    tracked into the partner frame (the sample's own where unpaired), lost tracks absent."""
    if "points1" not in batch:
        return lab
    p = lab["points"].shape[1]
    ok = batch["points1_ok"][:, :p]
    return {**lab, "points": torch.nan_to_num(batch["points1"][:, :p]), "valid": lab["valid"] & ok}


def autocast(device: torch.device, precision: str):
    """The forward passes' precision: bf16 autocast, or fp32 (a no-op context)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def stage1_losses(model: torch.nn.Module, batch: dict, table: LabelTable, *, max_points: int, loss_cfg,
                  generator: torch.Generator | None = None,
                  regions: CropRegions | None = None) -> dict[str, torch.Tensor]:
    """Detector MSE + contrastive loss for Φ on the pair (view0, view1).

    Algorithm 1 of the paper steps (θb, θd) on L_d and (θb, θf) on L_f in turn; we take
    one step on their sum (the heads are disjoint, the backbone gets both gradients).
    ``regions``: the detector loss and the random negatives keep to the part of each crop
    that shows the image.
    """
    device = batch["view0"].device
    b = batch["view0"].shape[0]
    heat, dmap = model(torch.cat([batch["view0"], batch["view1"]]))
    size = tuple(heat.shape[-2:])
    random_apart = heatmap_radius(loss_cfg.min_neg_distance, size[-1])
    points_apart = heatmap_radius(loss_cfg.point_neg_min_distance, size[-1])
    det, descs, negs, neg_ok, labels, present = [], [], [], [], [], []
    looked_up = table.lookup(batch["id"], max_points)
    per_view = (looked_up, _tracked(batch, looked_up))  # view 1 may show a nearby frame
    rects_per_view = (None, None)
    if regions is not None:
        shown = regions.lookup(batch["id"], device)
        rects_per_view = (shown, regions.lookup(batch["partner_id"], device) if "partner_id" in batch else shown)
    for v in (0, 1):
        sl = slice(v * b, (v + 1) * b)
        rects = rects_per_view[v]
        pts, pres, lab, labelled = _view_labels(batch, per_view[v], v, device)
        in_loss = labelled if loss_cfg.sit_out_unlabelled else torch.ones_like(labelled)
        if "valid" in batch:  # padding repeats of the last batch: no points, no loss
            pres = pres & batch["valid"].to(device)[:, None]
            in_loss = in_loss & batch["valid"].to(device)
            lab = torch.where(pres, lab, torch.full_like(lab, -1))
        fpts = to_feature_coords(pts, STRIDE)
        matrix = batch[f"matrix{v}"].to(device)
        pixels = pixel_mask(rects, matrix, size, STRIDE) if rects is not None else None
        det.append(detector_loss(heat[sl], fpts, pres, loss_cfg.heatmap_sigma, images=in_loss, pixels=pixels))
        descs.append(sample_descriptors(dmap[sl].float(), pts, STRIDE))
        locs, ok = sample_negative_locations(fpts, pres, size, loss_cfg.random_negatives,
                                             random_apart, generator)
        neg_pts = to_image_coords(locs, STRIDE)
        if rects is not None:
            ok = ok & points_inside(neg_pts, rects, matrix)
        negs.append(sample_descriptors(dmap[sl].float(), neg_pts, STRIDE))
        neg_ok.append(ok)
        labels.append(lab)
        present.append(pres)
    con = contrastive_loss(descs[0], descs[1], labels[0], labels[1], negs[0], negs[1],
                           valid_a=present[0], valid_b=present[1], neg_valid_a=neg_ok[0], neg_valid_b=neg_ok[1],
                           margin=loss_cfg.margin, neg_weight=loss_cfg.neg_weight,
                           negatives=loss_cfg.negatives, correspondence=loss_cfg.correspondence,
                           points=to_feature_coords(looked_up["points"].to(device), STRIDE),
                           neg_min_distance=points_apart, balance=loss_cfg.balance, label_bins=table.label_bins)
    if loss_cfg.balance == "official":  # the paper's code: 10 × the descriptor term, the views' MSE summed
        detector, total = det[0] + det[1], 10.0 * con["loss"] + det[0] + det[1]
    else:
        detector = (det[0] + det[1]) / 2
        total = detector + con["loss"]
    out = {"loss": total, "detector": detector, "contrastive": con["loss"],
           "positive": con["positive"], "negative": con["negative"],
           "points_per_view": present[0].sum() / max(b, 1),
           "images_sitting_out": 1.0 - in_loss.float().mean()}
    if "partner_id" in batch:  # temporal pairs: how many, and how many tracked points they kept
        paired = batch["partner_id"] != batch["id"]
        rows = looked_up["valid"][paired]
        out["temporal_pairs_share"] = paired.float().mean()
        out["tracks_kept_share"] = (rows & per_view[1]["valid"][paired]).sum() / rows.sum().clamp(min=1)
    return out


def cut_out(images: torch.Tensor, share: float, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """A copy of ``images`` (B,C,H,W) where, each with probability ``prob``, a black square of
    side ``share`` × H lies wholly inside the image at a random place."""
    b, _, h, w = images.shape
    side = max(1, round(share * h))
    draw = torch.rand(b, 3, generator=generator)  # (apply?, x, y) per image, on the CPU: reproducible
    out = images.clone()
    for i in torch.nonzero(draw[:, 0] < prob).flatten().tolist():
        x0, y0 = int(draw[i, 1] * (w - side + 1)), int(draw[i, 2] * (h - side + 1))
        out[i, :, y0:y0 + side, x0:x0 + side] = 0
    return out


def landmark_targets(batch: dict, table: LabelTable, num_landmarks: int,
                     view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ψ's targets in one view: (B, K, 2) points in view pixels and (B, K) validity.

    The table's labels are landmark channels; a mirrored view takes the flipped labels
    (the K↔K flip permutation), so the point lands in its mirror landmark's channel.
    """
    device = batch[f"view{view}"].device
    pts, present, lab, _ = _view_labels(batch, table.lookup(batch["id"], num_landmarks), view, device)
    b = pts.shape[0]
    targets = torch.zeros(b, num_landmarks, 2, device=device)
    valid = torch.zeros(b, num_landmarks, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)[:, None].expand_as(lab)
    keep = lab >= 0
    targets[rows[keep], lab[keep]] = pts[keep]
    valid[rows[keep], lab[keep]] = True
    return targets, valid


def stage2_losses(model: torch.nn.Module, batch: dict, table: LabelTable, *, num_landmarks: int,
                  sigma: float, regions: CropRegions | None = None, cutout: float = 0.0, cutout_prob: float = 0.5,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Ψ's heatmap MSE on view0, masked to the channels labelled in each image (Sec. 3.6)
    and, with ``regions``, to the pixels that show the image. ``cutout``: with probability
    ``cutout_prob`` a black square of that share of the side hides part of each view (the
    official code's Stage-2 augmentation; the targets are left as they are)."""
    targets, valid = landmark_targets(batch, table, num_landmarks)
    if "valid" in batch:  # padding repeats of the last batch carry no label
        valid = valid & batch["valid"].to(valid.device)[:, None]
    images = batch["view0"]
    if cutout > 0:
        images = cut_out(images, cutout, cutout_prob, generator)
    heat = model(images)
    pixels = None
    if regions is not None:
        rects = regions.lookup(batch["id"], heat.device)
        pixels = pixel_mask(rects, batch["matrix0"].to(heat.device), tuple(heat.shape[-2:]), STRIDE)
    loss = landmark_loss(heat, to_feature_coords(targets, STRIDE), valid, sigma, pixels=pixels)
    return {"loss": loss, "landmarks_per_image": valid.sum() / max(valid.shape[0], 1)}
