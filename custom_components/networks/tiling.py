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
from collections.abc import Sequence

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


def tiled_decode(
    autoencoder: MaskGuidedAutoencoder,
    z: Tensor,
    mask: Tensor | None = None,
    tile_size: int | Sequence[int] = 32,
    halo: int | None = None,
    progress: bool = False,
) -> Tensor:
    """``autoencoder.decode(z, mask)`` computed tile by tile, under ``torch.no_grad()``.

    Args:
        autoencoder: the autoencoder (its mode is left as is; it has no dropout or batch statistics).
        z: (B, latent_channels, h, w, d) latent, on any device (tiles are moved to the network's device).
        mask: (B, 1, *any_size) class indices over the field of view, ``None`` iff ``num_classes == 0``.
        tile_size: output tile edge in *latent* voxels (one int, or one per axis); the last tile of an axis may be
            smaller.
        halo: latent voxels of context added on each side of a tile; default
            :attr:`~MaskGuidedAutoencoder.decoder_receptive_radius`, which makes the result exact for
            ``norm="voxel"``.
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
    halo = _check_halo(autoencoder.decoder_receptive_radius if halo is None else halo, "halo")
    # Resampled once to the image grid: every tile then crops the same labels at its image-space window.
    pyramid = autoencoder.mask_pyramid(mask, full_size, batch_size=z.shape[0])
    labels = None if pyramid is None else pyramid[0]
    windows = _windows(latent_size, tile, halo)
    _warn_if_approximate(autoencoder, len(windows), "tiled_decode")

    device, dtype = _network_placement(autoencoder)
    out = torch.empty((z.shape[0], autoencoder.out_channels, *full_size), dtype=dtype, device=z.device)
    with torch.no_grad():
        for target, crop, inner in tqdm(windows, desc="tiled decode", disable=not progress):
            z_crop = z[(slice(None), slice(None), *crop)].to(device=device, dtype=dtype)
            m_crop = None if labels is None else labels[(slice(None), slice(None), *_scaled(crop, f))].to(device)
            decoded = autoencoder.decode(z_crop, m_crop)
            out[(slice(None), slice(None), *_scaled(target, f))] = decoded[
                (slice(None), slice(None), *_scaled(inner, f))
            ].to(out.device)
    return out


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
