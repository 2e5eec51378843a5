"""Evaluation metrics: Fréchet distance (FID/FVD maths) and mask–prompt tumor alignment."""

from .alignment import TumorAlignment, tumor_alignment
from .frechet import frechet_distance, gaussian_statistics

__all__ = ["TumorAlignment", "tumor_alignment", "frechet_distance", "gaussian_statistics"]
