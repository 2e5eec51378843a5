"""The anatomy-aware 3D KL autoencoder of GuideGen's stage II (paper Fig. 1b).

GuideGen compresses a CT volume ``x`` (full Hounsfield range, scaled to [-1, 1]) into a latent ``z`` in which the
stage-III diffusion model generates, and decodes ``z`` back to CT. Both directions see the anatomy mask ``m``:
``q(z | x, m) = N(μ, σ²)`` with ``(μ, σ) = E(x, m)`` and ``x̂ = D(z, m)``. The reconstruction ``x̂`` is what the
HDR-window L1 loss (paper Eq. 7-8), the perceptual loss and the 2D/3D adversarial terms (Eq. 9) are computed on
(see :mod:`custom_components.engines.gan`).

**Mask pyramid.** The label volume is resampled (nearest neighbour) to the resolution of every level of the encoder
and of the decoder, one-hot encoded (``num_classes`` channels) and concatenated with that level's features; a 3x3
convolution fuses the two back to the level's width. The encoder's first level takes the mask through its input
convolution (image ⊕ one-hot), the decoder fuses it at every level including the full-resolution one. Hence the
decoder is told *where* each organ is at every scale and only has to generate its texture, which is what lets a
generated mask steer the generated CT.

**Layout.** MONAI's :class:`~monai.networks.nets.AutoencoderKL` encoder/decoder (whose residual, downsampling and
upsampling blocks are reused) without attention and non-local blocks -- the paper's autoencoder has none, and
without them every output voxel depends on a bounded neighbourhood, which makes exact tiled inference possible
(:mod:`custom_components.networks.tiling`). With ``len(channels)`` levels the volume is downsampled by
``f = 2 ** (len(channels) - 1)`` per axis; the paper's widths ``(96, 192, 384)`` give ``f = 4`` (256³ CT -> 64³
latent with 4 channels).

**Normalisation.** ``norm="group"`` is MONAI's GroupNorm. ``norm="voxel"`` (the default) normalises the channels
of each voxel on their own (:class:`VoxelNorm`): it has no statistics over space, so a crop of a volume is processed
exactly as the same region of the whole volume, tiled encoding/decoding of 512³ volumes equals the untiled result,
and a voxel's normalisation does not depend on the patch size used in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Upsample
from monai.networks.nets.autoencoderkl import AEKLDownsample, AEKLResBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from custom_components.errors import GuideGenInputError
from custom_components.networks.layers import CheckpointedNetwork, RecomputesNorms, norm_silu
from custom_components.networks.layers import same_conv3d as _conv

__all__ = ["MaskGuidedAutoencoder", "VoxelNorm"]

_SPATIAL_DIMS = 3
_NORMS = ("voxel", "group")
# MONAI's AutoencoderKL clamps the log-variance to this range before exponentiating.
_LOGVAR_RANGE = (-30.0, 20.0)


class VoxelNorm(nn.Module):
    """Normalisation over the channels of each voxel separately, with a per-channel affine transform.

    ``y[b, :, v] = (x[b, :, v] - mean_c x[b, :, v]) / sqrt(var_c x[b, :, v] + eps) * weight + bias``: a
    :class:`~torch.nn.LayerNorm` over the channel axis of a (B, C, *spatial) tensor. Unlike GroupNorm it uses no
    statistics over space, so the output at a voxel depends only on that voxel's features; a crop of a volume is
    normalised exactly like the same region of the whole volume. That is what makes tiled inference of the
    autoencoder exact.

    Args:
        num_channels: number of channels C.
        eps: added to the variance for numerical stability.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: (B, num_channels, *spatial) features.

        Returns:
            The normalised features, same shape.
        """
        # F.layer_norm over a channels-last view: one fused kernel that autocast runs in float32 (as it does
        # GroupNorm) and that saves for backward only its input and per-voxel statistics. The result is moved back
        # as a view, i.e. in channels-last memory layout, which convolutions accept as is.
        y = F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class _ResBlock(RecomputesNorms, AEKLResBlock):
    """MONAI's autoencoder residual block, with a choice of normalisation and one temporary fewer.

    :class:`AEKLResBlock` hard-codes GroupNorm. For ``norm="voxel"`` it is built with a single group (valid for any
    width) and its ``norm1``/``norm2`` are then replaced by :class:`VoxelNorm`, which keeps the parameter names
    (``norm1.weight``, ``norm1.bias``, ...) and everything else of MONAI's block. The forward pass is MONAI's except
    that the shortcut is added in place into the second convolution's output (a convolution's backward needs its
    input, not its output), which saves a full-size temporary per block at 128³+.

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1 shortcut convolution is added when they differ).
        norm: ``"voxel"`` or ``"group"``.
        norm_num_groups: GroupNorm groups (``norm="group"`` only).
        norm_eps: normalisation epsilon.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, norm_num_groups: int, norm_eps: float) -> None:
        super().__init__(
            spatial_dims=_SPATIAL_DIMS,
            in_channels=in_channels,
            norm_num_groups=norm_num_groups if norm == "group" else 1,
            norm_eps=norm_eps,
            out_channels=out_channels,
        )
        if norm == "voxel":
            self.norm1 = VoxelNorm(in_channels, norm_eps)
            self.norm2 = VoxelNorm(out_channels, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: (B, in_channels, *spatial) features.

        Returns:
            (B, out_channels, *spatial) features.
        """
        h = self.conv1(norm_silu(self.norm1, x, self.recompute_norms))
        h = self.conv2(norm_silu(self.norm2, h, self.recompute_norms))
        h += self.nin_shortcut(x)
        return h


def _make_norm(norm: str, channels: int, norm_num_groups: int, norm_eps: float) -> nn.Module:
    """The output normalisation of the encoder/decoder: VoxelNorm or GroupNorm."""
    if norm == "voxel":
        return VoxelNorm(channels, norm_eps)
    return nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels, eps=norm_eps, affine=True)


def _one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, *spatial) class indices -> (B, num_classes, *spatial) one-hot of ``dtype``.

    ``scatter_`` into a zero tensor, unlike ``F.one_hot``, never materialises an int64 tensor with one entry per
    class and voxel (20 x 8 bytes per voxel at full resolution).
    """
    out = torch.zeros((labels.shape[0], num_classes, *labels.shape[2:]), dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.long(), 1)


def resample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resampling of a (B, C, *spatial) label volume to ``size``, in integer arithmetic.

    Output index ``j`` of an axis of ``n_in`` -> ``n_out`` voxels reads input ``floor(j * n_in / n_out)``: the rule of
    ``F.interpolate(mode="nearest")``, but computed exactly (no float scale, no float copy of the labels), for any
    dtype, and a no-op on axes whose size already matches.

    Args:
        labels: (B, C, *spatial) tensor of any dtype.
        size: target spatial size, one entry per spatial axis.

    Returns:
        The resampled labels, same dtype and device.
    """
    for axis, (n_in, n_out) in enumerate(zip(labels.shape[2:], size)):
        if n_in != n_out:
            index = torch.div(
                torch.arange(n_out, device=labels.device) * n_in, int(n_out), rounding_mode="floor"
            )
            labels = labels.index_select(2 + axis, index)
    return labels


class _Level(nn.Module):
    """One resolution level of the encoder or decoder.

    Args:
        fuse: 3x3 convolution of (features ⊕ one-hot mask) back to the feature width; ``None`` where the level
            takes no mask (first encoder level, which gets it through ``conv_in``, or ``num_classes == 0``).
        res_blocks: the level's residual blocks, run in order.
        resample: downsampling (encoder) or upsampling (decoder) after the blocks; ``None`` at the last level.
    """

    def __init__(self, fuse: nn.Module | None, res_blocks: Sequence[nn.Module], resample: nn.Module | None) -> None:
        super().__init__()
        self.fuse = fuse
        self.res_blocks = nn.ModuleList(res_blocks)
        self.resample = resample

    def forward(
        self, h: Tensor, labels: Tensor | None, num_classes: int, run: Callable[..., Tensor]
    ) -> Tensor:
        """
        Args:
            h: (B, C, *level_size) features.
            labels: (B, 1, *level_size) class indices at this level, used if the level has ``fuse``.
            num_classes: number of one-hot channels.
            run: calls a module (or function) on tensors, with or without gradient checkpointing.

        Returns:
            The level's output (resampled unless it is the last level).
        """
        h = self.blocks(h, labels, num_classes, run)
        if self.resample is not None:
            h = self.resample(h)
        return h

    def blocks(
        self,
        h: Tensor,
        labels: Tensor | None,
        num_classes: int,
        run: Callable[..., Tensor],
        upsample: nn.Module | None = None,
    ) -> Tensor:
        """The level without its own resampling: ``upsample`` (if given), the mask fusion, the residual blocks.

        Args:
            h: (B, C, *size) features; the level's resolution, or half of it with ``upsample``.
            labels: (B, 1, *level_size) class indices at this level, used if the level has ``fuse``.
            num_classes: number of one-hot channels.
            run: calls a module (or function) on tensors, with or without gradient checkpointing.
            upsample: the coarser decoder level's upsampling, or ``None``.

        Under gradient checkpointing the first residual block runs in one call with the upsampling and the mask
        fusion before it, so the backward pass keeps the coarse input, not the upsampled map, the fusion's
        concatenated input and its output (three full-size maps at the finest level).

        Returns:
            (B, C_out, *level_size) features.
        """
        fuse = self.fuse if labels is not None else None
        for index, block in enumerate(self.res_blocks):
            if index == 0 and (fuse is not None or upsample is not None):
                h = run(_enter_level, h, labels, upsample, fuse, block, num_classes)
            else:
                h = run(block, h)
        return h


def _enter_level(
    h: Tensor, labels: Tensor | None, upsample: nn.Module | None, fuse: nn.Module | None, block: nn.Module, num_classes: int
) -> Tensor:
    """A level's first residual block after the optional upsampling and mask fusion (see :meth:`_Level.blocks`)."""
    if upsample is not None:
        h = upsample(h)
    if fuse is not None and labels is not None:
        h = fuse(torch.cat([h, _one_hot(labels, num_classes, h.dtype)], dim=1))
    out: Tensor = block(h)
    return out


class _Encoder(nn.Module):
    """Image (+ mask pyramid) -> pre-quantisation latent features; MONAI's ``Encoder`` without attention.

    Args:
        in_channels: image channels.
        num_classes: one-hot mask channels (0: no mask).
        channels: width per level.
        num_res_blocks: residual blocks per level.
        latent_channels: output channels.
        norm: ``"voxel"`` or ``"group"``.
        norm_num_groups: GroupNorm groups.
        norm_eps: normalisation epsilon.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        num_res_blocks: Sequence[int],
        latent_channels: int,
        norm: str,
        norm_num_groups: int,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv_in = _conv(in_channels + num_classes, channels[0], 3)
        self.levels = nn.ModuleList()
        width = channels[0]
        for i, out_width in enumerate(channels):
            # The first level sees the full-resolution mask through conv_in; deeper ones fuse their own copy.
            fuse = _conv(width + num_classes, width, 3) if i > 0 and num_classes > 0 else None
            blocks = []
            for _ in range(num_res_blocks[i]):
                blocks.append(_ResBlock(width, out_width, norm, norm_num_groups, norm_eps))
                width = out_width
            down = AEKLDownsample(_SPATIAL_DIMS, width) if i < len(channels) - 1 else None
            self.levels.append(_Level(fuse, blocks, down))
        self.norm_out = _make_norm(norm, width, norm_num_groups, norm_eps)
        self.conv_out = _conv(width, latent_channels, 3)

    def forward(self, x: Tensor, labels: Sequence[Tensor] | None, run: Callable[..., Tensor]) -> Tensor:
        """
        Args:
            x: (B, in_channels, *spatial) image.
            labels: per-level (B, 1, *level_size) class indices, full resolution first; ``None`` without mask.
            run: calls a module (or function) on tensors, with or without gradient checkpointing.

        Returns:
            (B, latent_channels, *spatial / f) features.
        """
        if labels is not None:
            x = torch.cat([x, _one_hot(labels[0], self.num_classes, x.dtype)], dim=1)
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            h = level(h, None if labels is None else labels[i], self.num_classes, run)
        out: Tensor = self.conv_out(F.silu(self.norm_out(h)))
        return out


class _Decoder(nn.Module):
    """Latent (+ mask pyramid) -> image; MONAI's ``Decoder`` without attention, with a mask fusion at every level.

    Args:
        latent_channels: input channels.
        num_classes: one-hot mask channels (0: no mask).
        channels: width per level (full resolution first, as for the encoder).
        num_res_blocks: residual blocks per level (full resolution first).
        out_channels: image channels.
        norm: ``"voxel"`` or ``"group"``.
        norm_num_groups: GroupNorm groups.
        norm_eps: normalisation epsilon.
        output_shift: added to the output after scaling (the autoencoder's ``intensity_shift``).
        output_scale: multiplies the output (the autoencoder's ``intensity_scale``).
    """

    def __init__(
        self,
        latent_channels: int,
        num_classes: int,
        channels: Sequence[int],
        num_res_blocks: Sequence[int],
        out_channels: int,
        norm: str,
        norm_num_groups: int,
        norm_eps: float,
        output_shift: float = 0.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        # The decoder works in the normalised intensity space; its output is mapped back to CT on [-1, 1] here, in the
        # tail, which tiled decoding also runs.
        self.output_shift, self.output_scale = float(output_shift), float(output_scale)
        self.conv_in = _conv(latent_channels, channels[-1], 3)
        # self.levels[i] serves level len(channels) - 1 - i: lowest resolution first.
        self.levels = nn.ModuleList()
        width = channels[-1]
        for i, (out_width, n_blocks) in enumerate(zip(reversed(channels), reversed(num_res_blocks))):
            fuse = _conv(width + num_classes, width, 3) if num_classes > 0 else None
            blocks = []
            for _ in range(n_blocks):
                blocks.append(_ResBlock(width, out_width, norm, norm_num_groups, norm_eps))
                width = out_width
            up = None
            if i < len(channels) - 1:
                # Exactly MONAI Decoder's non-trainable upsampling: nearest x2, then a 3x3 convolution.
                up = Upsample(
                    spatial_dims=_SPATIAL_DIMS,
                    mode="nontrainable",
                    in_channels=width,
                    out_channels=width,
                    interp_mode="nearest",
                    scale_factor=2.0,
                    post_conv=_conv(width, width, 3),
                    align_corners=None,
                )
            self.levels.append(_Level(fuse, blocks, up))
        self.norm_out = _make_norm(norm, width, norm_num_groups, norm_eps)
        self.conv_out = _conv(width, out_channels, 3)

    def forward(self, z: Tensor, labels: Sequence[Tensor] | None, run: Callable[..., Tensor]) -> Tensor:
        """
        Args:
            z: (B, latent_channels, *latent_size) post-quantisation latent.
            labels: per-level (B, 1, *level_size) class indices, full resolution first; ``None`` without mask.
            run: calls a module (or function) on tensors, with or without gradient checkpointing.

        Returns:
            (B, out_channels, *latent_size * f) image.
        """
        return self.tail(self.head(z, labels, run), labels, run)

    def head(self, z: Tensor, labels: Sequence[Tensor] | None, run: Callable[..., Tensor]) -> Tensor:
        """The part of the decoder that runs at the latent resolution: ``conv_in``, then the lowest level's mask
        fusion and residual blocks (not its upsampling).

        Split out because it is cheap per voxel but widens the receptive field most (in latent voxels): tiled
        decoding runs it on its own with a small halo, then runs :meth:`tail` with a halo of the tail's radius only.

        Returns:
            (B, channels[-1], *latent_size) features.
        """
        h = self.conv_in(z)
        lowest = self.levels[0]
        if lowest.fuse is not None and labels is not None:
            h = lowest.fuse(torch.cat([h, _one_hot(labels[-1], self.num_classes, h.dtype)], dim=1))
        for block in lowest.res_blocks:
            h = run(block, h)
        return h

    def _output_head(self, h: Tensor) -> Tensor:
        out: Tensor = self.conv_out(F.silu(self.norm_out(h)))
        return out

    def tail(self, h: Tensor, labels: Sequence[Tensor] | None, run: Callable[..., Tensor]) -> Tensor:
        """The rest of the decoder after :meth:`head`: upsampling, the finer levels and the output convolution.

        Returns:
            (B, out_channels, *latent_size * f) image.
        """
        n = len(self.levels)
        upsample = self.levels[0].resample
        for i in range(1, n):
            # each upsampling runs inside the next level's first checkpointed call (see _Level.blocks)
            h = self.levels[i].blocks(h, None if labels is None else labels[n - 1 - i], self.num_classes, run, upsample)
            upsample = self.levels[i].resample
        # checkpointed, the output head keeps its input, not the normalised and activated copies
        out: Tensor = run(self._output_head, h)
        if self.output_shift != 0.0 or self.output_scale != 1.0:
            out = out * self.output_scale + self.output_shift
        return out


class MaskGuidedAutoencoder(CheckpointedNetwork):
    """GuideGen's anatomy-aware 3D KL autoencoder: ``(μ, σ) = E(x, m)``, ``x̂ = D(z, m)`` (paper Fig. 1b).

    The training objective around it (HDR-window L1, Eq. 7-8; perceptual, KL and 2D/3D adversarial terms, Eq. 9)
    lives in :mod:`custom_components.engines.gan`; this module is the network only.

    Encoder: ``conv_in`` 3x3 on image ⊕ one-hot mask (full resolution) -> ``channels[0]``; per level ``i``: for
    ``i > 0`` the one-hot mask at that level's size is concatenated and fused by a 3x3 convolution, then
    ``num_res_blocks[i]`` MONAI :class:`~monai.networks.nets.autoencoderkl.AEKLResBlock` (the first one changes the
    width to ``channels[i]``), then a strided-convolution :class:`AEKLDownsample` except after the last level; then
    norm → SiLU → 3x3 convolution to ``latent_channels`` and the 1x1 ``quant_conv_mu`` / ``quant_conv_log_sigma``
    (log-variance clamped to [-30, 20], ``σ = exp(logvar / 2)``), as in MONAI's ``AutoencoderKL``.

    Decoder: ``post_quant_conv`` 1x1; ``conv_in`` 3x3 -> ``channels[-1]``; per level from the lowest resolution up:
    mask concatenation + 3x3 fusion, residual blocks (widths as in MONAI's ``Decoder``), nearest-x2 upsampling with a
    3x3 post-convolution except after the full-resolution level; then norm → SiLU → ``conv_out`` 3x3.

    The downsampling factor is ``f = 2 ** (len(channels) - 1)`` per axis (:attr:`downsample_factor`): image edges
    must be multiples of ``f`` and the latent is ``image_size / f``. There is no attention anywhere, so an output
    voxel depends only on a bounded neighbourhood (:attr:`encoder_receptive_radius`,
    :attr:`decoder_receptive_radius`), which :func:`~custom_components.networks.tiled_encode` and
    :func:`~custom_components.networks.tiled_decode` rely on.

    Masks: a (B, 1, *spatial) label volume of class indices in ``[0, num_classes)`` (any integer, bool or float
    dtype; float values must be whole numbers) over the same field of view as the image, at any resolution. It is
    resampled once (nearest neighbour) to the full image grid and every level takes every ``2**level``-th voxel of
    that -- the nearest-neighbour resampling to the level's size -- so all levels (and all tiles of a tiled pass)
    see sub-samples of one grid.

    Args:
        in_channels: image channels.
        out_channels: reconstructed image channels.
        num_classes: number of mask classes N (one-hot channels at every level); 0 builds a mask-free autoencoder
            (ablation, or users without masks) whose methods take no mask.
        channels: feature width per level, full resolution first; the paper uses (96, 192, 384) (base width 96,
            multipliers 1, 2, 4 -> x4 downsampling).
        num_res_blocks: residual blocks per level (one int for all levels, or one per level).
        latent_channels: channels of the latent ``z``.
        norm: ``"voxel"`` (:class:`VoxelNorm`, no spatial statistics: exact tiling, patch-size independent) or
            ``"group"`` (MONAI's GroupNorm).
        norm_num_groups: GroupNorm groups (``norm="group"`` only); every entry of ``channels`` must be divisible.
        norm_eps: normalisation epsilon.
        use_checkpointing: when gradients are enabled, recompute each residual block in the backward pass
            (non-reentrant ``torch.utils.checkpoint``) to save activation memory at 128³+; results are identical.
        intensity_shift: the encoder sees ``(x - intensity_shift) / intensity_scale`` and the decoder's output is
            mapped back by the inverse, so the networks work on CT with zero mean tissue and unit-size contrasts.
            On the [-1, 1] scale of the full HU range soft tissue sits near -0.5 and 100 HU is 0.05, so without
            it the output convolution's bias must travel to -0.5 and its weights grow ~20x by small optimiser
            steps; ``(-0.5, 0.25)`` (0 HU -> 0, 512 HU -> 1) is what the demo recipe uses, ``(0, 1)`` (the
            default, and the paper's setting) leaves the intensities as they are.
        intensity_scale: see ``intensity_shift``; must be > 0.

    Raises:
        GuideGenInputError: for an inconsistent configuration (see the messages).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 20,
        channels: Sequence[int] = (96, 192, 384),
        num_res_blocks: int | Sequence[int] = 2,
        latent_channels: int = 4,
        norm: str = "voxel",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_checkpointing: bool = False,
        intensity_shift: float = 0.0,
        intensity_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(intensity_shift) and math.isfinite(intensity_scale) and intensity_scale > 0):
            raise GuideGenInputError(
                f"intensity_shift ({intensity_shift}) must be finite and intensity_scale ({intensity_scale}) finite "
                "and > 0; (0, 1) leaves the [-1, 1] CT scale unchanged."
            )
        channels = tuple(int(c) for c in channels)
        if isinstance(num_res_blocks, int):
            num_res_blocks = (num_res_blocks,) * len(channels)
        num_res_blocks = tuple(int(n) for n in num_res_blocks)
        self._validate_config(
            in_channels, out_channels, num_classes, channels, num_res_blocks, latent_channels, norm,
            norm_num_groups, norm_eps,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.channels = channels
        self.num_res_blocks = num_res_blocks
        self.latent_channels = latent_channels
        self.norm = norm
        self.intensity_shift = float(intensity_shift)
        self.intensity_scale = float(intensity_scale)

        norm_args = (norm, norm_num_groups, norm_eps)
        self.encoder = _Encoder(in_channels, num_classes, channels, num_res_blocks, latent_channels, *norm_args)
        self.quant_conv_mu = _conv(latent_channels, latent_channels, 1)
        self.quant_conv_log_sigma = _conv(latent_channels, latent_channels, 1)
        self.post_quant_conv = _conv(latent_channels, latent_channels, 1)
        self.decoder = _Decoder(
            latent_channels, num_classes, channels, num_res_blocks, out_channels, *norm_args,
            output_shift=self.intensity_shift, output_scale=self.intensity_scale,
        )  # fmt: skip
        self.use_checkpointing = use_checkpointing  # after the blocks exist: the setter reaches into them

    @staticmethod
    def _validate_config(
        in_channels: int,
        out_channels: int,
        num_classes: int,
        channels: tuple[int, ...],
        num_res_blocks: tuple[int, ...],
        latent_channels: int,
        norm: str,
        norm_num_groups: int,
        norm_eps: float,
    ) -> None:
        if in_channels < 1 or out_channels < 1 or latent_channels < 1:
            raise GuideGenInputError(
                f"in_channels ({in_channels}), out_channels ({out_channels}) and latent_channels ({latent_channels}) "
                "must all be >= 1."
            )
        if num_classes < 0:
            raise GuideGenInputError(
                f"num_classes must be >= 0 (0 for an autoencoder without mask input), got {num_classes}."
            )
        if not channels or any(c < 1 for c in channels):
            raise GuideGenInputError(f"channels must be a non-empty sequence of positive ints, got {channels}.")
        if len(num_res_blocks) != len(channels) or any(n < 1 for n in num_res_blocks):
            raise GuideGenInputError(
                f"num_res_blocks must be an int >= 1 or one int >= 1 per level ({len(channels)} levels for channels "
                f"{channels}), got {num_res_blocks}."
            )
        if norm not in _NORMS:
            raise GuideGenInputError(f"norm must be one of {_NORMS}, got {norm!r}.")
        if norm == "group" and (norm_num_groups < 1 or any(c % norm_num_groups for c in channels)):
            raise GuideGenInputError(
                f"with norm='group' every entry of channels {channels} must be divisible by norm_num_groups "
                f"({norm_num_groups}); change one of them, or use norm='voxel' (no groups)."
            )
        if not norm_eps > 0:
            raise GuideGenInputError(f"norm_eps must be > 0, got {norm_eps}.")

    # ------------------------------------------------------------------ geometry

    @property
    def num_levels(self) -> int:
        """Number of resolution levels (``len(channels)``)."""
        return len(self.channels)

    @property
    def downsample_factor(self) -> int:
        """Per-axis downsampling factor ``f = 2 ** (num_levels - 1)`` between image and latent grids."""
        return 2 ** (self.num_levels - 1)

    def latent_size(self, image_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the latent of an image of ``image_size``.

        Args:
            image_size: the image's spatial size (3 entries).

        Returns:
            ``image_size / f`` per axis.

        Raises:
            GuideGenInputError: if ``image_size`` is not 3D or not divisible by ``f``.
        """
        size = tuple(int(s) for s in image_size)
        f = self.downsample_factor
        if len(size) != _SPATIAL_DIMS or any(s < 1 for s in size):
            raise GuideGenInputError(f"image_size must be 3 positive ints (H, W, D), got {tuple(image_size)}.")
        if any(s % f for s in size):
            raise GuideGenInputError(
                f"the image size {size} must be divisible by the downsampling factor f={f} along every axis; "
                f"pad or resize the volume (e.g. monai.transforms.DivisiblePad(k={f}))."
            )
        return tuple(s // f for s in size)

    @property
    def encoder_receptive_radius(self) -> int:
        """How far (in image voxels) the latent at one position depends on the image: a conservative bound.

        Counted analytically: every 3x3 convolution at level ``i`` (``conv_in``, mask fusions, two per residual
        block, the final latent convolution) widens the dependency by one voxel of that level, i.e. ``2**i`` image
        voxels, and each downsampling convolution (3 taps, stride 2, padded on one side) by one voxel of the finer
        level. The sum is rounded up and a margin of one voxel is added.
        """
        total = 0
        for i, n_blocks in enumerate(self.num_res_blocks):
            convs = 2 * n_blocks
            convs += 1 if i == 0 else int(self.num_classes > 0)  # conv_in, or the mask fusion
            convs += 1  # the downsampling conv, or at the last level the final conv to the latent
            total += convs * 2**i
        return int(math.ceil(total)) + 1

    @property
    def decoder_receptive_radius(self) -> int:
        """How far (in latent voxels) the decoded image at one position depends on the latent: a conservative bound.

        Counted analytically: a 3x3 convolution at a level whose voxels are ``1/s`` latent voxels (``s = 1`` at the
        latent resolution, ``s = f`` at full resolution) widens the dependency by ``1/s`` latent voxels. Counted are
        ``conv_in``, the mask fusions, two per residual block, the upsampling post-convolutions and ``conv_out``.
        The sum is rounded up and a margin of one latent voxel is added, which also covers where an output voxel
        lies inside its latent voxel and the rounding of nearest-neighbour upsampling.
        """
        return self._decoder_radius(include_head=True)

    @property
    def decoder_tail_receptive_radius(self) -> int:
        """Like :attr:`decoder_receptive_radius`, for the decoder after its latent-resolution head (see
        ``_Decoder.head``), in latent voxels: the halo tiled decoding needs for the expensive fine levels."""
        return self._decoder_radius(include_head=False)

    @property
    def decoder_head_receptive_radius(self) -> int:
        """The latent voxels of context the decoder's latent-resolution head needs (its convolutions + 1)."""
        n_blocks = self.num_res_blocks[-1]
        return 2 * n_blocks + int(self.num_classes > 0) + 1 + 1

    def _decoder_radius(self, include_head: bool) -> int:
        total = 0.0
        last = self.num_levels - 1
        for level, n_blocks in enumerate(self.num_res_blocks):
            if level == last and not include_head:
                continue
            convs = 2 * n_blocks + int(self.num_classes > 0)
            convs += 1  # conv_in at the latent level, otherwise the post-conv of the upsampling into this level
            total += convs / 2 ** (last - level)
        total += 1 / 2**last  # conv_out, at full resolution
        return int(math.ceil(total)) + 1

    # ------------------------------------------------------------------ masks

    def _check_mask(self, mask: Tensor | None, batch: int, what: str) -> Tensor | None:
        """Validate a mask argument; returns it as an integer tensor (or None for a mask-free network)."""
        if self.num_classes == 0:
            if mask is not None:
                raise GuideGenInputError(
                    f"a mask (shape {tuple(mask.shape)}) was passed to {what}, but this autoencoder was built with "
                    "num_classes=0 (no mask input); pass mask=None, or use an autoencoder trained with masks."
                )
            return None
        if mask is None:
            raise GuideGenInputError(
                f"{what} needs the label mask: this autoencoder was built with num_classes={self.num_classes}; pass "
                "a (B, 1, H, W, D) label volume of class indices (any resolution over the image's field of view)."
            )
        if not isinstance(mask, Tensor):
            raise GuideGenInputError(f"mask must be a torch.Tensor, got {type(mask).__name__}.")
        if mask.ndim != 2 + _SPATIAL_DIMS or mask.shape[1] != 1 or mask.numel() == 0:
            raise GuideGenInputError(
                f"mask must be a non-empty (B, 1, H, W, D) label volume of class indices, got shape "
                f"{tuple(mask.shape)}; add the batch/channel axes (mask[None, None]) or convert a one-hot mask "
                "with argmax(dim=1, keepdim=True)."
            )
        if mask.shape[0] != batch:
            raise GuideGenInputError(
                f"mask has batch size {mask.shape[0]} (shape {tuple(mask.shape)}) but the input of {what} has "
                f"{batch}; pass one mask per volume."
            )
        if mask.dtype == torch.bool:
            mask = mask.to(torch.uint8)
        if mask.is_floating_point():
            if not bool(torch.isfinite(mask).all()) or bool((mask != torch.round(mask)).any()):
                raise GuideGenInputError(
                    f"mask (dtype {mask.dtype}) holds non-integer values; it must hold class indices (resample "
                    "label volumes with nearest-neighbour interpolation)."
                )
        elif mask.is_complex():
            raise GuideGenInputError(f"mask must hold integer class indices, got dtype {mask.dtype}.")
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi >= self.num_classes:
            raise GuideGenInputError(
                f"mask values must be class indices in [0, {self.num_classes}) (num_classes={self.num_classes}), "
                f"but the mask holds values from {lo} to {hi} (max {hi}); use the class map the autoencoder was "
                "trained with."
            )
        return mask.to(torch.uint8 if self.num_classes <= 256 else torch.long)

    def _label_pyramid(
        self, mask: Tensor | None, full_size: Sequence[int], batch: int, what: str
    ) -> list[Tensor] | None:
        """Validated mask -> per-level (B, 1, *level_size) class indices, full resolution first (None without mask)."""
        labels = self._check_mask(mask, batch, what)
        if labels is None:
            return None
        full = resample_labels(labels, full_size)
        # Striding the full-resolution grid is nearest-neighbour resampling to the level size (index j -> j * 2**i),
        # and keeps every level, and every tile of a tiled pass, on sub-samples of the same grid.
        return [full[(...,) + (slice(None, None, 2**i),) * _SPATIAL_DIMS] for i in range(self.num_levels)]

    def mask_pyramid(
        self, mask: Tensor | None, image_size: Sequence[int], batch_size: int | None = None
    ) -> list[Tensor] | None:
        """The class-index volumes every level sees (before one-hot encoding), full resolution first.

        Args:
            mask: (B, 1, *any_size) label volume, or None for a mask-free network.
            image_size: spatial size of the image (a multiple of ``f`` per axis).
            batch_size: batch size the mask must have (default: not checked).

        Returns:
            ``num_levels`` tensors (B, 1, *image_size / 2**level) of class indices (uint8, or int64 for more than
            256 classes), or None when ``num_classes == 0``.

        Raises:
            GuideGenInputError: for a bad mask or image size.
        """
        self.latent_size(image_size)
        if batch_size is None:
            batch_size = mask.shape[0] if isinstance(mask, Tensor) and mask.ndim > 0 else 1
        return self._label_pyramid(mask, image_size, batch_size, "mask_pyramid")

    # ------------------------------------------------------------------ checks

    def _check_image(self, image: Tensor) -> None:
        if not isinstance(image, Tensor) or image.ndim != 2 + _SPATIAL_DIMS:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise GuideGenInputError(f"image must be a (B, {self.in_channels}, H, W, D) tensor, got {shape}.")
        if image.shape[1] != self.in_channels:
            raise GuideGenInputError(
                f"image has {image.shape[1]} channels (shape {tuple(image.shape)}) but the autoencoder was built "
                f"with in_channels={self.in_channels}."
            )
        f = self.downsample_factor
        if any(s % f for s in image.shape[2:]):
            raise GuideGenInputError(
                f"the image size {tuple(image.shape[2:])} (shape {tuple(image.shape)}) must be divisible by the "
                f"downsampling factor f={f} along every axis; pad or resize the volume (e.g. "
                f"monai.transforms.DivisiblePad(k={f}))."
            )

    def _check_latent(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.ndim != 2 + _SPATIAL_DIMS or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise GuideGenInputError(
                f"z must be a (B, latent_channels={self.latent_channels}, h, w, d) latent, got {shape}."
            )

    def _runner(self) -> Callable[..., Tensor]:
        """How levels call their residual blocks: directly, or through non-reentrant gradient checkpointing."""
        if self.use_checkpointing and torch.is_grad_enabled():

            def run(function: Callable[..., Tensor], *args: Any) -> Tensor:
                out: Tensor = checkpoint(function, *args, use_reentrant=False)
                return out

            return run

        def run_plain(function: Callable[..., Tensor], *args: Any) -> Tensor:
            out: Tensor = function(*args)
            return out

        return run_plain

    # ------------------------------------------------------------------ encode / decode

    def _encode(self, image: Tensor, labels: list[Tensor] | None) -> tuple[Tensor, Tensor]:
        if self.intensity_shift != 0.0 or self.intensity_scale != 1.0:
            image = (image - self.intensity_shift) / self.intensity_scale
        h = self.encoder(image, labels, self._runner())
        z_mu = self.quant_conv_mu(h)
        z_log_var = torch.clamp(self.quant_conv_log_sigma(h), *_LOGVAR_RANGE)
        return z_mu, torch.exp(z_log_var / 2)

    def _decode(self, z: Tensor, labels: list[Tensor] | None) -> Tensor:
        out: Tensor = self.decoder(self.post_quant_conv(z), labels, self._runner())
        return out

    def encode(self, image: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior ``q(z | x, m) = N(z_mu, z_sigma²)`` of an image.

        Args:
            image: (B, in_channels, H, W, D), each edge a multiple of :attr:`downsample_factor`.
            mask: (B, 1, *any_size) class indices over the image's field of view; ``None`` iff ``num_classes == 0``.

        Returns:
            ``(z_mu, z_sigma)``, each (B, latent_channels, H/f, W/f, D/f).

        Raises:
            GuideGenInputError: for bad image or mask shapes/values, or a mask given to / missing from the network.
        """
        self._check_image(image)
        return self._encode(image, self._label_pyramid(mask, image.shape[2:], image.shape[0], "encode"))

    @staticmethod
    def sampling(z_mu: Tensor, z_sigma: Tensor) -> Tensor:
        """Reparameterised sample ``z = z_mu + ε · z_sigma``, ``ε ~ N(0, I)``.

        Args:
            z_mu: posterior mean.
            z_sigma: posterior standard deviation, same shape.

        Returns:
            A latent sample, same shape.
        """
        return z_mu + torch.randn_like(z_sigma) * z_sigma

    def decode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image ``D(z, m)`` from a latent.

        Args:
            z: (B, latent_channels, h, w, d) latent.
            mask: (B, 1, *any_size) class indices over the field of view; resampled to the image grid
                ``(h, w, d) * f``. ``None`` iff ``num_classes == 0``.

        Returns:
            (B, out_channels, h*f, w*f, d*f) image.

        Raises:
            GuideGenInputError: for a bad latent or mask.
        """
        self._check_latent(z)
        f = self.downsample_factor
        full_size = [s * f for s in z.shape[2:]]
        return self._decode(z, self._label_pyramid(mask, full_size, z.shape[0], "decode"))

    def forward(self, image: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, sample and decode (the training pass).

        Args:
            image: (B, in_channels, H, W, D), each edge a multiple of :attr:`downsample_factor`.
            mask: (B, 1, *any_size) class indices; ``None`` iff ``num_classes == 0``.

        Returns:
            ``(reconstruction, z_mu, z_sigma)``: (B, out_channels, H, W, D) and two (B, latent_channels, H/f, W/f, D/f).

        Raises:
            GuideGenInputError: for bad image or mask shapes/values.
        """
        self._check_image(image)
        labels = self._label_pyramid(mask, image.shape[2:], image.shape[0], "forward")
        z_mu, z_sigma = self._encode(image, labels)
        reconstruction = self._decode(self.sampling(z_mu, z_sigma), labels)
        return reconstruction, z_mu, z_sigma

    def reconstruct(self, image: Tensor, mask: Tensor | None = None) -> Tensor:
        """Deterministic reconstruction ``D(z_mu, m)``.

        Args:
            image: (B, in_channels, H, W, D), each edge a multiple of :attr:`downsample_factor`.
            mask: (B, 1, *any_size) class indices; ``None`` iff ``num_classes == 0``.

        Returns:
            (B, out_channels, H, W, D) reconstruction.

        Raises:
            GuideGenInputError: for bad image or mask shapes/values.
        """
        self._check_image(image)
        labels = self._label_pyramid(mask, image.shape[2:], image.shape[0], "reconstruct")
        z_mu, _ = self._encode(image, labels)
        return self._decode(z_mu, labels)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, norm={self.norm!r}, downsample_factor={self.downsample_factor}, "
            f"intensity_shift={self.intensity_shift}, intensity_scale={self.intensity_scale}"
        )
