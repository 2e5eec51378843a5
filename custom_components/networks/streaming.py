"""Exact streaming (slab-wise) encoding and decoding with the :class:`MaskGuidedAutoencoder`, each voxel computed once.

The 3D-halo tiles of :mod:`custom_components.networks.tiling` bound memory by recomputing a halo around every tile:
with 8-latent-voxel tiles the decoder's fine levels do (8 + 12)³ / 8³ ≈ 16× the work of the volume. Here the network
instead runs along the first spatial axis, a slab of rows at a time, as a chain of *row streams*: every operation
produces its output rows in order and keeps, in a rolling buffer, only the input rows that its next output rows
still need (a 3×3×3 convolution the last two rows, a stride-2 downsampling one, an ×2 upsampling one low-resolution
row; a residual block also keeps its input rows until its shortcut has added them). Each stage passes on every
output row its buffered input already determines, at most one input slab's worth at a time (so neither the start
nor the end of the volume piles the chain's receptive field up into one big slab). Every row of every level is
computed exactly once, as in the untiled pass (tested: the same convolution work), and memory holds a few rows per
convolution instead of whole maps: decoding one latent row per step, a full-resolution convolution holds 6 rows.

This is exact because the autoencoder has no attention and, with ``norm="voxel"``, no statistics over space: each
row's result depends only on neighbouring rows, so computing it from the same rows in another order gives the same
numbers up to float rounding (tested: equal to the untiled pass within 1e-4). GroupNorm normalises with statistics of
the whole volume, which do not exist until the layer before has been computed for every row; streaming it would
need one pass over the volume per normalisation layer, so :func:`stream_decode` and :func:`stream_encode` refuse
``norm="group"`` networks with an error rather than silently running them another way (untiled, a 256³ decode at
paper widths needs ≈ 52 GiB; tiled, the result is approximate): the caller chooses. The
:class:`~custom_components.pipelines.AutoencoderPipeline` runs them untiled, with a warning: exact, as trained.

The ×2 upsamplings (nearest neighbour, then a 3×3×3 convolution) are computed on the low-resolution grid with one
2×2×2 kernel per output phase, as :func:`custom_components.networks.slabs.upsample_conv_rows` does: the same result
up to float rounding, with 8 instead of 27 taps per output voxel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from custom_components.errors import GuideGenInputError
from custom_components.networks.autoencoder import _LOGVAR_RANGE, MaskGuidedAutoencoder, _one_hot
from custom_components.networks.slabs import _conv3d, _phase_kernels

__all__ = ["stream_decode", "stream_encode", "check_streamable"]


# A convolution call on fewer output voxels than this wastes time on its fixed costs (a 384-channel latent row of a 32³
# CT has 64 voxels): stages at coarse levels gather several rows per call. 2**15 voxels is one row of a 181² image,
# so at 256³ only the latent level (64² per row: 8 rows, 50 MB at 384 channels) and level 1 (2 rows) gather.
_MIN_VOXELS_PER_CALL = 1 << 15


class _Stage:
    """A (B, C, rows, Y, Z) map produced as consecutive slabs of rows: iterating yields them in order (a generator
    per run; a slab may be as small as one row). Every stage consumes its source's slabs as they come and yields
    every output row its buffered input already determines, so no stage ever holds much more than one slab."""

    rows: int

    def __iter__(self) -> Iterator[Tensor]:
        raise NotImplementedError


class _TensorRows(_Stage):
    """Rows of a stored tensor (on any device), ``chunk`` at a time, moved to the network's device and dtype."""

    def __init__(self, x: Tensor, chunk: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.x, self.chunk, self.device, self.dtype = x.shape[2], x, chunk, device, dtype

    def __iter__(self) -> Iterator[Tensor]:
        for lo in range(0, self.rows, self.chunk):
            yield self.x[:, :, lo:lo + self.chunk].to(device=self.device, dtype=self.dtype)


class _Map(_Stage):
    """A voxel-wise function ``fn(rows, lo, hi)`` of another stage's rows ``[lo, hi)`` (no buffer: rows are used once)."""

    def __init__(self, source: _Stage, fn: Callable[[Tensor, int, int], Tensor]) -> None:
        self.rows, self.source, self.fn = source.rows, source, fn

    def __iter__(self) -> Iterator[Tensor]:
        lo = 0
        for rows in self.source:
            n = rows.shape[2]
            out = [self.fn(rows, lo, lo + n)]
            del rows
            yield out.pop()  # not bound in this frame while suspended: the consumer alone decides when it is freed
            lo += n


class _Window:
    """A rolling buffer of a stage's rows: holds rows ``[lo, hi)``."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None
        self.lo = 0

    @property
    def hi(self) -> int:
        return self.lo + (0 if self.buf is None else self.buf.shape[2])

    def append(self, rows: Tensor) -> None:
        self.buf = rows if self.buf is None or self.buf.shape[2] == 0 else torch.cat([self.buf, rows], 2)

    def rows(self, first: int, last: int, total: int, pad_yz: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Tensor:
        """Rows ``[first, last)``, zero outside ``[0, total)``, with ``pad_yz`` zeros on the other two axes."""
        a, b = max(first, 0), min(last, total)
        assert self.buf is not None and self.lo <= a and b <= self.hi, (first, last, self.lo, self.hi)
        window = self.buf[:, :, a - self.lo:b - self.lo]
        pad = (*pad_yz, a - first, last - b)
        return F.pad(window, pad) if any(pad) else window

    def drop_before(self, row: int) -> None:
        """Forget the rows below ``row`` (nothing later reads them)."""
        if self.buf is None:
            return
        start = min(max(row - self.lo, 0), self.buf.shape[2])
        kept = self.buf[:, :, start:]
        # A small remainder is copied out, so the slab it was cut from is freed before the next one is computed.
        self.buf = kept.clone() if 2 * kept.shape[2] <= self.buf.shape[2] else kept
        self.lo += start


class _Buffered(_Stage):
    """A stage whose output rows ``[lo, hi)`` read source rows ``[first(lo), last(hi))``: source rows are buffered
    until no later output row reads them, and each output row is computed as soon as its input rows are there."""

    def __init__(self, source: _Stage, rows: int) -> None:
        self.source, self.rows = source, rows
        self.window = _Window()

    def _last(self, hi: int) -> int:
        """One past the last source row that output rows below ``hi`` read."""
        raise NotImplementedError

    def _ready(self, available: int, hi: int) -> int:
        """How many output rows source rows ``[0, available)`` determine (all when the source is complete), counting
        on from the ``hi`` already computed."""
        if available >= self.source.rows:
            return self.rows
        while hi < self.rows and self._last(hi + 1) <= available:
            hi += 1
        return hi

    def _compute(self, lo: int, hi: int) -> Tensor:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Tensor]:
        self.window = _Window()
        done = 0
        least = 0  # output rows per convolution call below which it waits for more input (see _MIN_VOXELS_PER_CALL)
        for rows in self.source:
            if not least:
                out_voxels_per_row = rows.shape[3] * rows.shape[4] * (self.rows / self.source.rows) ** 2
                least = max(1, math.ceil(_MIN_VOXELS_PER_CALL / out_voxels_per_row))
            # Output rows go on in pieces of ``least`` rows: otherwise a stage would pass on as one slab everything
            # a large input slab determines (the rows a coarse level gathered, times 2 per upsampling; or, when the
            # last input rows arrive, all its remaining rows: its share of the chain's receptive field).
            cap = least
            self.window.append(rows)
            del rows
            hi = self._ready(self.window.hi, done)
            if hi < min(done + least, self.rows):
                continue
            while done < hi:
                step = min(hi, done + cap)
                yield self._compute(done, step)
                done = step
        assert done == self.rows, (type(self).__name__, done, self.rows)


class _Conv(_Buffered):
    """A 3D convolution along the stream (MONAI ``Convolution`` or ``nn.Conv3d``), or, with ``asymmetric_pad``, MONAI's
    ``AEKLDownsample`` (zero pad 1 at the far end of each axis, then the stride-2 convolution without padding)."""

    def __init__(self, source: _Stage, module: nn.Module, asymmetric_pad: bool = False) -> None:
        conv = _conv3d(module)
        self.conv = conv
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        if asymmetric_pad:
            if any(p != 0 for p in conv.padding):
                raise ValueError("an AEKLDownsample convolution has no padding of its own")
            self.pad_lo, self.pad_yz, self.conv_padding = 0, (0, 1, 0, 1), (0, 0, 0)
            rows = (source.rows + 1 - self.kernel) // self.stride + 1
        else:
            self.pad_lo, self.pad_yz, self.conv_padding = conv.padding[0], (0, 0, 0, 0), (0, conv.padding[1], conv.padding[2])
            rows = (source.rows + 2 * self.pad_lo - self.kernel) // self.stride + 1
        super().__init__(source, rows)

    def _last(self, hi: int) -> int:
        return (hi - 1) * self.stride - self.pad_lo + self.kernel

    def _compute(self, lo: int, hi: int) -> Tensor:
        first = lo * self.stride - self.pad_lo
        window = self.window.rows(first, self._last(hi), self.source.rows, self.pad_yz)
        out = F.conv3d(window, self.conv.weight, self.conv.bias, stride=self.conv.stride, padding=self.conv_padding)
        del window
        self.window.drop_before(hi * self.stride - self.pad_lo)
        return out


class _Upsample(_Buffered):
    """MONAI's non-trainable ``UpSample`` (nearest ×2, then a 3×3×3 'same' convolution), computed on the
    low-resolution grid with one 2×2×2 kernel per output phase (see :func:`~custom_components.networks.slabs._phase_kernels`).

    Output row ``2i`` reads low rows ``i - 1, i``; row ``2i + 1`` reads ``i, i + 1``.
    """

    def __init__(self, source: _Stage, upsample: nn.Module) -> None:
        conv = _conv3d(upsample.postconv)
        if conv.kernel_size != (3, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (1, 1, 1):
            raise ValueError("streaming needs the upsampling's post-convolution to be 3x3x3, stride 1, padding 1")
        interp = getattr(upsample, "upsample_non_trainable", None)
        scale = getattr(interp, "scale_factor", None)
        scales = scale if isinstance(scale, tuple) else (scale,) * 3
        if getattr(interp, "mode", None) != "nearest" or any(s is None or float(s) != 2.0 for s in scales):
            raise ValueError("streaming needs a nearest-neighbour x2 upsampling on every axis")
        super().__init__(source, 2 * source.rows)
        self.kernels = _phase_kernels(conv.weight)
        self.bias, self.out_channels = conv.bias, conv.out_channels

    def _last(self, hi: int) -> int:
        return hi // 2 + 1

    def _compute(self, lo: int, hi: int) -> Tensor:
        first = (lo - 1) // 2  # the first low row output rows [lo, hi) read
        window = self.window.rows(first, self._last(hi), self.source.rows, (1, 1, 1, 1))  # (B, C, n, Y + 2, Z + 2)
        ny, nz = window.shape[3] - 2, window.shape[4] - 2
        out = window.new_empty((window.shape[0], self.out_channels, hi - lo, 2 * ny, 2 * nz))
        for px in (0, 1):
            i0, i1 = (lo - px + 1) // 2, (hi - px + 1) // 2  # output rows 2i + px for i in [i0, i1)
            m = i1 - i0
            if m <= 0:
                continue
            start = i0 - 1 + px - first  # the window row of low row i0 - 1 + px
            target = 2 * i0 + px - lo
            for py in (0, 1):
                for pz in (0, 1):
                    part = window[:, :, start:start + m + 1, py:py + ny + 1, pz:pz + nz + 1]
                    out[:, :, target:target + 2 * m - 1:2, py::2, pz::2] = F.conv3d(part, self.kernels[px][py][pz], self.bias)
        del window
        self.window.drop_before((hi - 1) // 2)
        return out


class _Tee(_Stage):
    """Passes its source's rows on and keeps them in ``window`` for a second, later reader (who drops them)."""

    def __init__(self, source: _Stage) -> None:
        self.rows, self.source = source.rows, source
        self.window = _Window()

    def __iter__(self) -> Iterator[Tensor]:
        self.window = _Window()
        for rows in self.source:
            self.window.append(rows)
            out = [rows]
            del rows
            yield out.pop()


def _norm_silu(norm: nn.Module) -> Callable[[Tensor, int, int], Tensor]:
    def fn(x: Tensor, lo: int, hi: int) -> Tensor:
        return F.silu(norm(x), inplace=True)

    return fn


class _ResBlock(_Stage):
    """``conv2(silu(norm2(conv1(silu(norm1(x)))))) + nin_shortcut(x)``: the convolutions read ahead (2 rows of ``x``),
    the shortcut reads ``x`` at the output rows, so ``x``'s rows are kept until it has."""

    def __init__(self, source: _Stage, block: nn.Module) -> None:
        self.rows, self.block = source.rows, block
        self.x = _Tee(source)
        h = _Conv(_Map(self.x, _norm_silu(block.norm1)), block.conv1)
        self.h = _Conv(_Map(h, _norm_silu(block.norm2)), block.conv2)

    def __iter__(self) -> Iterator[Tensor]:
        lo = 0
        for out in self.h:
            hi = lo + out.shape[2]
            out += self.block.nin_shortcut(self.x.window.rows(lo, hi, self.rows))
            self.x.window.drop_before(hi)
            box = [out]
            del out
            yield box.pop()
            lo = hi


def _labels_then(labels: Tensor | None, num_classes: int, before: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor, int, int], Tensor]:
    """Rows -> ``before(rows)`` concatenated with the one-hot of the same rows of ``labels`` (a level's class indices)."""

    def fn(x: Tensor, lo: int, hi: int) -> Tensor:
        if before is not None:
            x = before(x)
        if labels is None:
            return x
        return torch.cat([x, _one_hot(labels[:, :, lo:hi].to(x.device), num_classes, x.dtype)], 1)

    return fn


def _level(stream: _Stage, level: nn.Module, labels: Tensor | None, num_classes: int, downsample: bool) -> _Stage:
    """One ``_Level`` of the encoder or decoder: mask fusion, residual blocks, then its down- or upsampling."""
    if level.fuse is not None and labels is not None:
        stream = _Conv(_Map(stream, _labels_then(labels, num_classes)), level.fuse)
    for block in level.res_blocks:
        stream = _ResBlock(stream, block)
    if level.resample is not None:
        stream = _Conv(stream, level.resample.conv, asymmetric_pad=True) if downsample else _Upsample(stream, level.resample)
    return stream


def _decoder_stream(autoencoder: MaskGuidedAutoencoder, z: _Stage, labels: list[Tensor] | None) -> _Stage:
    """``autoencoder._decode`` (post_quant_conv, then ``_Decoder.forward``) as a row stream."""
    decoder, num_classes = autoencoder.decoder, autoencoder.num_classes
    post_quant = autoencoder.post_quant_conv
    stream: _Stage = _Conv(_Map(z, lambda x, lo, hi: post_quant(x)), decoder.conv_in)
    n = len(decoder.levels)
    for i, level in enumerate(decoder.levels):  # lowest resolution first; levels[i] serves pyramid level n - 1 - i
        stream = _level(stream, level, None if labels is None else labels[n - 1 - i], num_classes, downsample=False)
    stream = _Conv(_Map(stream, _norm_silu(decoder.norm_out)), decoder.conv_out)
    shift, scale = decoder.output_shift, decoder.output_scale
    if shift != 0.0 or scale != 1.0:
        stream = _Map(stream, lambda x, lo, hi: x * scale + shift)
    return stream


def _encoder_stream(autoencoder: MaskGuidedAutoencoder, image: _Stage, labels: list[Tensor] | None) -> _Stage:
    """``autoencoder._encode`` up to the quantisation convolutions (intensity normalisation, ``_Encoder.forward``)."""
    encoder, num_classes = autoencoder.encoder, autoencoder.num_classes
    shift, scale = autoencoder.intensity_shift, autoencoder.intensity_scale
    normalise = (lambda x: (x - shift) / scale) if shift != 0.0 or scale != 1.0 else None
    stream: _Stage = _Conv(_Map(image, _labels_then(None if labels is None else labels[0], num_classes, normalise)), encoder.conv_in)
    for i, level in enumerate(encoder.levels):
        stream = _level(stream, level, None if labels is None else labels[i], num_classes, downsample=True)
    return _Conv(_Map(stream, _norm_silu(encoder.norm_out)), encoder.conv_out)


def check_streamable(autoencoder: Any) -> None:
    """Raise unless ``autoencoder`` can be streamed exactly (a :class:`MaskGuidedAutoencoder` with ``norm="voxel"``).

    Raises:
        GuideGenInputError: another network, or ``norm="group"`` (whose statistics span the whole volume).
    """
    if not isinstance(autoencoder, MaskGuidedAutoencoder):
        raise GuideGenInputError(f"streaming encode/decode needs a MaskGuidedAutoencoder, got {type(autoencoder).__name__}.")
    if autoencoder.norm != "voxel":
        raise GuideGenInputError(
            f"streaming encode/decode needs norm='voxel', but this autoencoder uses norm={autoencoder.norm!r}: GroupNorm "
            "normalises with statistics of the whole volume, which a slab-by-slab pass does not have. Decode it "
            "untiled (autoencoder.decode, memory grows with the volume) or approximately with tiled_decode/tiled_encode."
        )


def _slab_rows(slab_rows: int, name: str) -> int:
    if not isinstance(slab_rows, numbers.Integral) or isinstance(slab_rows, bool) or slab_rows < 1:
        raise GuideGenInputError(f"{name} must be an int >= 1, got {slab_rows!r}.")
    return int(slab_rows)


def _placement(autoencoder: MaskGuidedAutoencoder) -> tuple[torch.device, torch.dtype]:
    param = next(autoencoder.parameters())
    return param.device, param.dtype


def stream_decode(
    autoencoder: MaskGuidedAutoencoder,
    z: Tensor,
    mask: Tensor | None = None,
    slab_rows: int = 1,
    progress: bool = False,
) -> Tensor:
    """``autoencoder.decode(z, mask)`` computed slab by slab along the first spatial axis, under ``torch.no_grad()``.

    Args:
        autoencoder: the autoencoder, ``norm="voxel"`` (its mode is left as is; it has no dropout or batch statistics).
        z: (B, latent_channels, h, w, d) latent, on any device (slabs are moved to the network's device).
        mask: (B, 1, *any_size) class indices over the field of view, ``None`` iff ``num_classes == 0``.
        slab_rows: latent rows fed in per step (each becomes ``f`` image rows); memory grows with it, the work does
            not (every voxel is computed once whatever the slab).
        progress: show a tqdm progress bar over the image rows.

    Returns:
        (B, out_channels, h*f, w*f, d*f) image on ``z``'s device, in the network's dtype; equal to the untiled
        decode up to float rounding.

    Raises:
        GuideGenInputError: for a bad latent, mask or ``slab_rows``, or a ``norm="group"`` network.
    """
    check_streamable(autoencoder)
    autoencoder._check_latent(z)
    slab = _slab_rows(slab_rows, "slab_rows")
    f = autoencoder.downsample_factor
    full_size = tuple(s * f for s in z.shape[2:])
    labels = autoencoder.mask_pyramid(mask, full_size, batch_size=z.shape[0])
    device, dtype = _placement(autoencoder)
    out = torch.empty((z.shape[0], autoencoder.out_channels, *full_size), dtype=dtype, device=z.device)
    with torch.no_grad(), tqdm(total=full_size[0], desc="streaming decode", unit="row", disable=not progress) as bar:
        lo = 0
        for rows in _decoder_stream(autoencoder, _TensorRows(z, slab, device, dtype), labels):
            out[:, :, lo:lo + rows.shape[2]] = rows.to(out.device)
            lo += rows.shape[2]
            bar.update(rows.shape[2])
    return out


def stream_encode(
    autoencoder: MaskGuidedAutoencoder,
    image: Tensor,
    mask: Tensor | None = None,
    slab_rows: int = 4,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """``autoencoder.encode(image, mask)`` computed slab by slab along the first spatial axis, under ``torch.no_grad()``.

    Args:
        autoencoder: the autoencoder, ``norm="voxel"``.
        image: (B, in_channels, H, W, D), each edge a multiple of the downsampling factor ``f``; any device.
        mask: (B, 1, *any_size) class indices over the field of view, ``None`` iff ``num_classes == 0``.
        slab_rows: image rows fed in per step; memory grows with it, the work does not.
        progress: show a tqdm progress bar over the latent rows.

    Returns:
        ``(z_mu, z_sigma)``, each (B, latent_channels, H/f, W/f, D/f) on ``image``'s device, in the network's dtype;
        equal to the untiled encode up to float rounding.

    Raises:
        GuideGenInputError: for a bad image, mask or ``slab_rows``, or a ``norm="group"`` network.
    """
    check_streamable(autoencoder)
    autoencoder._check_image(image)
    slab = _slab_rows(slab_rows, "slab_rows")
    f = autoencoder.downsample_factor
    image_size = tuple(image.shape[2:])
    labels = autoencoder.mask_pyramid(mask, image_size, batch_size=image.shape[0])
    device, dtype = _placement(autoencoder)
    shape = (image.shape[0], autoencoder.latent_channels, *(n // f for n in image_size))
    z_mu = torch.empty(shape, dtype=dtype, device=image.device)
    z_sigma = torch.empty(shape, dtype=dtype, device=image.device)
    with torch.no_grad(), tqdm(total=shape[2], desc="streaming encode", unit="row", disable=not progress) as bar:
        lo = 0
        for h in _encoder_stream(autoencoder, _TensorRows(image, slab, device, dtype), labels):
            hi = lo + h.shape[2]
            z_mu[:, :, lo:hi] = autoencoder.quant_conv_mu(h).to(z_mu.device)
            log_var = torch.clamp(autoencoder.quant_conv_log_sigma(h), *_LOGVAR_RANGE)
            z_sigma[:, :, lo:hi] = torch.exp(log_var / 2).to(z_sigma.device)
            bar.update(h.shape[2])
            lo = hi
    return z_mu, z_sigma
