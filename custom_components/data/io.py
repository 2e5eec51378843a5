"""Reading files with checks: NIfTI volumes read with clear errors, grids and affines, digests.

Nothing here writes a file (writing lives in :mod:`custom_components.data.writers`), so the in-memory pipelines
can use it. :func:`file_digest` is the package's one file-hashing helper (model files, text encoder weights, latent
cache and run manifests).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from custom_components.errors import GuideGenInputError

__all__ = [
    "NIFTI_SUFFIXES",
    "strip_nifti_suffix",
    "find_nifti",
    "file_digest",
    "json_digest",
    "centred_affine",
    "load_nifti",
    "read_volume",
    "check_voxel_spacing",
    "check_same_grid",
    "check_same_field_of_view",
    "labels_on_grid",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def strip_nifti_suffix(name: str) -> str | None:
    """File name without its NIfTI suffix, or None when it is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``<folder>/<stem>.nii.gz`` or ``<folder>/<stem>.nii``, whichever exists first; None when neither does."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def file_digest(path: str | os.PathLike, hash_type: str = "sha256", chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks so a large weight file never has to fit in memory.

    Args:
        path: the file.
        hash_type: a :func:`hashlib.new` name (sha256, md5, ...).
        chunk_bytes: bytes read at a time.

    Returns:
        the lowercase hex digest.
    """
    digest = hashlib.new(hash_type)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_digest(payload: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable value, independent of key order (values JSON cannot hold are
    written with ``str``): a fingerprint of settings or a class map rather than of a file.

    Args:
        payload: the value.

    Returns:
        the lowercase hex digest.
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with the given voxel size whose field of view is centred on the world origin.

    Volumes without a scanner position (phantoms, generated masks) use it, so a mask and a CT covering the
    same field of view at different resolutions stay aligned.
    """
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape, dtype=np.float64) - 1.0) * np.asarray(spacing, dtype=np.float64)
    return affine


def load_nifti(path: str | os.PathLike, what: str) -> nib.Nifti1Image:
    """Open a NIfTI file and make sure its header is readable.

    Args:
        path: the file.
        what: what the file is meant to be, for messages (e.g. ``"CT of case 'abc'"``).

    Raises:
        GuideGenInputError: missing or not a readable NIfTI file.
    """
    path = Path(path)
    if not path.is_file():
        raise GuideGenInputError(f"{what}: file {path} not found")
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for damaged files
        raise GuideGenInputError(f"{what}: {path} is not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise GuideGenInputError(f"{what}: {path} is a {type(image).__name__}, expected NIfTI (.nii or .nii.gz)")
    return image


def read_volume(image: nib.Nifti1Image, what: str, dtype: Any = np.float32, check_finite: bool = False) -> np.ndarray:
    """Voxel data of a NIfTI image as a 3D array.

    Args:
        image: an image from :func:`load_nifti`.
        what: description for messages.
        dtype: array type to return.
        check_finite: reject NaN and infinite voxels.

    Returns:
        the (X, Y, Z) array; a trailing singleton 4th dimension is dropped.

    Raises:
        GuideGenInputError: the data cannot be decompressed, is not 3D, or holds NaN/Inf when checked.
    """
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise GuideGenInputError(
            f"{what}: {image.get_filename()} has shape {image.shape}; expected a 3D volume (X, Y, Z)"
        )
    try:
        data = np.asarray(image.dataobj, dtype=dtype).reshape(shape)
    except Exception as err:  # truncated gzip streams surface as EOFError, OSError, zlib.error ...
        raise GuideGenInputError(
            f"{what}: {image.get_filename()} is corrupt, its voxel data cannot be read ({type(err).__name__}: {err})"
        ) from err
    if check_finite and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise GuideGenInputError(
            f"{what}: {image.get_filename()} holds {bad} NaN/Inf voxels; fix or re-export the volume"
        )
    return data


def check_voxel_spacing(image: nib.Nifti1Image, what: str) -> None:
    """Require a usable voxel size: finite and positive in the header and in the affine.

    nibabel silently turns a zero ``pixdim`` into 1 mm and a negative one into its absolute value, and passes
    NaN through, so such a file would be written with a wrong physical size; the header is therefore read
    again as stored. ``pixdim`` only matters when no sform sets the affine.

    Args:
        image: an image from :func:`load_nifti`.
        what: what the file is meant to be, for messages.

    Raises:
        GuideGenInputError: naming the file, the stored voxel size and the fix.
    """
    fix = (
        "set the true voxel size in mm (e.g. nibabel: img.header.set_zooms((0.8, 0.8, 2.5)), or re-export the "
        "NIfTI from the DICOM series with dcm2niix)"
    )
    path = image.get_filename()
    header = image.header
    if path is not None and int(header["sform_code"]) == 0:
        with nib.openers.ImageOpener(path) as handle:
            stored = type(header).from_fileobj(handle, check=False)
        pixdim = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
            raise GuideGenInputError(f"{what}: {path} has voxel size pixdim[1:4] = {pixdim.tolist()} mm; {fix}")
    spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise GuideGenInputError(
            f"{what}: {path} has voxel size {spacing.tolist()} mm in its affine (sform/qform, pixdim); {fix}"
        )


def check_same_grid(
    reference: nib.Nifti1Image, other: nib.Nifti1Image, what: str, atol_mm: float = 1e-3
) -> None:
    """Require two images to share voxel grid: same 3D shape and the same affine within ``atol_mm``.

    Raises:
        GuideGenInputError: naming both files, both shapes or both affines.
    """
    ref_shape, other_shape = reference.shape[:3], other.shape[:3]
    if ref_shape != other_shape:
        raise GuideGenInputError(
            f"{what}: {other.get_filename()} has shape {other_shape} but {reference.get_filename()} has "
            f"{ref_shape}; they must be on the same voxel grid (resample the mask onto the CT)"
        )
    if not np.allclose(reference.affine, other.affine, atol=atol_mm, rtol=0):
        raise GuideGenInputError(
            f"{what}: the affine of {other.get_filename()} differs from {reference.get_filename()} "
            f"(max difference {np.abs(reference.affine - other.affine).max():.4g} mm); they must share "
            f"orientation, spacing and origin.\n{np.round(other.affine, 4)}\nvs\n{np.round(reference.affine, 4)}"
        )


def _world_corners(image: nib.Nifti1Image) -> np.ndarray:
    """World coordinates (mm) of the outer corners of the volume's first and last voxels."""
    shape = np.asarray(image.shape[:3], dtype=np.float64)
    corners = np.array([[-0.5, -0.5, -0.5], shape - 0.5])
    return nib.affines.apply_affine(image.affine, corners)


def check_same_field_of_view(reference: nib.Nifti1Image, other: nib.Nifti1Image, what: str) -> None:
    """Require two images to cover the same box in world space, possibly at different resolutions.

    GuideGen keeps masks coarser than CTs (paper: 128³ masks, 256³ CTs), so a mask need not share the CT's voxel
    grid, but it must describe the same body: the outer corners may differ by at most one voxel of the
    coarser image.

    Raises:
        GuideGenInputError: naming both files, shapes and the corner mismatch in mm.
    """
    tolerance = max(max(nib.affines.voxel_sizes(reference.affine)), max(nib.affines.voxel_sizes(other.affine)))
    difference = float(np.abs(_world_corners(reference) - _world_corners(other)).max())
    if difference > tolerance + 1e-3:
        raise GuideGenInputError(
            f"{what}: {other.get_filename()} (shape {other.shape[:3]}) and {reference.get_filename()} (shape "
            f"{reference.shape[:3]}) do not cover the same field of view (corners differ by {difference:.1f} mm, "
            f"more than one voxel, {tolerance:.1f} mm); pass the mask that belongs to this CT, or resample it onto the CT"
        )


def labels_on_grid(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A label volume resampled (nearest neighbour) to ``shape`` over the same field of view; unchanged if it fits.

    With ``shape`` an integer multiple of the labels' grid (paper: 128³ masks, 256³ CTs) every output voxel takes the
    label of the voxel it lies in, exactly.
    """
    import torch
    import torch.nn.functional as F

    if tuple(labels.shape) == tuple(shape):
        return labels
    resized = F.interpolate(torch.as_tensor(labels.astype(np.float32))[None, None], size=tuple(shape), mode="nearest")
    return resized[0, 0].numpy().astype(labels.dtype)
