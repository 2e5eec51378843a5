"""Small building blocks shared by GuideGen's 3D networks."""

from __future__ import annotations

from monai.networks.blocks import Convolution

__all__ = ["same_conv3d"]


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
