"""Stage 2 pipeline: CT (HU) + mask <-> latent with the anatomy-aware HDR autoencoder, and reconstruction checks.

The network works on intensities scaled from the full CT range (:data:`~custom_components.data.intensity.HU_MIN`
.. ``HU_MAX``) to [-1, 1]; this module converts at its edges, pads volumes to a multiple of the network's
downsampling factor, and encodes/decodes slab by slab along the first axis (:func:`~custom_components.networks.stream_encode`,
:func:`~custom_components.networks.stream_decode`: exact, every voxel computed once) so that 256³ and 512³ volumes fit
a fixed memory budget.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from custom_components.data.intensity import CT_WINDOWS, HU_MIN, hu_to_unit, unit_to_hu, windowed_psnr
from custom_components.errors import GuideGenInputError
from custom_components.networks import MaskGuidedAutoencoder, stream_decode, stream_encode

__all__ = [
    "load_autoencoder",
    "AutoencoderPipeline",
    "reconstruction_metrics",
]


def load_autoencoder(model_path: str | os.PathLike, class_map: Any, device: torch.device | str = "cpu") -> MaskGuidedAutoencoder:
    """The trained stage II autoencoder, rebuilt from the architecture in its model file, frozen, in eval mode.

    Args:
        model_path: ``guidegen_autoencoder/models/model.pt`` (or another autoencoder model file).
        class_map: the class map in use (:class:`~custom_components.data.class_map.ClassMap`); must match the one
            the autoencoder was trained with when it takes the mask pyramid (``mask_input``); an image-only
            autoencoder works with any class map.
        device: where to put it.

    Raises:
        GuideGenInputError: missing/unreadable file, another stage's file, or another class count.
    """
    from custom_components.networks.checkpoints import CheckpointInfo, load_model_weights, network_from_info, read_checkpoint_info

    if not Path(model_path).is_file():
        raise GuideGenInputError(
            f"autoencoder checkpoint {model_path} not found: train the guidegen_autoencoder bundle first (it writes "
            "models/model.pt) or pass --autoencoder_path"
        )
    info = read_checkpoint_info(model_path, stage="autoencoder")
    network = network_from_info(info, class_map.num_classes)
    if info.get("mask_input", True):
        expected = CheckpointInfo("autoencoder", class_map.num_classes, class_map.name)
    else:  # an image-only autoencoder never sees a mask: it serves any class map (e.g. with and without the body class)
        expected = CheckpointInfo("autoencoder", int(info["num_classes"]), str(info["class_map_name"]))
    load_model_weights(model_path, network, expected, "cpu")
    return network.to(device).eval().requires_grad_(False)


class AutoencoderPipeline:
    """Encode CTs to latents and decode latents to CTs, in Hounsfield units, slab by slab.

    A ``norm="voxel"`` network (the default) streams: it runs along the first axis a slab of rows at a time, keeping
    only the rows later slabs still need (:mod:`custom_components.networks.streaming`); the result equals the
    whole-volume pass up to float rounding and memory does not grow with the first axis. A ``norm="group"`` network
    cannot stream (GroupNorm's statistics span the whole volume): it runs on the whole volume in one pass, with a
    warning.

    Args:
        network: a :class:`~custom_components.networks.MaskGuidedAutoencoder` (weights loaded).
        device: where to run.
        encode_tile: image rows fed to the encoder per step (the slab thickness); memory grows with it, the work
            does not.
        decode_tile: latent rows fed to the decoder per step (each becomes ``f`` image rows); memory grows with it,
            the work does not.
        progress: show progress bars over slabs.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        device: torch.device | str = "cpu",
        encode_tile: int = 4,
        decode_tile: int = 1,
        progress: bool = False,
    ) -> None:
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.encode_tile = int(encode_tile)
        self.decode_tile = int(decode_tile)
        self.progress = progress
        self._warned = False

    @property
    def factor(self) -> int:
        """Downsampling factor between image and latent grids."""
        return int(self.network.downsample_factor)

    def _streams(self, what: str) -> bool:
        """Whether the network streams exactly (``norm="voxel"``); otherwise warn once that it runs untiled."""
        if getattr(self.network, "norm", "voxel") == "voxel":
            return True
        if not self._warned:
            warnings.warn(
                f"this autoencoder uses norm={self.network.norm!r}: GroupNorm normalises with statistics of the whole "
                f"volume, so it cannot {what} slab by slab and runs on the whole volume at once (memory grows with the "
                "volume: a 256^3 decode at paper widths needs about 52 GiB). Networks with norm='voxel' stream in "
                "bounded memory.",
                stacklevel=3,
            )
            self._warned = True
        return False

    def _mask(self, mask: torch.Tensor | np.ndarray | None, batch: int) -> torch.Tensor | None:
        if not getattr(self.network, "num_classes", 0):
            return None
        if mask is None:
            raise GuideGenInputError("this autoencoder was trained with masks (num_classes > 0): pass the label volume")
        mask = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
        while mask.ndim < 5:
            mask = mask.unsqueeze(0)
        if mask.shape[0] != batch:
            raise GuideGenInputError(f"{mask.shape[0]} masks for {batch} volumes; pass one mask per volume")
        return mask.to(self.device)

    @torch.no_grad()
    def encode(self, image_hu: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Latent means of CT volumes.

        Args:
            image_hu: (X, Y, Z) or (B, 1, X, Y, Z) CT in HU; each edge must be a multiple of :attr:`factor`
                (see :meth:`reconstruct` for padding).
            mask: class volume(s) over the same field of view, any resolution (None for mask-free networks).

        Returns:
            (B, latent_channels, X/f, Y/f, Z/f) latent means.
        """
        image = torch.as_tensor(np.asarray(image_hu) if isinstance(image_hu, np.ndarray) else image_hu).float()
        while image.ndim < 5:
            image = image.unsqueeze(0)
        image = hu_to_unit(image.to(self.device))
        mask = self._mask(mask, image.shape[0])
        if self._streams("encode"):
            z_mu, _ = stream_encode(self.network, image, mask, slab_rows=self.encode_tile, progress=self.progress)
        else:
            z_mu, _ = self.network.encode(image, mask)
        return z_mu

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, mask: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """CT volumes (HU, float) from latents.

        Args:
            latent: (B, latent_channels, *latent_size).
            mask: class volume(s) over the same field of view, any resolution.

        Returns:
            (B, 1, *latent_size × f) CT in HU on the CPU.
        """
        latent = latent.to(self.device).float()
        mask = self._mask(mask, latent.shape[0])
        if self._streams("decode"):
            decoded = stream_decode(self.network, latent, mask, slab_rows=self.decode_tile, progress=self.progress)
        else:
            decoded = self.network.decode(latent, mask)
        return unit_to_hu(decoded.clamp(-1, 1)).cpu()

    def reconstruct(self, image_hu: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Encode and decode one CT; volumes whose edges are not multiples of f are padded (air) and cropped back.

        Args:
            image_hu: (X, Y, Z) CT in HU.
            mask: (X', Y', Z') class volume over the same field of view, or None.

        Returns:
            (X, Y, Z) float32 reconstruction in HU.
        """
        shape = image_hu.shape
        padded, mask_tensor = self.pad_to_factor(image_hu, mask)
        latent = self.encode(padded, mask_tensor)
        decoded = self.decode(latent, mask_tensor)[0, 0].numpy()
        return decoded[: shape[0], : shape[1], : shape[2]]

    def pad_to_factor(self, image_hu: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, torch.Tensor | None]:
        """Pad a CT with air at the far end of each axis to a multiple of :attr:`factor`, and its mask with it.

        Args:
            image_hu: (X, Y, Z) CT in HU.
            mask: (X', Y', Z') class volume over the same field of view, or None.

        Returns:
            the padded float32 CT and, for networks that take masks, the mask as a (1, 1, *padded) tensor on the
            padded CT grid (None otherwise).
        """
        shape = image_hu.shape
        pad = [(0, -(-n // self.factor) * self.factor - n) for n in shape]
        padded = np.pad(image_hu.astype(np.float32), pad, constant_values=HU_MIN)
        if mask is None or not getattr(self.network, "num_classes", 0):
            return padded, None
        # Bring the mask onto the CT grid before padding, so that padding does not shift its field of view.
        on_grid = F.interpolate(torch.as_tensor(mask.astype(np.float32))[None, None], size=shape, mode="nearest")
        return padded, F.pad(on_grid, [v for p in reversed(pad) for v in p])


def reconstruction_metrics(reference_hu: np.ndarray, reconstruction_hu: np.ndarray, windows: Mapping[str, Sequence[float]] = CT_WINDOWS) -> dict[str, float]:
    """PSNR in each CT window and the mean absolute error in HU over the whole volume.

    Returns:
        ``{"psnr_<window>": dB, ..., "mae_hu": value}``.
    """
    metrics = {f"psnr_{name}": windowed_psnr(reference_hu, reconstruction_hu, tuple(window)) for name, window in windows.items()}
    metrics["mae_hu"] = float(np.abs(reference_hu.astype(np.float64) - reconstruction_hu).mean())
    return metrics
