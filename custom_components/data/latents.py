"""Latent grids: the affine of a CT's latent and back, and the mask that must cover a CT's field of view.

Pure helpers shared by the autoencoder pipeline and the runs that write latent and CT files
(:func:`custom_components.runs.autoencoder.encode_file`, :func:`~custom_components.runs.autoencoder.decode_file`).
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from custom_components.data.io import check_same_field_of_view, load_nifti, read_volume

__all__ = ["latent_affine", "image_affine", "read_matching_mask"]


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
