"""Where each training crop shows its image, as the losses and the extraction see it.

A crop box that reaches past its image is padded with repeated border pixels (long
stripes on bodies). Those pixels are not the object: no detection is kept there, no
random negative is drawn there, and the detector and landmark losses ignore them, so Φ
is neither trained to fire on the stripes nor to stay silent on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from k2l_dist.data.crop import PADDING_MARGIN, inside_rects, valid_rects
from k2l_dist.models.points import to_image_coords
from k2l_dist.utils.geometry import inverse_affine, transform_points


@dataclass(frozen=True)
class CropRegions:
    ids: np.ndarray  # (N,) int64 sorted sample ids
    rects: torch.Tensor  # (N, 4) float32 x0, y0, x1, y1 in crop pixels

    @classmethod
    def from_meta(cls, meta: dict[str, np.ndarray], size: int) -> CropRegions:
        """From a shard folder's ``samples.npz`` (crop boxes and original image sizes)."""
        order = np.argsort(meta["ids"])
        rects = valid_rects(meta["boxes"][order], meta["orig_sizes"][order], size)
        return cls(np.asarray(meta["ids"])[order].astype(np.int64), torch.from_numpy(rects))

    def lookup(self, batch_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``(B, 4)`` rectangles of a batch (an unknown id gets the whole plane)."""
        ids = batch_ids.reshape(-1).cpu().numpy().astype(np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        out = self.rects[torch.from_numpy(pos)].clone()
        out[torch.from_numpy(self.ids[pos] != ids)] = torch.tensor([-1e9, -1e9, 1e9, 1e9])
        return out.to(device)


def points_inside(view_points: torch.Tensor, rects: torch.Tensor, matrices: torch.Tensor,
                  margin: float = PADDING_MARGIN) -> torch.Tensor:
    """``(B, P)`` bool: view-pixel points whose crop position lies ``margin`` inside ``rects``."""
    crop = transform_points(view_points.float(), inverse_affine(matrices).to(view_points.device).float())
    return inside_rects(crop, rects, margin)


def pixel_mask(rects: torch.Tensor, matrices: torch.Tensor, hw: tuple[int, int], stride: int) -> torch.Tensor:
    """``(B, 1, h, w)`` bool: heatmap pixels whose centre shows the image (no margin)."""
    h, w = hw
    ys, xs = torch.meshgrid(torch.arange(h, device=rects.device, dtype=torch.float32),
                            torch.arange(w, device=rects.device, dtype=torch.float32), indexing="ij")
    grid = to_image_coords(torch.stack([xs, ys], -1).reshape(1, -1, 2), stride).expand(len(rects), -1, -1)
    return points_inside(grid, rects, matrices, margin=0.0).reshape(len(rects), 1, h, w)
