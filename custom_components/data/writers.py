"""Writing files atomically: NIfTI volumes, JSON and PNG previews.

Every write goes to a temporary file in the destination folder and is renamed into place, so a crash or a killed
process never leaves a half-written file under the final name. Only the runs that write (``custom_components.runs``,
``prepare``, the demo data, the trainer's savers) import this module; the in-memory pipelines never do.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

__all__ = ["atomic_write", "save_nifti", "write_json", "save_preview"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file through a temporary sibling and rename it into place.

    Args:
        path: final destination; its folder is created.
        write: called with the temporary path (which keeps the destination's suffixes, so format detection
            by extension works) and must write the whole file there.

    Returns:
        the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any) -> Path:
    """Atomically save a 3D array as NIfTI with the given affine (also set as qform and sform).

    Args:
        array: voxel data.
        affine: 4x4 voxel -> world (RAS+, mm) matrix.
        path: destination (``.nii.gz`` compresses).
        dtype: on-disk data type, e.g. ``np.int16`` for HU or ``np.uint8`` for labels.
    """
    image = nib.Nifti1Image(np.asarray(array).astype(dtype), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return atomic_write(path, lambda temporary: nib.save(image, str(temporary)))


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write an object as indented JSON."""
    text = json.dumps(obj, indent=1, default=_json_default) + "\n"
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_preview(image: Image.Image, path: str | os.PathLike) -> Path:
    """Atomically save a preview as PNG."""
    return atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))
