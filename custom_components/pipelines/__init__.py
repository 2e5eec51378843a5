"""Pipelines chain the stages' networks and schedulers; file writing stays at the edges."""

from .autoencoder import AutoencoderPipeline, load_autoencoder, decode_file, encode_file, reconstruct_cases, reconstruction_metrics
from .mask_to_ct import MaskToCTPipeline, check_autoencoder_matches, ct_affine_for_mask, generate_cts
from .ldm import LatentDiffusionSampler
from .tcss import TCSSPipeline, save_masks
from .text_to_pair import GeneratedPair, TextToPairPipeline, load_text_to_pair, resolve_device

__all__ = [
    "AutoencoderPipeline",
    "load_autoencoder",
    "decode_file",
    "encode_file",
    "LatentDiffusionSampler",
    "reconstruct_cases",
    "reconstruction_metrics",
    "MaskToCTPipeline",
    "check_autoencoder_matches",
    "ct_affine_for_mask",
    "generate_cts",
    "TCSSPipeline",
    "save_masks",
    "GeneratedPair",
    "TextToPairPipeline",
    "load_text_to_pair",
    "resolve_device",
]
