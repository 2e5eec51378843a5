"""Latent NIfTI files: a CT file encoded to a latent file and a latent file decoded to a CT file, and their grids.

The autoencoder is passed in (an :class:`~custom_components.pipelines.AutoencoderPipeline` or anything with its
``factor``, ``pad_to_factor``, ``encode`` and ``decode``), so this data-layer module, used by the latent cache
(:mod:`~custom_components.data.latent_cache`) and the autoencoder bundle's inference, imports no pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from custom_components.data.io import atomic_write, check_same_field_of_view, load_nifti, read_volume, save_nifti
from custom_components.errors import GuideGenInputError

__all__ = ["latent_affine", "image_affine", "read_matching_mask", "encode_file", "decode_file"]


def latent_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Voxel-to-world matrix of the latent grid: each latent voxel covers a block of ``factor``³ image voxels,
    centred on the block."""
    result = np.array(affine, dtype=np.float64)
    result[:3, 3] = nib.affines.apply_affine(affine, [(factor - 1) / 2.0] * 3)
    result[:3, :3] = affine[:3, :3] * factor
    return result


def image_affine(latent: np.ndarray, factor: int) -> np.ndarray:
    """Inverse of :func:`latent_affine`: the image grid's matrix from the latent grid's."""
    result = np.array(latent, dtype=np.float64)
    result[:3, :3] = latent[:3, :3] / factor
    result[:3, 3] = latent[:3, 3] - result[:3, :3] @ np.full(3, (factor - 1) / 2.0)
    return result


def read_matching_mask(path: str | os.PathLike | None, reference: nib.Nifti1Image, what: str) -> np.ndarray | None:
    """The label volume at ``path`` (int64), checked to cover ``reference``'s field of view; None without a path."""
    if path is None:
        return None
    mask_nii = load_nifti(path, f"mask for {what}")
    check_same_field_of_view(reference, mask_nii, what)
    return read_volume(mask_nii, f"mask for {what}", dtype=np.int64)


def encode_file(
    pipeline: Any, image_path: str | os.PathLike, mask_path: str | os.PathLike | None, output_path: str | os.PathLike
) -> Path:
    """Encode a CT NIfTI (HU) to a latent NIfTI (X/f, Y/f, Z/f, C; float32; affine of the latent grid).

    A CT whose edges are not multiples of f is padded with air at the far end first, so the latent covers the
    padded box and :func:`decode_file` returns the padded grid.
    """
    image_nii = load_nifti(image_path, "CT to encode")
    image = read_volume(image_nii, "CT to encode", check_finite=True)
    mask = read_matching_mask(mask_path, image_nii, f"CT {image_path}")
    padded, mask_tensor = pipeline.pad_to_factor(image, mask)
    latent = pipeline.encode(padded, mask_tensor)[0].cpu().numpy()
    latent_image = nib.Nifti1Image(np.moveaxis(latent, 0, -1).astype(np.float32), latent_affine(image_nii.affine, pipeline.factor))
    return atomic_write(output_path, lambda temporary: nib.save(latent_image, str(temporary)))


def decode_file(
    pipeline: Any, latent_path: str | os.PathLike, mask_path: str | os.PathLike | None, output_path: str | os.PathLike
) -> Path:
    """Decode a latent NIfTI (from :func:`encode_file` or the latent generator) to a CT NIfTI (int16 HU)."""
    latent_nii = load_nifti(latent_path, "latent to decode")
    if latent_nii.ndim != 4:
        raise GuideGenInputError(f"latent {latent_path} has shape {latent_nii.shape}; expected (X, Y, Z, channels)")
    latent = torch.as_tensor(np.moveaxis(np.asarray(latent_nii.dataobj, dtype=np.float32), -1, 0))[None]
    affine = image_affine(latent_nii.affine, pipeline.factor)
    mask = None
    if mask_path is not None:
        grid = nib.Nifti1Image(np.zeros([n * pipeline.factor for n in latent.shape[2:]], np.uint8), affine)
        mask = read_matching_mask(mask_path, grid, f"latent {latent_path}")
    decoded = pipeline.decode(latent, mask)[0, 0].numpy()
    return save_nifti(np.rint(decoded), affine, output_path, np.int16)
