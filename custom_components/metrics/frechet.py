"""Fréchet distance between two Gaussians fitted to feature sets: the maths behind FID and FVD.

The feature networks (Inception for FID, I3D for FVD) are separate; this module only compares features.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from custom_components.errors import GuideGenInputError

__all__ = ["gaussian_statistics", "frechet_distance"]


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (num_samples, dim) features.

    Raises:
        GuideGenInputError: fewer than two samples or not a 2D array.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise GuideGenInputError(f"features must be (num_samples >= 2, dim), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}) (Heusel et al. 2017).

    Args:
        mu1, sigma1: mean (D,) and covariance (D, D) of the first set.
        mu2, sigma2: the same for the second set.
        eps: added to the diagonals when the product is singular (few samples), as the reference FID code does.

    Returns:
        the squared Fréchet distance (>= 0 up to rounding).

    Raises:
        GuideGenInputError: shapes that do not match.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise GuideGenInputError(
            f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # rounding leaves tiny imaginary parts
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
