"""Tiled encoding and decoding of volumes too large for one pass of the :class:`MaskGuidedAutoencoder`.

A 512³ CT does not fit one decoder pass on most GPUs (the full-resolution level alone holds ``channels[0]`` feature
maps of 512³ voxels). These helpers cut the output into non-overlapping tiles; each tile is computed from an input
crop enlarged by a *halo* on every side (clipped at the volume border), and the halo part of the result is thrown
away. The autoencoder has no attention, so an output voxel depends only on inputs within its receptive radius
(:attr:`~MaskGuidedAutoencoder.decoder_receptive_radius`, :attr:`~MaskGuidedAutoencoder.encoder_receptive_radius`);
with a halo at least that wide and ``norm="voxel"`` (no spatial statistics) the tiled result equals the untiled one
up to float rounding. With ``norm="group"`` every tile gets its own GroupNorm statistics, so the result is only an
approximation (a warning says so).

The mask is resampled once to the full image grid and cropped at the window matching each tile, so every tile sees
exactly the mask pyramid the untiled pass would.
"""

from __future__ import annotations

import itertools
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from custom_components.errors import GuideGenInputError
from custom_components.networks.autoencoder import MaskGuidedAutoencoder

__all__ = ["tiled_decode", "tiled_encode"]

_SPATIAL_DIMS = 3


def _tile_sizes(tile_size: int | Sequence[int], name: str) -> tuple[int, ...]:
    """``tile_size`` as one positive int per spatial axis."""
    sizes = (tile_size,) * _SPATIAL_DIMS if isinstance(tile_size, numbers.Integral) else tuple(tile_size)
    if len(sizes) != _SPATIAL_DIMS or any(not isinstance(t, numbers.Integral) or t < 1 for t in sizes):
        raise GuideGenInputError(
            f"{name} must be a positive int or {_SPATIAL_DIMS} positive ints (one per axis), got {tile_size!r}."
        )
    return tuple(int(t) for t in sizes)


def _check_halo(halo: int, name: str) -> int:
    if not isinstance(halo, numbers.Integral) or halo < 0:
        raise GuideGenInputError(f"{name} must be an int >= 0, got {halo!r}.")
    return int(halo)


def _warn_if_approximate(autoencoder: MaskGuidedAutoencoder, num_tiles: int, what: str) -> None:
    """One warning per call when tiles would have GroupNorm statistics of their own."""
    if autoencoder.norm != "voxel" and num_tiles > 1:
        warnings.warn(
            f"{what} with norm={autoencoder.norm!r}: each of the {num_tiles} tiles is normalised with its own "
            "GroupNorm statistics, so the result only approximates the untiled pass (seams are possible). Networks "
            "built with norm='voxel' tile exactly.",
            stacklevel=3,
        )


_Window = tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]


def _windows(size: Sequence[int], tile: Sequence[int], halo: int) -> list[_Window]:
    """Per tile: (output window, enlarged input crop, output window relative to the crop), in input-grid units."""
    per_axis = []
    for n, t in zip(size, tile):
        axis = []
        for start in range(0, n, t):
            stop = min(start + t, n)
            lo, hi = max(start - halo, 0), min(stop + halo, n)
            axis.append((slice(start, stop), slice(lo, hi), slice(start - lo, stop - lo)))
        per_axis.append(axis)
    return [tuple(zip(*combo)) for combo in itertools.product(*per_axis)]  # type: ignore[misc]


def _scaled(window: tuple[slice, ...], factor: int) -> tuple[slice, ...]:
    return tuple(slice(s.start * factor, s.stop * factor) for s in window)


def _network_placement(autoencoder: MaskGuidedAutoencoder) -> tuple[torch.device, torch.dtype]:
    param = next(autoencoder.parameters())
    return param.device, param.dtype


def _label_levels(labels: Tensor | None, num_levels: int) -> list[Tensor] | None:
    """Per-level class indices of a full-resolution label crop that starts on a multiple of ``2**(num_levels-1)``."""
    if labels is None:
        return None
    return [labels[(...,) + (slice(None, None, 2**i),) * _SPATIAL_DIMS] for i in range(num_levels)]


def _tiled_pass(
    step: Callable[[Tensor, list[Tensor] | None], Tensor],
    source: Tensor,
    labels: Tensor | None,
    num_levels: int,
    factor: int,
    out_channels: int,
    tile: Sequence[int],
    halo: int,
    placement: tuple[torch.device, torch.dtype],
    desc: str,
    progress: bool,
) -> Tensor:
    """Run ``step(crop, label_levels)`` over halo-enlarged crops of ``source`` (latent grid) and keep each inner part.

    ``step`` maps a latent-grid crop to an output ``factor`` times finer; ``labels`` are full-resolution class
    indices, cropped at the matching image-space window.
    """
    device, dtype = placement
    size = tuple(source.shape[2:])
    out = torch.empty((source.shape[0], out_channels, *(n * factor for n in size)), dtype=dtype, device=source.device)
    label_factor = 2 ** (num_levels - 1)
    for target, crop, inner in tqdm(_windows(size, tile, halo), desc=desc, disable=not progress):
        part = source[(slice(None), slice(None), *crop)].to(device=device, dtype=dtype)
        label_crop = None if labels is None else labels[(slice(None), slice(None), *_scaled(crop, label_factor))].to(device)
        result = step(part, _label_levels(label_crop, num_levels))
        out[(slice(None), slice(None), *_scaled(target, factor))] = result[
            (slice(None), slice(None), *_scaled(inner, factor))
        ].to(out.device)
    return out


def tiled_decode(
    autoencoder: MaskGuidedAutoencoder,
    z: Tensor,
    mask: Tensor | None = None,
    tile_size: int | Sequence[int] = 32,
    halo: int | None = None,
    progress: bool = False,
) -> Tensor:
    """``autoencoder.decode(z, mask)`` computed tile by tile, under ``torch.no_grad()``, in two passes.

    Pass 1 runs the decoder's latent-resolution head (``conv_in`` and the lowest level's blocks; cheap per voxel
    but the widest receptive field in latent voxels) tile by tile with its own small halo and keeps its output for
    the whole latent grid (``channels[-1]`` maps at latent size). Pass 2 runs the expensive finer levels on tiles
    of that output with the halo of those levels only
    (:attr:`~MaskGuidedAutoencoder.decoder_tail_receptive_radius`), about half the halo of one pass, so tiles
    recompute much less of their neighbours.

    Args:
        autoencoder: the autoencoder (its mode is left as is; it has no dropout or batch statistics).
        z: (B, latent_channels, h, w, d) latent, on any device (tiles are moved to the network's device).
        mask: (B, 1, *any_size) class indices over the field of view, ``None`` iff ``num_classes == 0``.
        tile_size: output tile edge in *latent* voxels (one int, or one per axis); the last tile of an axis may be
            smaller.
        halo: latent voxels of context for the pass-2 tiles; default
            :attr:`~MaskGuidedAutoencoder.decoder_tail_receptive_radius`, which makes the result exact for
            ``norm="voxel"`` (pass 1 always uses its exact halo).
        progress: show a tqdm progress bar over the tiles.

    Returns:
        (B, out_channels, h*f, w*f, d*f) image on ``z``'s device, in the network's dtype.

    Raises:
        GuideGenInputError: for a bad latent, mask, ``tile_size`` or ``halo``.
    """
    autoencoder._check_latent(z)
    f = autoencoder.downsample_factor
    latent_size = tuple(z.shape[2:])
    full_size = tuple(s * f for s in latent_size)
    tile = tuple(min(t, n) for t, n in zip(_tile_sizes(tile_size, "tile_size"), latent_size))
    halo = _check_halo(autoencoder.decoder_tail_receptive_radius if halo is None else halo, "halo")
    # Resampled once to the image grid: every tile then crops the same labels at its image-space window.
    pyramid = autoencoder.mask_pyramid(mask, full_size, batch_size=z.shape[0])
    labels = None if pyramid is None else pyramid[0]
    _warn_if_approximate(autoencoder, len(_windows(latent_size, tile, halo)), "tiled_decode")
    placement = _network_placement(autoencoder)
    decoder, levels = autoencoder.decoder, autoencoder.num_levels

    def run(function: Callable[..., Tensor], *args: Any) -> Tensor:
        return function(*args)

    def head(part: Tensor, label_levels: list[Tensor] | None) -> Tensor:
        return decoder.head(autoencoder.post_quant_conv(part), label_levels, run)

    def tail(part: Tensor, label_levels: list[Tensor] | None) -> Tensor:
        return decoder.tail(part, label_levels, run)

    # Pass-1 tiles may be large: the head runs at latent resolution.
    head_tile = tuple(min(2 * t, n) for t, n in zip(tile, latent_size))
    with torch.no_grad():
        features = _tiled_pass(
            head, z, labels, levels, 1, autoencoder.channels[-1], head_tile, autoencoder.decoder_head_receptive_radius, placement, "tiled decode (latent level)", progress,
        )
        return _tiled_pass(tail, features, labels, levels, f, autoencoder.out_channels, tile, halo, placement, "tiled decode", progress)


def tiled_encode(
    autoencoder: MaskGuidedAutoencoder,
    image: Tensor,
    mask: Tensor | None = None,
    tile_size: int | Sequence[int] = 128,
    halo: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """``autoencoder.encode(image, mask)`` computed tile by tile, under ``torch.no_grad()``.

    Args:
        autoencoder: the autoencoder.
        image: (B, in_channels, H, W, D), each edge a multiple of the downsampling factor ``f``; any device.
        mask: (B, 1, *any_size) class indices over the field of view, ``None`` iff ``num_classes == 0``.
        tile_size: output tile edge in *image* voxels (one int, or one per axis), rounded down to a multiple of
            ``f`` so that tiles fall on the latent grid.
        halo: image voxels of context added on each side of a tile, rounded up to a multiple of ``f``; default
            :attr:`~MaskGuidedAutoencoder.encoder_receptive_radius`, which makes the result exact for
            ``norm="voxel"``.
        progress: show a tqdm progress bar over the tiles.

    Returns:
        ``(z_mu, z_sigma)``, each (B, latent_channels, H/f, W/f, D/f) on ``image``'s device, in the network's dtype.

    Raises:
        GuideGenInputError: for a bad image, mask or ``halo``, or a ``tile_size`` smaller than ``f``.
    """
    autoencoder._check_image(image)
    f = autoencoder.downsample_factor
    image_size = tuple(image.shape[2:])
    requested = _tile_sizes(tile_size, "tile_size")
    if any(t < f for t in requested):
        raise GuideGenInputError(
            f"tile_size {tile_size!r} is smaller than the downsampling factor f={f}; encoder tiles must hold at "
            f"least one latent voxel, use a multiple of {f}."
        )
    # Tiles, crops and the halo all start on multiples of f, so every crop's downsampling grid is the volume's.
    tile = tuple(min(t // f, n // f) for t, n in zip(requested, image_size))
    halo = _check_halo(autoencoder.encoder_receptive_radius if halo is None else halo, "halo")
    halo_latent = -(-halo // f)
    pyramid = autoencoder.mask_pyramid(mask, image_size, batch_size=image.shape[0])
    labels = None if pyramid is None else pyramid[0]
    latent_size = tuple(n // f for n in image_size)
    windows = _windows(latent_size, tile, halo_latent)
    _warn_if_approximate(autoencoder, len(windows), "tiled_encode")

    device, dtype = _network_placement(autoencoder)
    shape = (image.shape[0], autoencoder.latent_channels, *latent_size)
    z_mu = torch.empty(shape, dtype=dtype, device=image.device)
    z_sigma = torch.empty(shape, dtype=dtype, device=image.device)
    with torch.no_grad():
        for target, crop, inner in tqdm(windows, desc="tiled encode", disable=not progress):
            image_crop = _scaled(crop, f)
            x = image[(slice(None), slice(None), *image_crop)].to(device=device, dtype=dtype)
            m_crop = None if labels is None else labels[(slice(None), slice(None), *image_crop)].to(device)
            mu, sigma = autoencoder.encode(x, m_crop)
            keep = (slice(None), slice(None), *inner)
            z_mu[(slice(None), slice(None), *target)] = mu[keep].to(z_mu.device)
            z_sigma[(slice(None), slice(None), *target)] = sigma[keep].to(z_sigma.device)
    return z_mu, z_sigma
