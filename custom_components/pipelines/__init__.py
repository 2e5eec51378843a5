"""Pipelines chain the stages' networks and schedulers; file writing stays at the edges."""

from .tcss import TCSSPipeline, save_masks

__all__ = ["TCSSPipeline", "save_masks"]
