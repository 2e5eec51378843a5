"""The denoising 3D U-Net shared by GuideGen's two diffusion stages.

GuideGen (AAAI-26) generates a full-torso anatomy mask from a text prompt and then a CT volume conditioned on
that mask. Both stages use the same conditional U-Net:

- **TCSS** (text-conditioned semantic synthesis, categorical diffusion over N-class masks): the network
  ``f_θ(x_t, t, c)`` of Eq. 5-6 takes the noised one-hot/probability mask ``x_t`` (N channels), the timestep
  and the text condition, and predicts the logits of ``x_0`` (N channels).
- **Latent CT generator** (Eq. 10-11): ``ε_θ(z_t ⊕ mask, t, c)`` takes the noised CT latent concatenated with
  the (down-sampled) mask and predicts the noise.

The text condition ``c`` enters through the knowledge-injection module (Eq. 3-4), which turns the encoded
prompt into a short sequence of query tokens *per U-Net level*; every level flagged for cross-attention
lets its voxels attend to those tokens.

Compared with MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` (whose building blocks are reused here)
the attention layout differs on purpose: MONAI's ``SpatialTransformer`` always runs per-voxel *self*-attention
before cross-attention, which is quadratic in the number of voxels and dominates the cost of 3D volumes. Here a
level flagged in ``cross_attention_levels`` only gets a cross-attention block (linear in voxels, ~16 context
tokens), and per-voxel self-attention runs only at the levels flagged in ``self_attention_levels`` (by default
the lowest resolution) and in the middle block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import SpatialAttentionBlock, Upsample
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    get_timestep_embedding,
    zero_module,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from custom_components.networks.layers import CheckpointedNetwork, RecomputesNorms, norm_silu
from custom_components.networks.layers import same_conv3d as _conv
from custom_components.networks.slabs import (
    LazyRows,
    conv_in_slabs,
    conv_rows,
    cross_attention_in_slabs,
    materialize,
    norm_silu_conv_in_slabs,
    resblock_in_slabs,
    upsample_conv_rows,
)

__all__ = ["CrossAttentionUNet3D", "TextConditionedUNet", "VoxelCrossAttention"]

# MONAI's diffusion U-Net uses this GroupNorm epsilon throughout; keeping it makes the two numerically comparable.
_NORM_EPS = 1e-6
_SPATIAL_DIMS = 3


class _ResBlock(RecomputesNorms, DiffusionUNetResnetBlock):
    """MONAI's timestep-conditioned residual block, with dropout and fewer temporaries.

    Same parameters (and state-dict keys) as :class:`DiffusionUNetResnetBlock`; the forward pass differs only in
    (a) dropout before the second convolution, as in the original DDPM/ADM U-Nets, and (b) in-place additions
    into convolution outputs (autograd never needs them), which saves two full-size temporaries per block --
    this matters for 128³ volumes. (SiLU stays out of place: an in-place SiLU makes autograd clone its input.)

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels.
        temb_channels: size of the time embedding.
        norm_num_groups: groups of the two GroupNorms.
        dropout: dropout probability before the second convolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, norm_num_groups: int, dropout: float = 0.0
    ) -> None:
        super().__init__(
            spatial_dims=_SPATIAL_DIMS,
            in_channels=in_channels,
            temb_channels=temb_channels,
            out_channels=out_channels,
            norm_num_groups=norm_num_groups,
            norm_eps=_NORM_EPS,
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(
        self, x: Tensor, emb: Tensor, skip: Tensor | None = None, upsample: nn.Module | None = None
    ) -> Tensor:
        """
        Args:
            x: (B, C_x, H, W, D) features (before ``upsample``, if given).
            emb: (B, temb_channels) time embedding (before SiLU, as in MONAI).
            skip: (B, C_s, H, W, D) U-Net skip features concatenated after ``x`` (``C_x + C_s = in_channels``), or
                ``None``.
            upsample: applied to ``x`` first (a decoder level's upsampling), or ``None``.

        Under gradient checkpointing the backward pass keeps only this call's inputs; upsampling and
        concatenating here rather than in the caller means those are the low-resolution ``x`` and the ``skip``
        the encoder keeps anyway, not the 8× larger upsampled map and a concatenated copy.

        Returns:
            (B, out_channels, H, W, D) features.
        """
        if upsample is not None:
            x = upsample(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = self.conv1(norm_silu(self.norm1, x, self.recompute_norms))
        # A convolution's backward needs its input and weight, not its output, so adding in place is safe.
        h += self.time_emb_proj(F.silu(emb))[(...,) + (None,) * _SPATIAL_DIMS]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h, self.recompute_norms)))
        h += self.skip_connection(x)
        return h


class VoxelCrossAttention(nn.Module):
    """Cross-attention from every voxel to a few context tokens (the knowledge-injection queries, Eq. 3-4).

    ``x + W_o · Attention(Q = W_q·GroupNorm(x), K = W_k·c, V = W_v·c)`` with the voxels as queries and the
    context tokens as keys/values. The cost is linear in the number of voxels (``O(N·T·C)`` for ``T`` tokens),
    unlike MONAI's ``SpatialTransformer`` which also runs voxel self-attention (``O(N²·C)``). The output
    projection starts at zero so that a freshly built block is the identity and the network starts as an
    unconditional U-Net. Key/value projections have no bias, hence an all-zero context gives zero values and
    the block adds only the output-projection bias: this is the "null" condition used for classifier-free
    guidance (see :meth:`TextConditionedUNet.null_contexts`).

    Args:
        channels: number of feature channels of the voxels.
        context_dim: size of each context token.
        num_head_channels: channels per attention head; ``channels`` must be divisible by it.
        norm_num_groups: groups of the GroupNorm applied to the voxels.
        dropout: attention-weight dropout probability (training only).
    """

    def __init__(
        self, channels: int, context_dim: int, num_head_channels: int, norm_num_groups: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if channels % num_head_channels != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_head_channels ({num_head_channels}).")
        self.num_heads = channels // num_head_channels
        self.dropout = dropout
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels, eps=_NORM_EPS, affine=True)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.out_proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """
        Args:
            x: (B, C, *spatial) voxel features.
            context: (B, T, context_dim) context tokens.

        Returns:
            (B, C, *spatial), ``x`` plus the attended context.
        """
        b, c = x.shape[:2]
        # (B, C, N) -> (B, N, C) is a view; the projections read it without a copy when B == 1.
        h = self.norm(x).flatten(2).transpose(1, 2)
        q = self.to_q(h).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, T, d)
        v = self.to_v(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        a = self.out_proj(a.transpose(1, 2).flatten(2))  # (B, N, C)
        return x + a.transpose(1, 2).reshape(x.shape)


class _Unit(nn.Module):
    """One U-Net step: a residual block, then optional voxel self-attention, then optional cross-attention.

    Args:
        in_channels: input channels of the residual block.
        out_channels: channels of the block and its attention layers.
        temb_channels: size of the time embedding.
        norm_num_groups: GroupNorm groups.
        num_head_channels: channels per attention head.
        self_attention: add MONAI's per-voxel ``SpatialAttentionBlock`` (quadratic in voxels).
        context_dim: add a :class:`VoxelCrossAttention` to tokens of this size; ``None`` for no cross-attention.
        dropout: dropout of the residual block and cross-attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        norm_num_groups: int,
        num_head_channels: int,
        self_attention: bool,
        context_dim: int | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.resnet = _ResBlock(in_channels, out_channels, temb_channels, norm_num_groups, dropout)
        self.self_attn: nn.Module | None = None
        if self_attention:
            self.self_attn = SpatialAttentionBlock(
                spatial_dims=_SPATIAL_DIMS,
                num_channels=out_channels,
                num_head_channels=num_head_channels,
                norm_num_groups=norm_num_groups,
                norm_eps=_NORM_EPS,
                use_flash_attention=True,  # i.e. F.scaled_dot_product_attention, never the N x N matrix
            )
        self.cross_attn: VoxelCrossAttention | None = None
        if context_dim is not None:
            self.cross_attn = VoxelCrossAttention(
                out_channels, context_dim, num_head_channels, norm_num_groups, dropout
            )

    def forward(
        self,
        h: Tensor,
        emb: Tensor,
        context: Tensor | None,
        run: Callable[..., Tensor],
        skip: Tensor | None = None,
        upsample: nn.Module | None = None,
    ) -> Tensor:
        """
        Args:
            h: (B, C_h, *spatial) features.
            emb: (B, temb_channels) time embedding.
            context: (B, T, context_dim) tokens, used only if the unit has cross-attention.
            run: calls a sub-module, with or without gradient checkpointing.
            skip: (B, C_s, *spatial) skip features concatenated after ``h`` (decoder units), with
                ``C_h + C_s = in_channels``; ``None`` in the encoder.
            upsample: the coarser decoder level's upsampling, applied to ``h`` first (the first unit of every
                decoder level but the lowest), or ``None``.

        Returns:
            (B, out_channels, *spatial) features.
        """
        h = run(self.resnet, h, emb, skip, upsample)
        if self.self_attn is not None:
            h = run(self.self_attn, h)
        if self.cross_attn is not None:
            h = run(self.cross_attn, h, context)
        return h


class _EncoderLevel(nn.Module):
    """``num_res_blocks`` units at one resolution, then (except at the last level) a strided-conv downsample.

    Args:
        units: the level's units, run in order; each output is kept as a skip connection.
        downsample: halves the resolution (its output is a skip too); ``None`` at the lowest level.
    """

    def __init__(self, units: Sequence[_Unit], downsample: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.downsample = downsample


class _DecoderLevel(nn.Module):
    """``num_res_blocks + 1`` units fed with concatenated skips, then (except at the top) an upsample.

    Args:
        units: the level's units; each takes the previous output concatenated with the latest unused skip.
        upsample: doubles the resolution (nearest neighbour + convolution); ``None`` at the top level.
    """

    def __init__(self, units: Sequence[_Unit], upsample: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.upsample = upsample


class CrossAttentionUNet3D(CheckpointedNetwork):
    """Timestep- and text-conditioned 3D U-Net: ``f_θ(x_t, t, c)`` of GuideGen Eq. 5-6 and ``ε_θ`` of Eq. 10-11.

    The layout follows MONAI's ``DiffusionModelUNet`` (whose residual, down/up-sampling blocks and timestep
    embedding are reused): an input convolution; per level ``num_res_blocks`` timestep-conditioned residual
    blocks and a strided-conv downsample; a middle block (residual, self-attention, cross-attention if the last
    level has it, residual); a decoder with ``num_res_blocks + 1`` residual blocks per level fed with the encoder
    skips and nearest-neighbour upsampling plus a convolution; and an output head GroupNorm → SiLU →
    zero-initialised convolution.

    The text condition arrives as one token sequence per level (the knowledge-injection contexts of Eq. 3-4):
    ``contexts[l]`` is attended to by every unit of encoder level ``l`` and decoder level ``l`` that is flagged
    in ``cross_attention_levels``; the middle block uses ``contexts[-1]``. Cross-attention is linear in voxels;
    per-voxel self-attention (quadratic) is only added where ``self_attention_levels`` says and in the middle
    block, which keeps 128³ volumes tractable.

    Args:
        in_channels: input channels (TCSS: number of classes N; LDM: latent channels + mask channels).
        out_channels: output channels (TCSS: N logits of x_0; LDM: latent channels of ε).
        channels: feature channels per level; the number of levels is ``len(channels)``.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        cross_attention_levels: per level, whether its units cross-attend to that level's context.
        self_attention_levels: per level, whether its units run per-voxel self-attention.
        num_head_channels: channels per attention head (self- and cross-attention).
        norm_num_groups: GroupNorm groups; every entry of ``channels`` must be divisible by it.
        context_dims: size of the context tokens per level; defaults to ``channels``. Entries of levels without
            cross-attention are ignored: the ``context_dims`` property reports ``None`` there. Build the injector
            with ``context_dims=unet.context_dims``.
        dropout: dropout in residual blocks and cross-attention.
        use_checkpointing: recompute every residual/attention block in the backward pass (training only) to
            save activation memory; results are identical.
        inference_slab_rows: in eval mode without gradients (sampling), compute every residual block, convolution
            and cross-attention this many rows of the first spatial axis at a time
            (:mod:`~custom_components.networks.slabs`): same result up to float rounding, a fraction of the memory
            at 128³. None: always the plain forward pass.
        inference_slab_min_mib: the slab-wise pass is used only when one sample's top-level feature map
            (``channels[0]`` × voxels, float32) takes at least this many MiB (128³ × 64 channels: 512 MiB); for
            smaller volumes the plain pass is faster and its memory small. Per sample, not per batch: a batch of
            small volumes (the demo's 32³ at batch 32) keeps the faster plain pass, whose memory grows with the
            batch as any batched pass does.

    Raises:
        ValueError: for inconsistent level settings, channels not divisible by ``norm_num_groups`` or (at
            attention levels) by ``num_head_channels``, or a bad ``dropout``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int = 2,
        cross_attention_levels: Sequence[bool] = (False, True, True, True),
        self_attention_levels: Sequence[bool] = (False, False, False, True),
        num_head_channels: int = 32,
        norm_num_groups: int = 32,
        context_dims: Sequence[int] | None = None,
        dropout: float = 0.0,
        use_checkpointing: bool = False,
        inference_slab_rows: int | None = 4,
        inference_slab_min_mib: float = 64.0,
    ) -> None:
        super().__init__()
        self.inference_slab_min_mib = float(inference_slab_min_mib)
        if inference_slab_rows is not None and int(inference_slab_rows) < 1:
            raise ValueError(f"inference_slab_rows must be a positive int or None, got {inference_slab_rows}.")
        self.inference_slab_rows = None if inference_slab_rows is None else int(inference_slab_rows)
        channels = tuple(int(c) for c in channels)
        cross_attention_levels = tuple(bool(f) for f in cross_attention_levels)
        self_attention_levels = tuple(bool(f) for f in self_attention_levels)
        context_dims = channels if context_dims is None else tuple(int(d) for d in context_dims)
        self._validate_config(
            in_channels, out_channels, channels, num_res_blocks, cross_attention_levels, self_attention_levels,
            num_head_channels, norm_num_groups, context_dims, dropout,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.num_res_blocks = num_res_blocks
        self.cross_attention_levels = cross_attention_levels
        self.self_attention_levels = self_attention_levels
        # Levels without cross-attention take no context: None tells the injector to emit nothing there, so
        # no parameter goes unused (DDP requires every parameter to receive a gradient).
        self._context_dims = tuple(d if cross else None for d, cross in zip(context_dims, cross_attention_levels))
        num_levels = len(channels)

        self.conv_in = _conv(in_channels, channels[0], 3)
        # Sinusoidal features of size channels[0] -> MLP, as in MONAI / DDPM.
        temb = channels[0] * 4
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))

        def unit(level: int, in_ch: int, self_attn: bool, cross: bool) -> _Unit:
            return _Unit(
                in_channels=in_ch,
                out_channels=channels[level],
                temb_channels=temb,
                norm_num_groups=norm_num_groups,
                num_head_channels=num_head_channels,
                self_attention=self_attn,
                context_dim=context_dims[level] if cross else None,
                dropout=dropout,
            )

        # Encoder. Skips are pushed after conv_in, after every unit and after every downsample (MONAI's order).
        self.encoder = nn.ModuleList()
        skip_channels = [channels[0]]
        prev = channels[0]
        for level in range(num_levels):
            units = []
            for _ in range(num_res_blocks):
                units.append(unit(level, prev, self_attention_levels[level], cross_attention_levels[level]))
                prev = channels[level]
                skip_channels.append(prev)
            down = None
            if level < num_levels - 1:
                down = DiffusionUnetDownsample(_SPATIAL_DIMS, prev, use_conv=True, out_channels=prev)
                skip_channels.append(prev)
            self.encoder.append(_EncoderLevel(units, down))

        # The middle block runs at the last level's resolution, so it follows the last level's context.
        self.middle = nn.ModuleList(
            [
                unit(num_levels - 1, prev, True, cross_attention_levels[-1]),
                unit(num_levels - 1, prev, False, False),
            ]
        )

        # Decoder, from the lowest resolution up; self.decoder[i] serves level num_levels - 1 - i.
        self.decoder = nn.ModuleList()
        for level in reversed(range(num_levels)):
            units = []
            for _ in range(num_res_blocks + 1):
                units.append(
                    unit(level, prev + skip_channels.pop(), self_attention_levels[level], cross_attention_levels[level])
                )
                prev = channels[level]
            up = None
            if level > 0:
                up = Upsample(
                    spatial_dims=_SPATIAL_DIMS,
                    in_channels=prev,
                    out_channels=prev,
                    scale_factor=2.0,
                    mode="nontrainable",
                    interp_mode="nearest",
                    align_corners=None,
                    post_conv=_conv(prev, prev, 3),
                )
            self.decoder.append(_DecoderLevel(units, up))

        # Zero-initialised last convolution, as in MONAI: the untrained network predicts 0.
        self.out = nn.Sequential(
            nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels[0], eps=_NORM_EPS, affine=True),
            nn.SiLU(),
            zero_module(_conv(channels[0], out_channels, 3)),
        )
        self.use_checkpointing = use_checkpointing  # after the blocks exist: the setter reaches into them

    @property
    def context_dims(self) -> tuple[int | None, ...]:
        """Size of the context tokens expected at each level (what the knowledge-injection module must emit);
        None at levels without cross-attention, which ignore their context."""
        return self._context_dims

    @property
    def num_levels(self) -> int:
        """Number of resolution levels; inputs must be divisible by ``2 ** (num_levels - 1)`` per axis."""
        return len(self.channels)

    @property
    def uses_context(self) -> bool:
        """Whether any block cross-attends, i.e. whether ``forward`` requires ``contexts``."""
        return any(self.cross_attention_levels)

    @staticmethod
    def _validate_config(
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: int,
        cross_attention_levels: tuple[bool, ...],
        self_attention_levels: tuple[bool, ...],
        num_head_channels: int,
        norm_num_groups: int,
        context_dims: tuple[int, ...],
        dropout: float,
    ) -> None:
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be >= 1.")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}.")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}.")
        for name, value in (
            ("cross_attention_levels", cross_attention_levels),
            ("self_attention_levels", self_attention_levels),
            ("context_dims", context_dims),
        ):
            if len(value) != len(channels):
                raise ValueError(
                    f"{name} has {len(value)} entries but channels {channels} defines {len(channels)} levels; "
                    "give one entry per level."
                )
        if any(d < 1 for d in context_dims):
            raise ValueError(f"context_dims must be positive, got {context_dims}.")
        if norm_num_groups < 1 or any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every entry of channels {channels} must be divisible by norm_num_groups ({norm_num_groups}) "
                "for GroupNorm; change one of them."
            )
        # Attention at a level (and always in the middle block, which runs at the last level) splits its
        # channels into heads of num_head_channels.
        attention = [c or s for c, s in zip(cross_attention_levels, self_attention_levels)]
        attention[-1] = True
        bad = [c for c, a in zip(channels, attention) if a and c % max(num_head_channels, 1)]
        if num_head_channels < 1 or bad:
            raise ValueError(
                f"num_head_channels ({num_head_channels}) must divide the channels of every level with attention "
                f"(and of the last level, used by the middle block); it does not divide {bad}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")

    def _validate_inputs(self, x: Tensor, timesteps: Tensor, contexts: Sequence[Tensor | None] | None) -> Tensor:
        """Check shapes with messages naming what was passed; returns the timesteps as a (B,) tensor."""
        if x.ndim != 2 + _SPATIAL_DIMS:
            raise ValueError(f"x must be a (B, C, H, W, D) tensor, got shape {tuple(x.shape)}.")
        batch = x.shape[0]
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the network was built with "
                f"in_channels={self.in_channels}."
            )
        divisor = 2 ** (self.num_levels - 1)
        if any(s % divisor for s in x.shape[2:]):
            raise ValueError(
                f"the spatial size of x (shape {tuple(x.shape)}) must be divisible by {divisor} "
                f"(2 ** (levels - 1) for {self.num_levels} levels) along every axis; pad or resize the input."
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(
                f"timesteps must have shape ({batch},) to match x (shape {tuple(x.shape)}), "
                f"got {tuple(timesteps.shape)}."
            )
        if contexts is None:
            if self.uses_context:
                raise ValueError(
                    "contexts is None but the network cross-attends at levels "
                    f"{[i for i, f in enumerate(self.cross_attention_levels) if f]}; pass one entry per level, a "
                    "(B, tokens, dim) tensor where context_dims is not None (for an unconditional / "
                    "classifier-free-guidance pass, pass zeros, see TextConditionedUNet.null_contexts)."
                )
            return timesteps
        if isinstance(contexts, Tensor) or len(contexts) != self.num_levels:
            got = "a single tensor" if isinstance(contexts, Tensor) else f"{len(contexts)}"
            raise ValueError(
                f"expected a sequence of {self.num_levels} contexts (one per level, dims {self.context_dims}; "
                f"None where the dim is None), got {got}."
            )
        for level, (ctx, dim) in enumerate(zip(contexts, self.context_dims)):
            if dim is None:
                continue
            if not isinstance(ctx, Tensor) or ctx.ndim != 3 or ctx.shape[0] != batch or ctx.shape[2] != dim:
                shape = tuple(ctx.shape) if isinstance(ctx, Tensor) else type(ctx).__name__
                raise ValueError(f"contexts[{level}] must have shape ({batch}, tokens, {dim}), got {shape}.")
        return timesteps

    def _runner(self) -> Callable[..., Tensor]:
        """How units call their blocks: directly, or through non-reentrant gradient checkpointing."""
        if self.use_checkpointing and self.training and torch.is_grad_enabled():

            def run(module: nn.Module, *args: Any) -> Tensor:
                return checkpoint(module, *args, use_reentrant=False)

            return run

        def run_plain(module: nn.Module, *args: Any) -> Tensor:
            return module(*args)

        return run_plain

    def activation_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the network computes on input ``x`` in.

        Args:
            x: the network's input; a one-hot may come in an integer or bool dtype.

        Returns:
            ``x``'s own dtype when it is floating point, otherwise the weights' dtype.
        """
        return x.dtype if x.is_floating_point() else self.conv_in.conv.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, contexts: Sequence[Tensor | None] | None = None) -> Tensor:
        """
        Args:
            x: (B, in_channels, H, W, D) input; H, W, D divisible by ``2 ** (num_levels - 1)``. A one-hot input may
                come as bool/uint8 (TCSS sampling keeps x_t so: an eighth of the memory); the slab-wise inference
                converts it a slab at a time.
            timesteps: (B,) diffusion timesteps, integer or float (a 0-d tensor is broadcast to the batch).
            contexts: one entry per level (the knowledge-injection contexts, Eq. 3-4): a (B, T_l, context_dims[l])
                tensor at levels with cross-attention; anything (typically ``None``) at the other levels, where it
                is ignored. May be ``None`` as a whole only if no level cross-attends.

        Returns:
            (B, out_channels, H, W, D): ``x_0`` logits for TCSS (Eq. 5-6) or the predicted noise for the latent
            generator (Eq. 10-11).

        Raises:
            ValueError: if the shapes of ``x``, ``timesteps`` or ``contexts`` do not fit the network.
        """
        timesteps = self._validate_inputs(x, timesteps, contexts)
        ctx: list[Tensor | None] = list(contexts) if contexts is not None else [None] * self.num_levels
        run = self._runner()

        # The sinusoidal features are float32; cast to the activations' dtype (e.g. under fp16/bf16).
        dtype = self.activation_dtype(x)
        emb = self.time_embed(get_timestep_embedding(timesteps, self.channels[0]).to(dtype))

        # eval mode too: the slab-wise blocks apply no dropout
        rows = self.inference_slab_rows if not (torch.is_grad_enabled() or self.training) else None
        # decided per sample: the batch size must not switch a small volume to the slower slab-wise pass
        sample_top_level_mib = self.channels[0] * x[0, 0].numel() * 4 / 2**20
        if rows is not None and sample_top_level_mib >= self.inference_slab_min_mib:
            return self._forward_in_slabs(x, emb, ctx, rows)

        h = self.conv_in(x.to(dtype))
        skips = [h]
        for level, enc in enumerate(self.encoder):
            for u in enc.units:
                h = u(h, emb, ctx[level], run)
                skips.append(h)
            if enc.downsample is not None:
                h = enc.downsample(h)
                skips.append(h)

        for u in self.middle:
            h = u(h, emb, ctx[-1], run)

        upsample: nn.Module | None = None  # a level's upsampling runs inside the next level's first residual block
        for i, dec in enumerate(self.decoder):
            level = self.num_levels - 1 - i
            for u in dec.units:
                h = u(h, emb, ctx[level], run, skip=skips.pop(), upsample=upsample)
                upsample = None
            upsample = dec.upsample

        # checkpointed, the head keeps its input, not the normalised and activated copies (3 full-size maps)
        out: Tensor = run(self.out, h)
        return out

    def _forward_in_slabs(self, x: Tensor, emb: Tensor, ctx: list[Tensor | None], rows: int) -> Tensor:
        """:meth:`forward` without gradients, computed ``rows`` rows at a time (:mod:`~custom_components.networks.slabs`).

        Residual blocks and cross-attention run slab-wise (whole feature maps exist only for their inputs and
        outputs); self-attention (lowest resolution only) runs as usual. The input convolution's output and every
        upsampling are :class:`LazyRows`, recomputed where they are read instead of kept: the input convolution is
        cheap (few input channels) and is read again only by the last decoder unit, and an upsampling is read by one
        unit only.
        """

        def unit(u: _Unit, parts: list[Tensor | LazyRows], level: int) -> Tensor:
            out = resblock_in_slabs(u.resnet, parts, emb, rows)
            if u.self_attn is not None:
                out = u.self_attn(out)
            if u.cross_attn is not None:
                out = cross_attention_in_slabs(u.cross_attn, out, ctx[level], rows)
            return out

        h: Tensor | LazyRows = conv_rows(self.conv_in, x)
        skips = [h]
        for level, enc in enumerate(self.encoder):
            for u in enc.units:
                h = unit(u, [h], level)
                skips.append(h)
            if enc.downsample is not None:
                source = materialize(h, rows)
                h = conv_in_slabs(enc.downsample.op, lambda lo, hi: source[:, :, lo:hi], source.shape[2], rows)
                skips.append(h)

        for u in self.middle:
            h = unit(u, [h], self.num_levels - 1)

        for i, dec in enumerate(self.decoder):
            level = self.num_levels - 1 - i
            for u in dec.units:
                h = unit(u, [h, skips.pop()], level)
            if dec.upsample is not None:
                h = upsample_conv_rows(dec.upsample, materialize(h, rows))

        norm, _, conv = self.out
        return norm_silu_conv_in_slabs(norm, conv, materialize(h, rows), rows)


class TextConditionedUNet(nn.Module):
    """A :class:`CrossAttentionUNet3D` fed by a knowledge-injection module: the network the TCSS and LDM bundles use.

    ``forward(x, t, text_features, text_mask)`` computes the per-level contexts ``c = injector(text, mask)``
    (GuideGen Eq. 3-4) and returns ``unet(x, t, c)`` (Eq. 5-6 for TCSS, Eq. 10-11 for the latent generator).

    Unconditional pass (classifier-free guidance): with ``text_features=None`` the U-Net receives all-zero
    contexts (see :meth:`null_contexts`). Because the cross-attention key/value projections have no bias, a
    zero context makes every cross-attention block add only its learned output bias -- a fixed, learned "null
    prompt" that does not depend on the injector. Sampling with guidance combines ``forward(x, t, text)`` and
    ``forward(x, t, None)``. To train the unconditional mode with per-sample prompt dropout, zero the dropped
    samples' contexts (``torch.where(drop[:, None, None], 0, c)``) and call ``unet`` directly; a whole batch
    with ``None`` leaves the injector without gradients for that step (DDP then needs
    ``find_unused_parameters=True``).

    Args:
        unet: the denoising U-Net.
        injector: maps ``(text_features (B, L, text_dim), text_mask (B, L) bool | None)`` to a list of per-level
            contexts ``(B, T, unet.context_dims[l])`` (``None`` where that is ``None``), e.g.
            :class:`custom_components.networks.knowledge_injection.KnowledgeInjection` built with
            ``context_dims=unet.context_dims``.

    Raises:
        TypeError: if ``unet`` is not a :class:`CrossAttentionUNet3D`.
        ValueError: if the injector advertises ``context_dims`` that differ from the U-Net's.

    Note:
        ``unet.context_dims`` is ``None`` at levels without cross-attention, so an injector built with
        ``context_dims=unet.context_dims`` emits ``None`` there and has no projection that would go unused:
        every parameter receives a gradient, as DistributedDataParallel requires.
    """

    def __init__(self, unet: CrossAttentionUNet3D, injector: nn.Module) -> None:
        super().__init__()
        if not isinstance(unet, CrossAttentionUNet3D):
            raise TypeError(f"unet must be a CrossAttentionUNet3D, got {type(unet).__name__}.")
        injector_dims = getattr(injector, "context_dims", None)
        if injector_dims is not None and tuple(injector_dims) != unet.context_dims:
            raise ValueError(
                f"the injector emits contexts of dims {tuple(injector_dims)} but the U-Net expects "
                f"{unet.context_dims}; build it with context_dims=unet.context_dims."
            )
        self.unet = unet
        self.injector = injector

    @property
    def context_dims(self) -> tuple[int | None, ...]:
        """Per-level context sizes of the wrapped U-Net (None where a level takes no context)."""
        return self.unet.context_dims

    @property
    def num_null_tokens(self) -> int:
        """Tokens per level in :meth:`null_contexts`: the injector's ``num_queries`` (1 if it has none).

        Matching the conditional token count lets callers concatenate conditional and null contexts along the
        batch axis; the value does not change the result, since attention to zero keys/values yields zero.
        """
        return int(getattr(self.injector, "num_queries", 1))

    def null_contexts(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[Tensor | None]:
        """All-zero contexts, one ``(batch_size, num_null_tokens, context_dims[l])`` tensor per level (``None`` at
        levels without cross-attention).

        Args:
            batch_size: batch size B.
            device: device of the tensors (default: the U-Net's).
            dtype: dtype of the tensors (default: the U-Net's).

        Returns:
            The "null prompt" contexts used for unconditional / classifier-free-guidance passes.
        """
        ref = next(self.unet.parameters())
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return [
            None if dim is None else torch.zeros(batch_size, self.num_null_tokens, dim, device=device, dtype=dtype)
            for dim in self.context_dims
        ]

    def forward(
        self, x: Tensor, timesteps: Tensor, text_features: Tensor | None, text_mask: Tensor | None = None
    ) -> Tensor:
        """
        Args:
            x: (B, in_channels, H, W, D) noised input (TCSS: x_t; LDM: z_t ⊕ mask).
            timesteps: (B,) diffusion timesteps.
            text_features: (B, L, text_dim) encoded prompt, or ``None`` for the unconditional (null-prompt) pass.
            text_mask: (B, L) bool, True for real (non-padding) tokens; must be ``None`` when ``text_features``
                is ``None``.

        Returns:
            (B, out_channels, H, W, D) U-Net prediction.

        Raises:
            ValueError: if ``text_mask`` is given without ``text_features``, or if shapes do not fit.
        """
        if text_features is None:
            if text_mask is not None:
                raise ValueError("text_mask was given without text_features; pass both, or neither for a null pass.")
            contexts = self.null_contexts(x.shape[0], device=x.device, dtype=self.unet.activation_dtype(x))
        else:
            if text_features.shape[0] != x.shape[0]:
                raise ValueError(
                    f"text_features has batch size {text_features.shape[0]} but x has {x.shape[0]} "
                    f"(shapes {tuple(text_features.shape)} and {tuple(x.shape)})."
                )
            contexts = list(self.injector(text_features, text_mask))
        out: Tensor = self.unet(x, timesteps, contexts)
        return out
