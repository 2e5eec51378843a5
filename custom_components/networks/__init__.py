"""Networks of GuideGen: the text encoder, the knowledge-injection module (paper Fig. 1d) and the
cross-attention 3D U-Net they condition."""

from .autoencoder import MaskGuidedAutoencoder, VoxelNorm
from .factory import build_text_conditioned_unet
from .knowledge_injection import KnowledgeInjection
from .latent_denoiser import LatentDenoiser, MaskEncoder, build_latent_denoiser
from .text_encoder import TextEncoder, default_text_encoder_path
from .streaming import stream_decode, stream_encode
from .tiling import tiled_decode, tiled_encode
from .unet import CrossAttentionUNet3D, TextConditionedUNet

__all__ = [
    "build_text_conditioned_unet",
    "build_latent_denoiser",
    "LatentDenoiser",
    "MaskEncoder",
    "KnowledgeInjection",
    "TextEncoder",
    "default_text_encoder_path",
    "CrossAttentionUNet3D",
    "TextConditionedUNet",
    "MaskGuidedAutoencoder",
    "VoxelNorm",
    "stream_decode",
    "stream_encode",
    "tiled_decode",
    "tiled_encode",
]
