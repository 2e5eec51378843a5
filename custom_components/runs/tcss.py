"""Stage 1 run: generated masks written as NIfTI files with their prompt and a preview."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from custom_components.data.io import centred_affine
from custom_components.data.preview import render_preview
from custom_components.data.writers import save_nifti, save_preview, write_json

__all__ = ["save_masks"]


def save_masks(
    masks: torch.Tensor,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    spacing: Sequence[float],
    num_classes: int,
    prefix: str = "sample",
) -> list[Path]:
    """Write generated masks as NIfTI (uint8, RAS, given spacing) with their prompt and a PNG preview.

    Returns:
        the mask files, ``<output_dir>/<prefix>_<k>/mask.nii.gz``.
    """
    output_dir = Path(output_dir)
    written = []
    for index, (mask, prompt) in enumerate(zip(masks.numpy().astype(np.uint8), prompts)):
        folder = output_dir / f"{prefix}_{index:03d}"
        path = save_nifti(mask, centred_affine(mask.shape, spacing), folder / "mask.nii.gz", np.uint8)
        write_json({"prompt": prompt, "spacing_mm": list(map(float, spacing))}, folder / "prompt.json")
        save_preview(render_preview(np.full(mask.shape, -1000, np.int16), mask, num_classes, tuple(spacing)), folder / "preview.png")
        written.append(path)
    return written
