"""Small building blocks shared by GuideGen's 3D networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedNetwork", "RecomputesNorms", "norm_silu", "same_conv3d"]


class RecomputesNorms:
    """Mixin of a residual block whose norm + SiLU pairs go through :func:`norm_silu`; ``recompute_norms`` is set
    by its :class:`CheckpointedNetwork`."""

    recompute_norms: bool = False


class CheckpointedNetwork(nn.Module):
    """A network with a ``use_checkpointing`` switch (recompute every block in the backward pass) that also reaches
    its :class:`RecomputesNorms` blocks. Set it after the blocks are built."""

    _use_checkpointing: bool = False

    @property
    def use_checkpointing(self) -> bool:
        """Whether training recomputes every block in the backward pass (and each block's norm + SiLU pairs, see
        :func:`norm_silu`); settable."""
        return self._use_checkpointing

    @use_checkpointing.setter
    def use_checkpointing(self, value: bool) -> None:
        self._use_checkpointing = bool(value)
        for module in self.modules():
            if isinstance(module, RecomputesNorms):
                module.recompute_norms = self._use_checkpointing


def _silu_of_norm(norm: nn.Module, x: Tensor) -> Tensor:
    return F.silu(norm(x))


def norm_silu(norm: nn.Module, x: Tensor, recompute: bool = False) -> Tensor:
    """``silu(norm(x))``, the pre-activation of every residual block.

    Args:
        norm: the normalisation (GroupNorm, or the autoencoder's VoxelNorm).
        x: its input.
        recompute: while autograd records, run the pair under a nested non-reentrant checkpoint. Plainly, the
            backward pass keeps the normalised map (SiLU's input) beside ``x`` (the norm's input) and the activated
            map (the next convolution's input); recomputed, it keeps only ``x``, which the block holds anyway, and
            recomputes the cheap pair from it in the backward pass: one full-size map fewer per norm inside a
            checkpointed block's recomputation, where the training peak sits (BENCHMARKS, training memory). Same
            values and gradients.

    Returns:
        the activated map, same shape as ``x``.
    """
    if recompute and torch.is_grad_enabled():
        out: Tensor = checkpoint(_silu_of_norm, norm, x, use_reentrant=False)
        return out
    return _silu_of_norm(norm, x)


def same_conv3d(in_channels: int, out_channels: int, kernel_size: int) -> Convolution:
    """A plain stride-1 'same' 3D convolution (MONAI's ``Convolution`` with ``conv_only=True``).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel edge; the padding keeps the spatial size.

    Returns:
        the convolution module.
    """
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=1,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        conv_only=True,
    )
