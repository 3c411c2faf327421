import numpy as np
import pytest

from k2l_dist.data.crop import (
    box_around_points,
    box_around_rect,
    crop_image,
    to_crop,
    to_original,
    whole_image_box,
)


def _blob(width, height, x, y, sigma=2.5):
    yy, xx = np.mgrid[:height, :width]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(image):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    w = image / image.sum()
    return np.array([(w * xx).sum(), (w * yy).sum()])


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("kind", ["points", "whole", "rect"])
def test_crop_moves_image_content_where_to_crop_says(kind, size):
    rng = np.random.default_rng(size)
    width, height = 300, 240
    p = np.array([[rng.uniform(110, 190), rng.uniform(90, 150)]])
    box = {
        "points": box_around_points(np.array([[100.0, 80.0], [180.0, 160.0]]), 2.2),
        "whole": whole_image_box(width, height),
        "rect": box_around_rect(95.0, 70.0, 80.0, 90.0, 1.3),
    }[kind]
    out = crop_image(_blob(width, height, *p[0]), box, size)
    assert out.shape == (size, size)
    # the blob's centroid lands at the mapped point (the blob is far from the borders)
    np.testing.assert_allclose(_centroid(out), to_crop(p, box, size)[0], atol=0.15)


def test_round_trip_to_original_is_exact():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-10, 400, (50, 2))
    box = (12.25, -30.5, 311.0)
    back = to_original(to_crop(pts, box, 128), box, 128)
    np.testing.assert_allclose(back, pts, atol=1e-9)


def test_box_around_points_is_centred_square_with_scale():
    pts = np.array([[10.0, 20.0], [50.0, 30.0], [30.0, 60.0], [np.nan, np.nan]])
    x0, y0, side = box_around_points(pts, 2.0)
    assert side == pytest.approx(80.0)  # 2 × longer side (40)
    # centre of the landmark box (30, 40) in centre coords is the crop centre
    centre = to_crop(np.array([[30.0, 40.0]]), (x0, y0, side), 100)[0]
    np.testing.assert_allclose(centre, [49.5, 49.5])


def test_whole_image_box_keeps_everything_inside():
    box = whole_image_box(200, 100)
    corners = np.array([[-0.5, -0.5], [199.5, 99.5]])
    mapped = to_crop(corners, box, 64)
    assert (mapped >= -0.5 - 1e-9).all() and (mapped <= 63.5 + 1e-9).all()
