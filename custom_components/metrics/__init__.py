"""Evaluation metrics: Fréchet distance (FID/FVD maths), the paper's feature metrics (slice LPIPS, 3-axis slice
FID, axial FVD) and mask–prompt tumor alignment."""

from .alignment import TumorAlignment, tumor_alignment
from .features import (
    I3DFeatures,
    InceptionFeatures,
    MetricUnavailable,
    axial_fvd,
    default_i3d_weights_path,
    default_inception_weights_path,
    feature_frechet_distance,
    load_i3d,
    load_inception,
    slice_fid,
    slice_lpips,
)
from .frechet import frechet_distance, gaussian_statistics

__all__ = [
    "TumorAlignment",
    "tumor_alignment",
    "frechet_distance",
    "gaussian_statistics",
    "MetricUnavailable",
    "default_inception_weights_path",
    "default_i3d_weights_path",
    "InceptionFeatures",
    "load_inception",
    "I3DFeatures",
    "load_i3d",
    "feature_frechet_distance",
    "slice_lpips",
    "slice_fid",
    "axial_fvd",
]
