"""Networks of GuideGen: the text encoder, the knowledge-injection module (paper Fig. 1d), the cross-attention 3D
U-Net they condition, the autoencoder and latent denoiser, and the one reader of their model files."""

from .autoencoder import MaskGuidedAutoencoder, VoxelNorm
from .checkpoints import (
    MODEL_INFO_KEY,
    STAGE_NETWORKS,
    STAGES,
    CheckpointInfo,
    load_model_weights,
    load_network,
    model_file_digest,
    model_state_dict,
    network_from_info,
    read_checkpoint_info,
    read_intact_model_file,
    read_model_file,
    split_model_file,
)
from .factory import build_text_conditioned_unet
from .i3d import InceptionI3d
from .knowledge_injection import KnowledgeInjection
from .latent_denoiser import LatentDenoiser, MaskEncoder, build_latent_denoiser
from .text_encoder import TextEncoder, default_text_encoder_path
from .streaming import stream_decode, stream_encode
from .tiling import tiled_decode, tiled_encode
from .unet import CrossAttentionUNet3D, TextConditionedUNet

__all__ = [
    "STAGES",
    "STAGE_NETWORKS",
    "MODEL_INFO_KEY",
    "CheckpointInfo",
    "load_model_weights",
    "load_network",
    "model_file_digest",
    "model_state_dict",
    "network_from_info",
    "read_checkpoint_info",
    "read_intact_model_file",
    "read_model_file",
    "split_model_file",
    "build_text_conditioned_unet",
    "build_latent_denoiser",
    "LatentDenoiser",
    "MaskEncoder",
    "KnowledgeInjection",
    "TextEncoder",
    "default_text_encoder_path",
    "CrossAttentionUNet3D",
    "InceptionI3d",
    "TextConditionedUNet",
    "MaskGuidedAutoencoder",
    "VoxelNorm",
    "stream_decode",
    "stream_encode",
    "tiled_decode",
    "tiled_encode",
]
