"""The padded part of a crop (outside its image) is left out of detections, negatives and losses."""

import numpy as np
import torch

from k2l_dist.config import KeypointConfig
from k2l_dist.data.crop import to_crop, valid_rects
from k2l_dist.keypoints.generic import KeypointDetector
from k2l_dist.loss import gaussian_heatmaps
from k2l_dist.models.extract import extract
from k2l_dist.models.regions import CropRegions, pixel_mask, points_inside


def test_valid_rect_is_where_the_image_corners_land_in_the_crop():
    box, wh = (-20.0, -25.0, 100.0), (100, 50)  # reaches past the left, top and bottom
    rect = valid_rects(np.array([box]), np.array([wh]), 100)[0]
    corners = to_crop(np.array([[-0.5, -0.5], [99.5, 49.5]]), box, 100)
    np.testing.assert_allclose(rect, [corners[0, 0], corners[0, 1], 99.5, corners[1, 1]])
    inside = valid_rects(np.array([[10.0, 5.0, 30.0]]), np.array([wh]), 60)[0]
    np.testing.assert_allclose(inside, [-0.5, -0.5, 59.5, 59.5])  # a box inside its image: all of it


def test_keypoints_are_only_taken_inside_the_region_and_fill_the_budget_there():
    rng = np.random.default_rng(0)
    crop = (rng.random((90, 90, 3)) * 255).astype(np.uint8)
    box = (-30.0, 0.0, 90.0)  # the left third of the crop would be padding
    rect = valid_rects(np.array([box]), np.array([(60, 90)]), 90)[0]
    det = KeypointDetector(KeypointConfig(method="orb", count=40))
    everywhere, _ = det(crop)
    inside, desc = det(crop, rect)
    assert (everywhere[:, 0] < rect[0]).any()
    assert inside[:, 0].min() >= rect[0] + 2 and len(desc) == len(inside)
    assert len(inside) == 40  # the budget is spent inside, not lost to the padding


def test_pixel_mask_and_points_follow_the_view_matrix():
    rects = torch.tensor([[15.5, -0.5, 31.5, 31.5]])  # the left half of a 32-px crop is padding
    eye = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    mask = pixel_mask(rects, eye, (8, 8), 4)
    assert mask[0, 0, :, :4].sum() == 0 and mask[0, 0, :, 4:].all()
    flipped = torch.tensor([[[-1.0, 0.0, 31.0], [0.0, 1.0, 0.0]]])  # a mirrored view: padding on the right
    mask = pixel_mask(rects, flipped, (8, 8), 4)
    assert mask[0, 0, :, 4:].sum() == 0 and mask[0, 0, :, :4].all()
    pts = torch.tensor([[[10.0, 5.0], [25.0, 5.0]]])
    assert points_inside(pts, rects, eye).tolist() == [[False, True]]


def test_extraction_drops_peaks_on_the_padding():
    peaks = torch.tensor([[[2.0, 3.0], [12.0, 9.0]]])  # heatmap pixels: one on the padding, one inside
    heat = gaussian_heatmaps(peaks, torch.ones(1, 2, dtype=torch.bool), (16, 16), 1.0).amax(1, keepdim=True)

    class Planted(torch.nn.Module):
        def forward(self, images):
            return heat.expand(len(images), -1, -1, -1), torch.ones(len(images), 4, 16, 16)

    meta = {"ids": np.array([7]), "boxes": np.array([[-16.0, 0.0, 64.0]]), "orig_sizes": np.array([[48, 64]])}
    regions = CropRegions.from_meta(meta, 64)  # the crop's left quarter (x < 15.5) is padding
    batch = {"view0": torch.zeros(1, 3, 64, 64), "matrix0": torch.eye(3)[:2][None], "id": torch.tensor([7])}
    everywhere = extract(Planted(), [batch], max_points=5, threshold=0.2, flip=False, show_progress=False)
    kept = extract(Planted(), [batch], max_points=5, threshold=0.2, flip=False, show_progress=False, regions=regions)
    assert len(everywhere.points) == 2 and len(kept.points) == 1 and kept.points[0, 0] > 40
