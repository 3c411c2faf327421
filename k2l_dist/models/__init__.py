"""Networks Φ / Ψ and the point operations that connect heatmaps, descriptors and images."""

from k2l_dist.models.hourglass import STRIDE, Backbone, ConvBlock, Hourglass, KeypointNet, LandmarkNet, count_parameters
from k2l_dist.models.points import (
    heatmap_peaks,
    nms_peaks,
    sample_descriptors,
    sample_negative_locations,
    to_feature_coords,
    to_image_coords,
)

__all__ = [
    "STRIDE",
    "Backbone",
    "ConvBlock",
    "Hourglass",
    "KeypointNet",
    "LandmarkNet",
    "count_parameters",
    "heatmap_peaks",
    "nms_peaks",
    "sample_descriptors",
    "sample_negative_locations",
    "to_feature_coords",
    "to_image_coords",
]
