"""Stages III + II run on mask files: a CT file, the mask, the prompt and a preview per case."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from custom_components.data.io import load_nifti, read_volume
from custom_components.data.preview import render_preview
from custom_components.data.writers import atomic_write, save_nifti, save_preview
from custom_components.errors import GuideGenInputError
from custom_components.pipelines.mask_to_ct import MaskToCTPipeline, ct_affine_for_mask

__all__ = ["generate_cts"]


def generate_cts(
    pipeline: MaskToCTPipeline,
    cases: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> list[Path]:
    """Generate and write a CT for every ``{"case_id", "label" (mask file), "text" (prompt)}`` entry.

    Writes ``<output_dir>/<case_id>/ct.nii.gz`` (int16 HU on the mask's field of view at the autoencoder's
    resolution), ``mask.nii.gz`` (the input mask, uint8), ``prompt.txt`` and ``preview.png`` (CT with the mask
    overlaid). Each case is seeded with ``seed + index``, so a case's result does not depend on the others.

    Returns:
        the CT files written.

    Raises:
        GuideGenInputError: no cases, an unreadable mask, a mask of the wrong size or class map, an empty prompt.
    """
    if not cases:
        raise GuideGenInputError("no masks to generate CTs for: pass --mask_file and --prompt, or a datalist split with cases")
    output_dir = Path(output_dir)
    written = []
    for index, case in enumerate(tqdm(cases, desc="mask -> CT", unit="case")):
        case_id = str(case.get("case_id") or f"case_{index:03d}")
        prompt = str(case.get("text") or "").strip()
        if not prompt:
            raise GuideGenInputError(f"case '{case_id}': empty prompt; pass --prompt or give the datalist entry a 'text'")
        mask_nii = load_nifti(case["label"], f"mask of case '{case_id}'")
        mask = read_volume(mask_nii, f"mask of case '{case_id}'", dtype=np.int64)
        pipeline.check_mask(mask, f"case '{case_id}' ({case['label']})")
        masks = torch.as_tensor(mask[None])
        ct = pipeline._generate(masks, [prompt], num_inference_steps, guidance_scale, seed + index, False)[0, 0].numpy()
        affine = ct_affine_for_mask(mask_nii.affine, mask.shape, ct.shape)
        folder = output_dir / case_id
        path = save_nifti(np.rint(ct), affine, folder / "ct.nii.gz", np.int16)
        save_nifti(mask, mask_nii.affine, folder / "mask.nii.gz", np.uint8)
        atomic_write(folder / "prompt.txt", lambda temporary: temporary.write_text(prompt + "\n"))
        spacing = tuple(float(v) for v in nib.affines.voxel_sizes(affine))
        save_preview(render_preview(ct, mask, pipeline.num_classes, spacing), folder / "preview.png")
        written.append(path)
    return written
