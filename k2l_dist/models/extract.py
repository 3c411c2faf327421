"""Correspondence recovery, part 1 (paper Sec. 3.3): run a frozen Φ over a set of samples.

For every image: NMS on the detector map, descriptors sampled at the detected points,
and — for the flip correspondence of Sec. 3.7 — descriptors of the horizontally
mirrored image sampled at the mirrored points. Output is flat per-point numpy arrays,
the plain interface to clustering (which may run in another process).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from k2l_dist.config import heatmap_radius
from k2l_dist.models import STRIDE
from k2l_dist.models.points import nms_peaks, sample_descriptors, to_image_coords
from k2l_dist.models.regions import pixel_mask, points_inside
from k2l_dist.utils.geometry import inverse_affine, transform_points


@dataclass
class Extraction:
    image_ids: np.ndarray  # (n,) int64
    points: np.ndarray  # (n, 2) float32, crop pixels
    scores: np.ndarray  # (n,) float32 detector confidence
    descriptors: np.ndarray  # (n, d) float32, unit norm
    flipped_descriptors: np.ndarray | None  # (n, d) descriptors of the mirrored image at the mirrored point
    sample_ids: np.ndarray  # (N,) int64 every image processed, with or without points
    capped: int = 0  # images whose peaks above the threshold filled every slot (more may exist)

    @property
    def num_images(self) -> int:
        return len(self.sample_ids)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The plain arrays clustering takes (see :func:`k2l_dist.clustering.rounds.merge_parts`)."""
        out = {"image_ids": self.image_ids, "points": self.points, "scores": self.scores,
               "descriptors": self.descriptors, "sample_ids": self.sample_ids}
        if self.flipped_descriptors is not None:
            out["flipped_descriptors"] = self.flipped_descriptors
        return out


@torch.inference_mode()
def extract(model: torch.nn.Module, batches: Iterable[dict], *, max_points: int, threshold: float,
            nms_radius: float = 2.0, flip: bool = True, subpixel: bool = True, total: int | None = None,
            show_progress: bool = True, regions=None) -> Extraction:
    """Detect points and descriptors on un-augmented views (``view0``, ``matrix0``, ``id``).

    ``nms_radius``: in pixels of a 64² heatmap, scaled to the heatmap at hand (at least 1
    pixel). ``regions`` (:class:`~k2l_dist.models.regions.CropRegions`): detections on a
    crop's padding (repeated border pixels) are dropped."""
    was_training = model.training
    model.eval()
    ids, pts, scores, descs, fdescs, seen = [], [], [], [], [], []
    capped = 0
    for batch in tqdm(batches, total=total, desc="extract", unit="batch", disable=not show_progress, leave=False):
        images = batch["view0"]
        b = images.shape[0]
        if flip:  # the mirror pass shares the forward: one batch of 2B images
            heat, both = model(torch.cat([images, torch.flip(images, dims=[-1])]))
            heat, dmap, fdmap = heat[:b].float(), both[:b], both[b:]
        else:
            heat, dmap = model(images)
            heat = heat.float()
        if regions is not None:  # peaks on the padding never compete for the cap
            rects = regions.lookup(batch["id"], heat.device)
            matrix = batch["matrix0"].to(heat.device)
            heat = heat * pixel_mask(rects, matrix, tuple(heat.shape[-2:]), STRIDE)
        radius = max(1, round(heatmap_radius(nms_radius, heat.shape[-1])))
        peaks, score, valid = nms_peaks(heat, max_points, threshold, radius=radius, subpixel=subpixel)
        capped += int(valid.all(dim=1).sum())
        view_pts = to_image_coords(peaks, STRIDE)
        if regions is not None:
            valid = valid & points_inside(view_pts, rects, matrix)
        desc = sample_descriptors(dmap.float(), view_pts, STRIDE)
        crop_pts = transform_points(view_pts, inverse_affine(batch["matrix0"]).to(view_pts.device))
        p = valid.shape[1]
        sample_ids = batch["id"].reshape(-1).to(valid.device)[:, None].expand(b, p)
        if flip:
            # The image mirrored exactly (pixel x ↔ S-1-x), sampled at the mirrored points.
            mirrored = view_pts.clone()
            mirrored[..., 0] = images.shape[-1] - 1 - mirrored[..., 0]
            fdescs.append(sample_descriptors(fdmap.float(), mirrored, STRIDE)[valid].cpu())
        ids.append(sample_ids[valid].cpu())
        pts.append(crop_pts[valid].cpu())
        scores.append(score[valid].cpu())
        descs.append(desc[valid].cpu())
        seen.append(batch["id"].reshape(-1).cpu())
    model.train(was_training)
    cat = lambda xs, shape: torch.cat(xs).numpy() if xs else np.zeros(shape, np.float32)  # noqa: E731
    d = descs[0].shape[-1] if descs else 0
    return Extraction(
        image_ids=cat(ids, (0,)).astype(np.int64),
        points=cat(pts, (0, 2)).astype(np.float32),
        scores=cat(scores, (0,)).astype(np.float32),
        descriptors=cat(descs, (0, d)).astype(np.float32),
        flipped_descriptors=cat(fdescs, (0, d)).astype(np.float32) if flip else None,
        sample_ids=cat(seen, (0,)).astype(np.int64),
        capped=capped,
    )


def extraction_cap(cfg) -> int:
    """Peaks per image handed to clustering at most: ``stage1.extract_points``, or 3 × K."""
    return cfg.stage1.extract_points or 3 * cfg.cluster.K
