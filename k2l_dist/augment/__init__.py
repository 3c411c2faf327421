"""Keypoint-consistent augmentation: the DALI data path and its torch point geometry."""

from k2l_dist.augment.geometry import (
    compose_affine,
    inside_view,
    inverse_affine,
    relative_affine,
    select_by_flip,
    transform_points,
)
from k2l_dist.augment.pipeline import AugmentLoader, build_loader, resolve_device
from k2l_dist.augment.validate import CheckedDataset, check_dataset

__all__ = [
    "AugmentLoader",
    "CheckedDataset",
    "build_loader",
    "check_dataset",
    "compose_affine",
    "inside_view",
    "inverse_affine",
    "relative_affine",
    "resolve_device",
    "select_by_flip",
    "transform_points",
]
