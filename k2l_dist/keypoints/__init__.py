"""Initial generic keypoints for Stage 1 (paper Sec. 3.1, 4.2, 5.1).

ORB or SIFT thinned by adaptive non-maximal suppression, or SuperPoint from a
user-supplied state dict; then a global descriptor-based outlier removal. SuperPoint
(and so torch) is imported only when asked for, keeping ORB/SIFT workers light.
"""

from k2l_dist.keypoints.anms import anms, suppression_radii
from k2l_dist.keypoints.generic import KeypointDetector, descriptors_to_float, to_gray_uint8
from k2l_dist.keypoints.outliers import outlier_keep_masks, outlier_scores

__all__ = [
    "KeypointDetector",
    "anms",
    "descriptors_to_float",
    "outlier_keep_masks",
    "outlier_scores",
    "suppression_radii",
    "to_gray_uint8",
]
