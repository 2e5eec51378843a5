"""Pipelines chain the stages' networks and schedulers; file writing stays at the edges."""

from .tcss import TCSSPipeline, centred_affine, save_masks

__all__ = ["TCSSPipeline", "centred_affine", "save_masks"]
