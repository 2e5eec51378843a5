"""Pipelines chain the stages' networks and schedulers in memory and return arrays and output objects.

Nothing here writes a file: the runs that write (``custom_components.runs``) call these pipelines, as diffusers'
pipelines are called by the scripts that save their images.
"""

from .autoencoder import AutoencoderPipeline, load_autoencoder, reconstruction_metrics
from .mask_to_ct import MaskToCTPipeline, check_autoencoder_matches, ct_affine_for_mask
from .ldm import LatentDiffusionSampler
from .tcss import TCSSPipeline
from .text_to_pair import ChainSources, GeneratedPair, TextToPairPipeline, load_text_to_pair, resolve_device

__all__ = [
    "AutoencoderPipeline",
    "load_autoencoder",
    "LatentDiffusionSampler",
    "reconstruction_metrics",
    "MaskToCTPipeline",
    "check_autoencoder_matches",
    "ct_affine_for_mask",
    "TCSSPipeline",
    "ChainSources",
    "GeneratedPair",
    "TextToPairPipeline",
    "load_text_to_pair",
    "resolve_device",
]
