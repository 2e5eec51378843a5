"""Pipelines chain the stages' networks and schedulers; file writing stays at the edges."""

from .autoencoder import AutoencoderPipeline, decode_file, encode_file, reconstruct_cases, reconstruction_metrics
from .tcss import TCSSPipeline, save_masks

__all__ = [
    "AutoencoderPipeline",
    "decode_file",
    "encode_file",
    "reconstruct_cases",
    "reconstruction_metrics",
    "TCSSPipeline",
    "save_masks",
]
