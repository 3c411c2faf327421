"""Keypoint-consistent augmentation: the DALI data path (its point maths: :mod:`k2l_dist.utils.geometry`)."""

from k2l_dist.augment.pipeline import AugmentLoader, build_loader
from k2l_dist.augment.validate import CheckedDataset, check_dataset

__all__ = ["AugmentLoader", "CheckedDataset", "build_loader", "check_dataset"]
