"""Stage 2 runs that write files: a CT file to a latent file and back, and reconstruction reports of a data set.

The autoencoder is passed in (an :class:`~custom_components.pipelines.AutoencoderPipeline`, or anything with its
``factor``, ``pad_to_factor``, ``encode``, ``decode`` and ``reconstruct``); the computing stays in the pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from custom_components.data.intensity import CT_WINDOWS
from custom_components.data.io import load_nifti, read_volume
from custom_components.data.latents import image_affine, latent_affine, read_matching_mask
from custom_components.data.preview import render_preview
from custom_components.data.writers import atomic_write, save_nifti, save_preview, write_json
from custom_components.errors import CaseError, GuideGenInputError
from custom_components.pipelines.autoencoder import AutoencoderPipeline, reconstruction_metrics

__all__ = ["encode_file", "decode_file", "reconstruct_cases"]


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


def _side_by_side(top: Image.Image, bottom: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height + 4))
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height + 4))
    return canvas


def reconstruct_cases(
    pipeline: AutoencoderPipeline,
    items: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    num_classes: int,
    windows: Mapping[str, Sequence[float]] = CT_WINDOWS,
) -> dict[str, Any]:
    """Reconstruct CTs through the autoencoder, write them with metrics and previews.

    For every item ``{"case_id", "image", "label"}`` writes ``<output_dir>/<case_id>/reconstruction.nii.gz``
    (int16 HU, the CT's affine), ``metrics.json`` and ``preview.png`` (original above reconstruction, mask
    overlaid); then ``<output_dir>/metrics.json`` (per case and mean) and ``metrics.md`` (a table).
    A case that cannot be read is reported in the summary and the others still run.

    Args:
        pipeline: the autoencoder pipeline.
        items: datalist entries with absolute ``image`` and ``label`` paths.
        output_dir: destination folder.
        num_classes: for the preview colours.
        windows: ``{name: (low, high)}`` HU windows for PSNR.

    Returns:
        the summary written to ``metrics.json``.

    Raises:
        GuideGenInputError: no items.
    """
    if not items:
        raise GuideGenInputError("no cases to reconstruct: the datalist split is empty")
    output_dir = Path(output_dir)
    per_case: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    for item in tqdm(items, desc="reconstructing", unit="case"):
        case_id = str(item.get("case_id") or Path(str(item["image"])).name.split(".")[0])
        try:
            image_nii = load_nifti(item["image"], f"CT of case '{case_id}'")
            image = read_volume(image_nii, f"CT of case '{case_id}'", check_finite=True)
            mask = read_matching_mask(item.get("label") or None, image_nii, f"case '{case_id}'")
            reconstruction = pipeline.reconstruct(image, mask)
        except GuideGenInputError as err:
            failed[case_id] = str(CaseError(case_id, str(err)))
            continue
        folder = output_dir / case_id
        save_nifti(np.rint(reconstruction), image_nii.affine, folder / "reconstruction.nii.gz", np.int16)
        metrics = reconstruction_metrics(image, reconstruction, windows)
        write_json(metrics, folder / "metrics.json")
        spacing = tuple(float(v) for v in image_nii.header.get_zooms()[:3])
        preview = _side_by_side(render_preview(image, mask, num_classes, spacing), render_preview(reconstruction, mask, num_classes, spacing))
        save_preview(preview, folder / "preview.png")
        per_case[case_id] = metrics
    names = sorted({name for metrics in per_case.values() for name in metrics})
    mean = {name: float(np.mean([m[name] for m in per_case.values()])) for name in names} if per_case else {}
    summary = {"cases": per_case, "mean": mean, "failed": failed, "windows_hu": {k: list(v) for k, v in windows.items()}}
    write_json(summary, output_dir / "metrics.json")
    lines = ["| case | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {case} | " + " | ".join(f"{m[n]:.2f}" for n in names) + " |" for case, m in per_case.items()]
    if per_case:
        lines.append("| **mean** | " + " | ".join(f"{mean[n]:.2f}" for n in names) + " |")
    (output_dir / "metrics.md").write_text("\n".join(lines) + "\n" + "".join(f"\nfailed: {msg}" for msg in failed.values()))
    return summary
