"""Exact slab-wise evaluation (along the first spatial axis) of the diffusion U-Net, for inference at 128³.

At 128³ a 64-channel feature map takes 512 MiB, and a plain forward pass of a residual block holds several at once
(the concatenated decoder input, its GroupNorm, its SiLU, both convolution outputs) next to the skips. Here every
convolution is computed a slab of rows at a time, with the GroupNorm + SiLU before it applied to that slab only (the
statistics of the whole volume are gathered first) and a concatenated input convolved part by part, so the only
full-size tensors are the ones the network must keep: the skips, a block's input and its output (written over its
intermediate). Maps read by a single consumer (an upsampling) or cheap to recompute (the input convolution) are
:class:`LazyRows`, never stored. The result equals the plain forward pass up to float rounding (tested). One TCSS
forward pass at 128³ and paper widths needs 2.0 GiB above its input instead of 7.2 GiB, for ≈ 9 % more time on a
CPU (BENCHMARKS.md). Gradients are not supported: training uses checkpointing instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LazyRows",
    "conv_in_slabs",
    "conv_rows",
    "cross_attention_in_slabs",
    "group_norm_scale_shift",
    "materialize",
    "norm_silu_conv_in_slabs",
    "resblock_in_slabs",
    "upsample_conv_rows",
]

RowSource = Callable[[int, int], Tensor]
# rows of a convolution's input, whole or split by channels (the parts of a concatenation that is never formed)
InputRows = Callable[[int, int], Union[Tensor, Sequence[Tensor]]]


@dataclass(frozen=True)
class LazyRows:
    """A (B, C, X, Y, Z) feature map that is never stored: ``compute(lo, hi)`` returns its rows ``[lo, hi)``.

    Used for maps that are cheaper to recompute than to keep (the U-Net's input convolution, whose output is a skip
    needed again only at the very end, and the decoder's upsampling, consumed by one block).

    Attributes:
        shape: the full shape.
        compute: rows ``[lo, hi)`` of the first spatial axis.
    """

    shape: tuple[int, ...]
    compute: RowSource


Part = Union[Tensor, LazyRows]


def _part_rows(part: Part, lo: int, hi: int) -> Tensor:
    return part.compute(lo, hi) if isinstance(part, LazyRows) else part[:, :, lo:hi]


def materialize(part: Part, slab_rows: int) -> Tensor:
    """The whole tensor of a :class:`LazyRows` (computed ``slab_rows`` rows at a time); a tensor as it is."""
    if isinstance(part, Tensor):
        return part
    out: Tensor | None = None
    for lo, hi in _row_ranges(part.shape[2], slab_rows):
        rows = part.compute(lo, hi)
        if out is None:
            out = rows.new_empty(part.shape)
        out[:, :, lo:hi] = rows
    assert out is not None
    return out


def _conv3d(module: nn.Module) -> nn.Conv3d:
    """The ``nn.Conv3d`` inside MONAI's ``Convolution`` (or the module itself)."""
    conv = getattr(module, "conv", module)
    if not isinstance(conv, nn.Conv3d):
        raise TypeError(f"expected a 3D convolution, got {type(module).__name__}")
    return conv


def _row_ranges(total: int, slab_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + slab_rows, total)) for start in range(0, total, slab_rows)]


def group_norm_scale_shift(norm: nn.GroupNorm, parts: Sequence[Part], slab_rows: int) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel ``scale`` and ``shift`` with ``norm(cat(parts, 1)) == x * scale + shift``.

    Each slab's per-channel mean and variance are combined in float64, so no full-size temporary is made.

    Args:
        norm: the GroupNorm (its groups, eps and affine parameters are used).
        parts: (B, C_i, X, Y, Z) tensors (or :class:`LazyRows`) whose channel concatenation is the norm's input.
        slab_rows: rows of the first spatial axis per accumulation step.

    Returns:
        scale, shift: (B, C, 1, 1, 1) in the parts' dtype.
    """
    sums, squares = [], []  # per channel: sum of x and of x² over the volume, from each slab's exact moments
    dtype = norm.weight.dtype
    for index, part in enumerate(parts):
        s = torch.zeros(part.shape[:2], dtype=torch.float64, device=norm.weight.device)
        q = torch.zeros_like(s)
        for lo, hi in _row_ranges(part.shape[2], slab_rows):
            rows = _part_rows(part, lo, hi)
            dtype = rows.dtype if index == 0 else dtype
            var, mean = torch.var_mean(rows.float(), dim=(2, 3, 4), correction=0)
            count = rows[0, 0].numel()
            s += count * mean.double()
            q += count * (var.double() + mean.double().square())
        sums.append(s)
        squares.append(q)
    channel_sum, channel_square = torch.cat(sums, 1), torch.cat(squares, 1)
    batch, channels = channel_sum.shape
    if channels != norm.num_channels:
        raise ValueError(f"the GroupNorm expects {norm.num_channels} channels, the inputs have {channels}")
    voxels = parts[0].shape[2] * parts[0].shape[3] * parts[0].shape[4]
    count = voxels * (channels // norm.num_groups)
    group_mean = channel_sum.view(batch, norm.num_groups, -1).sum(-1) / count
    group_var = (channel_square.view(batch, norm.num_groups, -1).sum(-1) / count - group_mean.square()).clamp_min(0)
    rstd = (group_var + norm.eps).rsqrt()
    scale = rstd.repeat_interleave(channels // norm.num_groups, dim=1)
    shift = -group_mean.repeat_interleave(channels // norm.num_groups, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double() + norm.bias.double()
    return scale.to(dtype)[..., None, None, None], shift.to(dtype)[..., None, None, None]


def _normalized_rows(
    parts: Sequence[Part], scale: Tensor | None, shift: Tensor | None, silu: bool = True
) -> Callable[[int, int], list[Tensor]]:
    """Rows ``[lo, hi)`` of ``silu(norm(cat(parts)))`` (or of ``cat(parts)`` without a norm), one new tensor per part.

    The parts stay separate: the GroupNorm's scale and shift are per channel, and a convolution of a concatenation
    is the sum of the convolutions of its parts (:func:`_conv_rows_from`), so the concatenation is never formed.
    """
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + part.shape[1])

    def rows(lo: int, hi: int) -> list[Tensor]:
        out = []
        for part, start, stop in zip(parts, offsets[:-1], offsets[1:]):
            x = _part_rows(part, lo, hi)
            x = x.clone() if isinstance(part, Tensor) else x
            if scale is not None and shift is not None:
                x.mul_(scale[:, start:stop]).add_(shift[:, start:stop])
                if silu:
                    F.silu(x, inplace=True)
            out.append(x)
        return out

    return rows


def _as_parts(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _input_window(conv: nn.Conv3d, lo: int, hi: int) -> tuple[int, int]:
    """Input rows ``[first, last)`` (possibly outside the volume: zero padding) that output rows ``[lo, hi)`` read."""
    kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return lo * stride - pad, (hi - 1) * stride - pad + kernel


def _conv_rows_from(
    conv: nn.Conv3d, x: Tensor | Sequence[Tensor], first: int, last: int, input_rows: int
) -> Tensor:
    """Convolve input rows ``[max(first, 0), min(last, input_rows))``, zero-padded to ``[first, last)``.

    ``x`` may be split by channels: the result is the sum of each part's convolution with its slice of the weight.
    """
    parts = [x] if isinstance(x, Tensor) else list(x)
    a, b = max(first, 0), min(last, input_rows)
    pad, stride = conv.padding, conv.stride
    out: Tensor | None = None
    start = 0
    for index, part in enumerate(parts):
        weight = conv.weight[:, start:start + part.shape[1]]
        start += part.shape[1]
        if first < a or last > b:
            part = F.pad(part, (0, 0, 0, 0, a - first, last - b))
        y = F.conv3d(part, weight, conv.bias if index == 0 else None, stride=stride, padding=(0, pad[1], pad[2]))
        out = y if out is None else out.add_(y)
    if start != conv.in_channels:
        raise ValueError(f"the convolution takes {conv.in_channels} channels, its input rows have {start}")
    assert out is not None
    return out


def conv_in_slabs(
    conv_module: nn.Module,
    source: InputRows,
    input_rows: int,
    slab_rows: int,
    channel_bias: Tensor | None = None,
    residual: RowSource | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """A zero-padded 3D convolution computed ``slab_rows`` output rows at a time.

    Args:
        conv_module: the convolution (odd kernel, any stride, padding ``kernel // 2``).
        source: rows ``[lo, hi)`` of the convolution's (already activated) input, for ``0 <= lo < hi <= input_rows``,
            as one tensor or split by channels; new tensors, or views that stay valid while ``out`` is written.
        input_rows: size of the input along the first spatial axis.
        slab_rows: output rows per step.
        channel_bias: (B, C_out) added to every output voxel (the time embedding of a residual block).
        residual: rows ``[lo, hi)`` of a tensor added to the output (a residual block's skip connection).
        out: where to write the result (default: a new tensor). May be the tensor ``source`` reads from (stride 1,
            same shape): the input rows a later slab still needs are computed before they are overwritten.

    Returns:
        (B, C_out, X_out, Y_out, Z_out).
    """
    conv = _conv3d(conv_module)
    output_rows = (input_rows + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    overwrites_input = out is not None
    kept_from, kept = 0, None  # input rows [kept_from, ...) computed before ``out`` overwrote them
    for lo, hi in _row_ranges(output_rows, slab_rows):
        first, last = _input_window(conv, lo, hi)
        a, b = max(first, 0), min(last, input_rows)
        if kept is not None:
            kept_to = kept_from + kept[0].shape[2]
            fresh = _as_parts(source(kept_to, b)) if b > kept_to else None
            x = [k[:, :, a - kept_from:b - kept_from] if fresh is None else torch.cat([k[:, :, a - kept_from:], f], 2)
                 for k, f in zip(kept, fresh or kept)]
        else:
            x = _as_parts(source(a, b))
        if overwrites_input and hi < output_rows:
            next_first = max(_input_window(conv, hi, hi + 1)[0], 0)
            kept_from, kept = next_first, ([p[:, :, next_first - a:hi - a].clone() for p in x] if next_first < hi else None)
        y = _conv_rows_from(conv, x, first, last, input_rows)
        del x
        if channel_bias is not None:
            y += channel_bias[..., None, None, None]
        if residual is not None:
            y += residual(lo, hi)
        if out is None:
            out = y.new_empty(y.shape[:2] + (output_rows,) + y.shape[3:])
        out[:, :, lo:hi] = y
    assert out is not None
    return out


def resblock_in_slabs(block: nn.Module, parts: Sequence[Part], emb: Tensor, slab_rows: int) -> Tensor:
    """A timestep-conditioned residual block (MONAI's ``DiffusionUNetResnetBlock`` layout) on ``cat(parts, 1)``.

    ``out = conv2(silu(norm2(h))) + skip(x)`` with ``h = conv1(silu(norm1(x))) + W·silu(emb)``, ``x = cat(parts)``;
    the concatenation is never materialised and ``out`` is written over ``h``.

    Args:
        block: the residual block (norm1, conv1, time_emb_proj, norm2, conv2, skip_connection; dropout is inactive
            at inference).
        parts: (B, C_i, X, Y, Z) inputs, tensors or :class:`LazyRows` (a decoder block gets the previous output and
            a skip).
        emb: (B, temb) time embedding.
        slab_rows: rows per step.

    Returns:
        (B, C_out, X, Y, Z).
    """
    rows = parts[0].shape[2]
    scale, shift = group_norm_scale_shift(block.norm1, parts, slab_rows)
    time_bias = block.time_emb_proj(F.silu(emb))
    h = conv_in_slabs(block.conv1, _normalized_rows(parts, scale, shift), rows, slab_rows, channel_bias=time_bias)
    scale, shift = group_norm_scale_shift(block.norm2, [h], slab_rows)
    skip = block.skip_connection
    raw = _normalized_rows(parts, None, None)
    if isinstance(skip, nn.Identity):

        def residual(lo: int, hi: int) -> Tensor:
            return torch.cat(raw(lo, hi), 1)

    else:
        skip_conv = _conv3d(skip)

        def residual(lo: int, hi: int) -> Tensor:
            return _conv_rows_from(skip_conv, raw(lo, hi), lo, hi, rows)

    return conv_in_slabs(block.conv2, _normalized_rows([h], scale, shift), rows, slab_rows, residual=residual, out=h)


def conv_rows(conv_module: nn.Module, x: Tensor) -> LazyRows:
    """A 'same' stride-1 convolution of ``x`` as :class:`LazyRows` (each request convolves its rows and halo).

    ``x`` may be a one-hot in an integer or bool dtype: each request converts only its own rows to the weight's dtype.
    """
    conv = _conv3d(conv_module)
    rows = x.shape[2]

    def compute(lo: int, hi: int) -> Tensor:
        first, last = _input_window(conv, lo, hi)
        window = x[:, :, max(first, 0):min(last, rows)]
        return _conv_rows_from(conv, window if window.is_floating_point() else window.to(conv.weight.dtype), first, last, rows)

    return LazyRows((x.shape[0], conv.out_channels) + tuple(x.shape[2:]), compute)


def _phase_kernels(weight: Tensor) -> list[list[list[Tensor]]]:
    """The 2×2×2 kernels equivalent to a 3×3×3 kernel applied after nearest ×2 upsampling, per output phase.

    Along one axis, output row ``2i`` sees input rows ``i-1, i, i`` through taps ``0, 1, 2`` (so taps 1 and 2 add
    up), and output row ``2i+1`` sees ``i, i, i+1`` (taps 0 and 1 add up).
    """
    def fold(w: Tensor, dim: int, phase: int) -> Tensor:
        t0, t1, t2 = w.unbind(dim)
        return torch.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], dim)

    return [[[fold(fold(fold(weight, 2, px), 3, py), 4, pz) for pz in (0, 1)] for py in (0, 1)] for px in (0, 1)]


def cross_attention_in_slabs(block: nn.Module, x: Tensor, context: Tensor, slab_rows: int) -> Tensor:
    """:class:`~custom_components.networks.unet.VoxelCrossAttention` a slab of voxels at a time, added into ``x``.

    Each voxel attends to the context tokens independently, so only the GroupNorm needs the whole volume (its
    statistics are gathered first).

    Args:
        block: the cross-attention block (norm, to_q, to_k, to_v, out_proj, num_heads).
        x: (B, C, X, Y, Z) features; overwritten with the result.
        context: (B, T, context_dim) tokens.
        slab_rows: rows per step.

    Returns:
        ``x``.
    """
    scale, shift = group_norm_scale_shift(block.norm, [x], slab_rows)
    normalized = _normalized_rows([x], scale, shift, silu=False)
    k = block.to_k(context).unflatten(-1, (block.num_heads, -1)).transpose(1, 2)  # (B, heads, T, d)
    v = block.to_v(context).unflatten(-1, (block.num_heads, -1)).transpose(1, 2)
    for lo, hi in _row_ranges(x.shape[2], slab_rows):
        rows = x[:, :, lo:hi]
        h = normalized(lo, hi)[0].flatten(2).transpose(1, 2)  # (B, N, C)
        q = block.to_q(h).unflatten(-1, (block.num_heads, -1)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        a = block.out_proj(a.transpose(1, 2).flatten(2))
        rows += a.transpose(1, 2).reshape(rows.shape)
    return x


def upsample_conv_rows(upsample: nn.Module, low: Tensor) -> LazyRows:
    """MONAI's ``UpSample`` (nearest ×2 on every axis, then a 3×3×3 'same' convolution) as :class:`LazyRows`.

    Computed on the low-resolution grid with one 2×2×2 kernel per output phase (:func:`_phase_kernels`): 8 × 8 taps
    per low-resolution voxel instead of 8 × 27, and the upsampled input is never formed.

    Args:
        upsample: the module (its ``postconv`` must be a 3×3×3 stride-1 convolution with padding 1).
        low: (B, C, X, Y, Z) input.

    Returns:
        the (B, C_out, 2X, 2Y, 2Z) output.
    """
    conv = _conv3d(upsample.postconv)
    if conv.kernel_size != (3, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (1, 1, 1):
        raise ValueError("upsample_conv_rows needs a 3x3x3 stride-1 post-convolution with padding 1")
    kernels = _phase_kernels(conv.weight)
    rows_low = low.shape[2]

    def compute(lo: int, hi: int) -> Tensor:
        i0, i1 = lo // 2, (hi - 1) // 2 + 1  # low rows whose two output rows cover [lo, hi)
        a, b = max(i0 - 1, 0), min(i1 + 1, rows_low)
        x = F.pad(low[:, :, a:b], (1, 1, 1, 1, a - (i0 - 1), (i1 + 1) - b))  # (B, C, n + 2, Y + 2, Z + 2)
        n, ny, nz = i1 - i0, low.shape[3], low.shape[4]
        out = x.new_empty((x.shape[0], conv.out_channels, 2 * n, 2 * ny, 2 * nz))
        for px in (0, 1):
            for py in (0, 1):
                for pz in (0, 1):
                    window = x[:, :, px:px + n + 1, py:py + ny + 1, pz:pz + nz + 1]
                    out[:, :, px::2, py::2, pz::2] = F.conv3d(window, kernels[px][py][pz], conv.bias)
        return out[:, :, lo - 2 * i0:hi - 2 * i0]

    return LazyRows((low.shape[0], conv.out_channels, 2 * rows_low, 2 * low.shape[3], 2 * low.shape[4]), compute)


def norm_silu_conv_in_slabs(norm: nn.GroupNorm, conv_module: nn.Module, x: Tensor, slab_rows: int) -> Tensor:
    """``conv(silu(norm(x)))`` (the U-Net's output head) a slab at a time."""
    scale, shift = group_norm_scale_shift(norm, [x], slab_rows)
    return conv_in_slabs(conv_module, _normalized_rows([x], scale, shift), x.shape[2], slab_rows)
