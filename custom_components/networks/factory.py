"""Building the text-conditioned denoisers of the TCSS and latent stages from plain hyper-parameters.

Bundle configs keep an ``architecture`` dict of these keyword arguments and store it in the checkpoint, so
inference rebuilds exactly the trained network from the model file alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from custom_components.networks.knowledge_injection import KnowledgeInjection
from custom_components.networks.unet import CrossAttentionUNet3D, TextConditionedUNet

__all__ = ["build_text_conditioned_unet"]


def build_text_conditioned_unet(
    in_channels: int,
    out_channels: int,
    text_dim: int,
    channels: Sequence[int] = (64, 128, 256, 512),
    num_res_blocks: int = 2,
    cross_attention_levels: Sequence[bool] = (False, True, True, True),
    self_attention_levels: Sequence[bool] = (False, False, False, True),
    num_head_channels: int = 32,
    norm_num_groups: int = 32,
    use_checkpointing: bool = False,
    num_queries: int = 16,
    injection_dim: int = 256,
    injection_layers: int = 2,
    injection_heads: int = 8,
    dropout: float = 0.0,
    inference_slab_rows: int | None = 4,
) -> TextConditionedUNet:
    """A :class:`CrossAttentionUNet3D` whose per-level contexts come from :class:`KnowledgeInjection`
    (paper Eq. 3-4 feeding the denoiser of Eq. 5-6 for TCSS, or Eq. 10-11 for the latent generator).

    Args:
        in_channels: N classes (TCSS) or latent + mask channels (latent generator).
        out_channels: N logits (TCSS) or latent channels (noise prediction).
        text_dim: hidden size of the text encoder's token features.
        channels: U-Net width per level.
        num_res_blocks: residual blocks per level.
        cross_attention_levels: levels whose blocks cross-attend to the text context.
        self_attention_levels: levels with per-voxel self-attention (keep to low resolutions).
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every width).
        use_checkpointing: gradient checkpointing to trade compute for memory in training.
        num_queries: learnable queries of the knowledge-injection decoder.
        injection_dim: width of the knowledge-injection decoder.
        injection_layers: its transformer-decoder blocks.
        injection_heads: its attention heads.
        dropout: dropout in the U-Net's residual blocks and the decoder.
        inference_slab_rows: rows per slab of the U-Net's memory-lean inference (None: plain forward); not part of
            the architecture (any value gives the same result), see :class:`CrossAttentionUNet3D`.

    Returns:
        the composed network ``network(x, t, text_features, text_mask)``.
    """
    unet = CrossAttentionUNet3D(
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        num_res_blocks=num_res_blocks,
        cross_attention_levels=cross_attention_levels,
        self_attention_levels=self_attention_levels,
        num_head_channels=num_head_channels,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
        use_checkpointing=use_checkpointing,
        inference_slab_rows=inference_slab_rows,
    )
    injector = KnowledgeInjection(
        text_dim=text_dim,
        context_dims=unet.context_dims,
        num_queries=num_queries,
        hidden_dim=injection_dim,
        num_layers=injection_layers,
        num_heads=injection_heads,
        dropout=dropout,
    )
    return TextConditionedUNet(unet, injector)
