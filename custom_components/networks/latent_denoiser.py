"""Stage III of GuideGen: the mask- and text-conditioned latent denoiser (paper Eq. 10-11, Fig. 1c).

The CT generator is a latent diffusion model over the anatomy-aware autoencoder's latents ``z``. Its noise
predictor ``ε_θ(z_t ⊕ c_mask, t, text)`` sees

- the noised latent ``z_t`` concatenated along channels with a condition ``c_mask`` computed from the anatomy
  mask (Eq. 10: the mask fixes *where* organs are), and
- the prompt through the same knowledge-injection + cross-attention design as the TCSS stage (Eq. 3-4 feeding
  every cross-attention level), with its own task queries.

The mask (128³ in the paper) is finer than the latent grid (64³), so it is brought to the latent grid either by
nearest-neighbour subsampling and one-hot encoding (``"onehot"``, N channels, no parameters), by the share of
each class among the mask voxels a latent voxel covers (``"fractions"``, N channels, no parameters; beyond the
paper), or by a small learned strided-convolution encoder (``"learned"``, a few channels whatever N is).

Training minimises ``|| ε − ε_θ(√ᾱ_t z_0 + √(1−ᾱ_t) ε ⊕ c_mask, t, text) ||²`` (Eq. 11), dropping the prompt for a
random subset of samples (``text_keep``) so that the same network also gives the unconditional prediction that
classifier-free guidance needs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from custom_components.errors import GuideGenInputError
from custom_components.networks.autoencoder import _one_hot  # no int64 copy per class and voxel, as streaming.py
from custom_components.networks.factory import build_text_conditioned_unet
from custom_components.networks.unet import TextConditionedUNet

__all__ = ["MaskEncoder", "LatentDenoiser", "build_latent_denoiser", "MASK_ENCODINGS"]

MASK_ENCODINGS = ("onehot", "fractions", "learned")
_SPATIAL_DIMS = 3


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


class MaskEncoder(nn.Module):
    """Learned encoder of the one-hot anatomy mask onto the latent grid (the ``"learned"`` ``c_mask`` of Eq. 10).

    ``log2(downsample)`` stride-2 3×3×3 convolutions, each followed by SiLU, then a 3×3×3 convolution to
    ``out_channels``. With ``downsample=1`` the stack is conv → SiLU → conv at full resolution.

    Args:
        num_classes: number N of mask classes (input channels, one-hot).
        out_channels: channels of the condition fed to the denoiser.
        downsample: mask voxels per latent voxel along each axis; a power of two ≥ 1.
        hidden_channels: width of the intermediate convolutions.

    Raises:
        GuideGenInputError: for non-positive sizes or a ``downsample`` that is not a power of two.
    """

    def __init__(
        self, num_classes: int, out_channels: int = 16, downsample: int = 2, hidden_channels: int = 32
    ) -> None:
        super().__init__()
        if num_classes < 1 or out_channels < 1 or hidden_channels < 1:
            raise GuideGenInputError(
                f"MaskEncoder needs positive sizes, got num_classes={num_classes}, out_channels={out_channels}, "
                f"hidden_channels={hidden_channels}."
            )
        if not _is_power_of_two(int(downsample)):
            raise GuideGenInputError(
                f"MaskEncoder downsample must be a power of two >= 1 (1, 2, 4, ...), got {downsample}; it is the "
                "ratio of the mask grid to the latent grid, e.g. 2 for 128³ masks and 64³ latents."
            )
        self.num_classes = int(num_classes)
        self.out_channels = int(out_channels)
        self.downsample = int(downsample)
        self.hidden_channels = int(hidden_channels)

        layers: list[nn.Module] = []
        steps = self.downsample.bit_length() - 1
        if steps == 0:
            layers += [nn.Conv3d(self.num_classes, self.hidden_channels, 3, padding=1), nn.SiLU()]
        prev = self.num_classes
        for _ in range(steps):
            # Stride 2 with padding 1 maps an even size s exactly to s / 2.
            layers += [nn.Conv3d(prev, self.hidden_channels, 3, stride=2, padding=1), nn.SiLU()]
            prev = self.hidden_channels
        layers.append(nn.Conv3d(self.hidden_channels, self.out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, onehot: Tensor) -> Tensor:
        """
        Args:
            onehot: (B, num_classes, H, W, D) one-hot (or soft) mask; H, W, D divisible by ``downsample``.

        Returns:
            (B, out_channels, H / downsample, W / downsample, D / downsample) mask condition.

        Raises:
            GuideGenInputError: for a wrong channel count or a size not divisible by ``downsample``.
        """
        if onehot.ndim != 2 + _SPATIAL_DIMS or onehot.shape[1] != self.num_classes:
            raise GuideGenInputError(
                f"MaskEncoder expects a (B, {self.num_classes}, H, W, D) one-hot mask, got shape "
                f"{tuple(onehot.shape)}; one-hot encode the class indices with num_classes={self.num_classes}."
            )
        if any(s % self.downsample for s in onehot.shape[2:]):
            raise GuideGenInputError(
                f"mask of size {tuple(onehot.shape[2:])} is not divisible by downsample={self.downsample}; "
                "pad or resample the mask."
            )
        out: Tensor = self.layers(onehot)
        return out


class LatentDenoiser(nn.Module):
    """``ε_θ(z_t ⊕ c_mask, t, text)``: the noise predictor of GuideGen's latent CT generator (Eq. 10-11, Fig. 1c).

    The anatomy mask enters by channel concatenation with the noised latent; the prompt enters through the
    wrapped :class:`TextConditionedUNet` (knowledge injection, Eq. 3-4, then cross-attention).

    Args:
        denoiser: the text-conditioned U-Net, built with ``in_channels = latent_channels + cond_channels`` and
            ``out_channels = latent_channels``.
        latent_channels: channels of the autoencoder's latent.
        num_classes: number N of mask classes (including background).
        mask_encoding: ``"onehot"`` (subsample, one-hot: N condition channels), ``"fractions"`` (each class's
            share of the ``mask_factor³`` mask voxels under a latent voxel: N condition channels summing to 1) or
            ``"learned"`` (:class:`MaskEncoder`: ``mask_encoder.out_channels`` condition channels).
        mask_factor: mask voxels per latent voxel along each axis (paper: 128³ mask, 64³ latent → 2).
        mask_encoder: the learned encoder for ``"learned"`` (default: ``MaskEncoder(num_classes, 16,
            mask_factor)``); must be ``None`` for ``"onehot"`` and ``"fractions"``.

    Raises:
        GuideGenInputError: for an unknown encoding, a bad ``mask_factor``, a mask encoder that does not fit, or a
            U-Net whose channels do not match ``latent_channels + cond_channels`` → ``latent_channels``.
        TypeError: if ``denoiser`` is not a :class:`TextConditionedUNet`.
    """

    def __init__(
        self,
        denoiser: TextConditionedUNet,
        latent_channels: int,
        num_classes: int,
        mask_encoding: str = "onehot",
        mask_factor: int = 2,
        mask_encoder: MaskEncoder | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, TextConditionedUNet):
            raise TypeError(f"denoiser must be a TextConditionedUNet, got {type(denoiser).__name__}.")
        if mask_encoding not in MASK_ENCODINGS:
            raise GuideGenInputError(f"mask_encoding must be one of {MASK_ENCODINGS}, got {mask_encoding!r}.")
        if latent_channels < 1 or num_classes < 1:
            raise GuideGenInputError(
                f"latent_channels ({latent_channels}) and num_classes ({num_classes}) must be >= 1."
            )
        if int(mask_factor) != mask_factor or mask_factor < 1:
            raise GuideGenInputError(
                f"mask_factor must be a positive integer (mask voxels per latent voxel), got {mask_factor}."
            )
        mask_factor = int(mask_factor)
        if mask_encoding != "learned":
            if mask_encoder is not None:
                raise GuideGenInputError(
                    f"a mask_encoder was given with mask_encoding={mask_encoding!r}; pass mask_encoding='learned' "
                    "to use it."
                )
        else:
            if mask_encoder is None:
                mask_encoder = MaskEncoder(num_classes, downsample=mask_factor)
            if mask_encoder.num_classes != num_classes or mask_encoder.downsample != mask_factor:
                raise GuideGenInputError(
                    f"the mask encoder was built for num_classes={mask_encoder.num_classes}, "
                    f"downsample={mask_encoder.downsample} but the denoiser has num_classes={num_classes}, "
                    f"mask_factor={mask_factor}; build it with the same values."
                )
        self.denoiser = denoiser
        self.latent_channels = int(latent_channels)
        self.num_classes = int(num_classes)
        self.mask_encoding = mask_encoding
        self.mask_factor = mask_factor
        self.mask_encoder = mask_encoder

        unet = denoiser.unet
        expected_in = self.latent_channels + self.cond_channels
        if unet.in_channels != expected_in or unet.out_channels != self.latent_channels:
            raise GuideGenInputError(
                f"the U-Net has in_channels={unet.in_channels}, out_channels={unet.out_channels} but the latent "
                f"denoiser needs in_channels = latent_channels + cond_channels = {self.latent_channels} + "
                f"{self.cond_channels} = {expected_in} (z_t ⊕ mask condition, {mask_encoding} encoding) and "
                f"out_channels = latent_channels = {self.latent_channels}; rebuild it, e.g. with "
                "build_latent_denoiser."
            )

    @property
    def cond_channels(self) -> int:
        """Channels of the mask condition ``c_mask``: N for one-hot, the encoder's output for learned."""
        if self.mask_encoder is None:
            return self.num_classes
        return self.mask_encoder.out_channels

    def _check_mask(self, mask: Tensor, latent_size: tuple[int, ...], batch: int | None) -> None:
        """Shape, dtype and value checks, with messages saying how to fix the mask."""
        if mask.ndim != 2 + _SPATIAL_DIMS or mask.shape[1] != 1:
            raise GuideGenInputError(
                f"mask must be a (B, 1, H, W, D) tensor of class indices, got shape {tuple(mask.shape)}."
            )
        if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
            raise GuideGenInputError(
                f"mask must hold integer class indices, got dtype {mask.dtype}; convert it with mask.long()."
            )
        if batch is not None and mask.shape[0] != batch:
            raise GuideGenInputError(
                f"mask has batch size {mask.shape[0]} (shape {tuple(mask.shape)}) but z_t has {batch}; pass one "
                "mask per latent."
            )
        expected = tuple(s * self.mask_factor for s in latent_size)
        if tuple(mask.shape[2:]) != expected:
            raise GuideGenInputError(
                f"mask of size {tuple(mask.shape[2:])} does not match the latent grid {tuple(latent_size)} × "
                f"mask_factor={self.mask_factor}; resample the mask to {expected} (the size the model was "
                "trained with)."
            )
        if mask.numel():
            low, high = int(mask.min()), int(mask.max())
            if low < 0 or high >= self.num_classes:
                raise GuideGenInputError(
                    f"mask values range over [{low}, {high}] (max value {high}) but the model has "
                    f"num_classes={self.num_classes} (valid indices 0..{self.num_classes - 1}); use the class map "
                    "the model was trained with."
                )

    def mask_condition(self, mask: Tensor, latent_size: tuple[int, ...] | torch.Size) -> Tensor:
        """The mask condition ``c_mask`` concatenated with ``z_t`` (Eq. 10).

        Args:
            mask: (B, 1, *mask_size) integer class indices, ``mask_size = latent_size × mask_factor``.
            latent_size: spatial size of the latent grid.

        Returns:
            (B, cond_channels, *latent_size) float condition (dtype of the network's parameters).

        Raises:
            GuideGenInputError: for a mask of the wrong shape, dtype, size or with out-of-range class indices.
        """
        latent_size = tuple(int(s) for s in latent_size)
        self._check_mask(mask, latent_size, None)
        return self._encode_mask(mask, next(self.denoiser.parameters()).dtype)

    def _encode_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """``c_mask`` of an already checked mask (see :meth:`mask_condition`)."""
        k = self.mask_factor
        if self.mask_encoding == "onehot":
            # Nearest-neighbour subsampling keeps labels crisp (no blended classes) and costs nothing.
            sub = mask[:, 0, ::k, ::k, ::k].long()
            return F.one_hot(sub, self.num_classes).movedim(-1, 1).to(dtype)
        if self.mask_encoding == "fractions":
            # A latent voxel covers k³ mask voxels; subsampling keeps one of them (and shifts the grid by half a
            # mask voxel), the shares keep how much of the voxel each class fills, e.g. the fat between organs.
            onehot = _one_hot(mask, self.num_classes, dtype)
            return F.avg_pool3d(onehot, kernel_size=k) if k > 1 else onehot
        weight_dtype = next(self.mask_encoder.parameters()).dtype
        onehot = _one_hot(mask, self.num_classes, weight_dtype)
        cond: Tensor = self.mask_encoder(onehot)
        return cond.to(dtype)

    def forward(
        self,
        z_t: Tensor,
        timesteps: Tensor,
        mask: Tensor,
        text_features: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise ``ε_θ(z_t ⊕ c_mask, t, text)`` (Eq. 10-11).

        Args:
            z_t: (B, latent_channels, *latent_size) noised latent.
            timesteps: (B,) diffusion timesteps (a 0-d tensor is broadcast).
            mask: (B, 1, *mask_size) integer class indices in ``[0, num_classes)``; ``mask_size`` must equal
                ``latent_size × mask_factor`` exactly.
            text_features: (B, L, text_dim) encoded prompts, or ``None`` for the unconditional (null-prompt) pass.
            text_mask: (B, L) bool, True for real tokens; ``None`` when ``text_features`` is ``None``.
            text_keep: optional (B,) bool; samples with False get the null (all-zero) contexts, i.e. the
                unconditional prediction (per-sample prompt dropout for classifier-free guidance). Ignored when
                ``text_features`` is ``None``.

        Returns:
            (B, latent_channels, *latent_size) predicted noise.

        Raises:
            GuideGenInputError: for inputs whose shapes, dtypes or values do not fit the model.
        """
        if z_t.ndim != 2 + _SPATIAL_DIMS or z_t.shape[1] != self.latent_channels:
            raise GuideGenInputError(
                f"z_t must be a (B, {self.latent_channels}, H, W, D) latent, got shape {tuple(z_t.shape)}."
            )
        batch = z_t.shape[0]
        self._check_mask(mask, tuple(z_t.shape[2:]), batch)
        cond = self._encode_mask(mask, z_t.dtype)
        x = torch.cat([z_t, cond], dim=1)
        if text_features is None or text_keep is None:
            out: Tensor = self.denoiser(x, timesteps, text_features, text_mask)
            return out

        if text_features.shape[0] != batch:
            raise GuideGenInputError(
                f"text_features has batch size {text_features.shape[0]} (shape {tuple(text_features.shape)}) but "
                f"z_t has {batch}; pass one prompt per latent."
            )
        if text_keep.shape != (batch,) or text_keep.dtype != torch.bool:
            raise GuideGenInputError(
                f"text_keep must be a ({batch},) bool tensor (True: use the prompt), got shape "
                f"{tuple(text_keep.shape)} and dtype {text_keep.dtype}."
            )
        contexts = self.denoiser.injector(text_features, text_mask)
        keep = text_keep.to(x.device)[:, None, None]
        # torch.where rather than a product: a non-finite context must not leak into dropped samples (NaN·0 = NaN).
        # Zero contexts are exactly TextConditionedUNet's null prompt, so dropped samples get the unconditional
        # prediction.
        contexts = [None if c is None else torch.where(keep, c, torch.zeros_like(c)) for c in contexts]
        out = self.denoiser.unet(x, timesteps, contexts)
        return out


def build_latent_denoiser(
    latent_channels: int,
    num_classes: int,
    text_dim: int,
    mask_encoding: str = "onehot",
    mask_factor: int = 2,
    mask_embed_channels: int = 16,
    **architecture: Any,
) -> LatentDenoiser:
    """Build the latent CT generator's noise predictor of Eq. 10-11 from plain hyper-parameters.

    Args:
        latent_channels: channels of the autoencoder's latent.
        num_classes: number N of mask classes.
        text_dim: hidden size of the text encoder's token features.
        mask_encoding: ``"onehot"``, ``"fractions"`` or ``"learned"`` (see :class:`LatentDenoiser`).
        mask_factor: mask voxels per latent voxel along each axis.
        mask_embed_channels: output channels of the :class:`MaskEncoder` (``"learned"`` only).
        **architecture: keyword arguments of
            :func:`~custom_components.networks.factory.build_text_conditioned_unet` (``channels``,
            ``num_res_blocks``, ``cross_attention_levels``, ``self_attention_levels``, ``num_head_channels``,
            ``norm_num_groups``, ``use_checkpointing``, ``num_queries``, ``injection_dim``, ``injection_layers``,
            ``injection_heads``, ``dropout``).

    Returns:
        the composed :class:`LatentDenoiser`.

    Raises:
        GuideGenInputError: for an unknown architecture key or inconsistent settings.
    """
    fixed = {"in_channels", "out_channels", "text_dim"}  # derived from the latent and mask settings
    allowed = set(inspect.signature(build_text_conditioned_unet).parameters) - fixed
    unknown = sorted(set(architecture) - allowed)
    if unknown:
        raise GuideGenInputError(
            f"unknown latent-denoiser architecture keys {unknown}; allowed keys are {sorted(allowed)}."
        )
    if mask_encoding not in MASK_ENCODINGS:
        raise GuideGenInputError(f"mask_encoding must be one of {MASK_ENCODINGS}, got {mask_encoding!r}.")
    encoder = MaskEncoder(num_classes, mask_embed_channels, mask_factor) if mask_encoding == "learned" else None
    cond_channels = num_classes if encoder is None else encoder.out_channels
    denoiser = build_text_conditioned_unet(latent_channels + cond_channels, latent_channels, text_dim, **architecture)
    return LatentDenoiser(denoiser, latent_channels, num_classes, mask_encoding, mask_factor, encoder)
