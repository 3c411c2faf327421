"""Evaluation of discovered landmarks: linear regression NME, matrix completion, metrics, plots.

``plots`` is not imported here so that importing the metrics never pulls in matplotlib.
"""

from k2l_dist.eval.completion import Completion, column_means, fill_with_means, svt, svt_complete
from k2l_dist.eval.metrics import ced_auc, ced_curve, mean_shape_baseline, raw_landmark_accuracy
from k2l_dist.eval.regression import (
    EvalConfig,
    NMEResult,
    as_points,
    backward_nme,
    fit_linear,
    forward_nme,
    landmark_errors,
    landmark_norm,
    predict_linear,
)

__all__ = [
    "Completion",
    "EvalConfig",
    "NMEResult",
    "as_points",
    "backward_nme",
    "ced_auc",
    "ced_curve",
    "column_means",
    "fill_with_means",
    "fit_linear",
    "forward_nme",
    "landmark_errors",
    "landmark_norm",
    "mean_shape_baseline",
    "predict_linear",
    "raw_landmark_accuracy",
    "svt",
    "svt_complete",
]
