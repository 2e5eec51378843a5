"""Pre-encoded CT latents for training the latent generator (stage III), with a manifest that knows when to redo them.

Encoding every CT with the (frozen) autoencoder at every step wastes most of a latent-diffusion training step. The
cache encodes each training CT once (latent means, as NIfTI ``(X/f, Y/f, Z/f, C)``), writes
``<cache_dir>/manifest.json`` with the autoencoder checkpoint's SHA-256 and each source file's size and mtime, and
on the next run re-encodes only what changed: every case when the autoencoder checkpoint changed, otherwise only
cases whose CT or mask changed or whose latent is missing. The manifest also holds the latent scale factor
(1 / standard deviation of all cached latents, as in Rombach et al. 2022), which the latent generator trains with
and stores in its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from custom_components.data.io import file_digest
from custom_components.data.writers import write_json
from custom_components.runs.autoencoder import encode_file
from custom_components.errors import GuideGenInputError

__all__ = ["build_latent_cache", "latent_statistics", "mask_factor"]

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _stamp(path: str | os.PathLike) -> list[int]:
    stat = Path(path).stat()
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def latent_statistics(latent_files: Sequence[str | os.PathLike]) -> tuple[float, float]:
    """Scale factor and range of the given latent NIfTI files, read once.

    Returns:
        ``(scale_factor, scaled_abs_max)``: 1 / standard deviation of every value (unit variance for diffusion) and
        the largest absolute value after scaling (bounds the sampler's x_0 estimates, see ``LeadingDDIMScheduler``).

    Raises:
        GuideGenInputError: no files, or latents with zero spread (an untrained or broken autoencoder).
    """
    if not latent_files:
        raise GuideGenInputError("no latents to compute the scale factor from: the training split is empty")
    count, total, total_sq, abs_max = 0, 0.0, 0.0, 0.0
    for path in latent_files:
        values = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        count += values.size
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        abs_max = max(abs_max, float(np.abs(values).max()))
    variance = total_sq / count - (total / count) ** 2
    if not variance > 1e-12:
        raise GuideGenInputError(
            f"the cached latents have no spread (variance {variance:.3g}); check that the autoencoder checkpoint is trained"
        )
    scale = float(1.0 / np.sqrt(variance))
    return scale, abs_max * scale


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def build_latent_cache(
    items: Sequence[Mapping[str, Any]],
    pipeline: Any,
    autoencoder_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode a list's CTs once (or reuse what is up to date) and return the cached datalist (the training list; the
    validation list in a cache of its own).

    Under ``torch.distributed`` only rank 0 encodes; the other ranks wait at a barrier and read the manifest.

    Args:
        items: datalist entries with absolute ``image`` and ``label`` paths, ``case_id`` and ``text``.
        pipeline: an :class:`~custom_components.pipelines.AutoencoderPipeline` with the trained weights loaded.
        autoencoder_path: its checkpoint file (hashed: a new checkpoint re-encodes everything).
        cache_dir: where latents and the manifest live.
        progress: show a progress bar over the cases.

    Returns:
        ``{"items": [entry + {"latent": path}], "scale_factor": float, "scaled_abs_max": float (largest |value| of
        the scaled latents), "autoencoder_sha256": str, "latent_shape": [C, x, y, z]}``.
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        sha = file_digest(autoencoder_path)
        manifest = _read_manifest(manifest_path)
        if manifest.get("autoencoder_sha256") != sha:
            if manifest:
                logger.info("autoencoder checkpoint changed: re-encoding every CT into %s", cache_dir)
            manifest = {"autoencoder_sha256": sha, "autoencoder_path": str(autoencoder_path), "cases": {}}
        cases: dict[str, Any] = manifest["cases"]
        todo = []
        for item in items:
            case_id = str(item["case_id"])
            latent = cache_dir / "latents" / f"{case_id}.nii.gz"
            entry = cases.get(case_id, {})
            fresh = (
                latent.is_file()
                and entry.get("image_stamp") == _stamp(item["image"])
                and entry.get("label_stamp") == _stamp(item["label"])
            )
            if not fresh:
                todo.append((case_id, item, latent))
        for case_id, item, latent in tqdm(todo, desc="encoding CT latents", unit="case", disable=not progress):
            encode_file(pipeline, item["image"], item["label"], latent)
            cases[case_id] = {"image": str(item["image"]), "label": str(item["label"]), "latent": str(latent),
                              "image_stamp": _stamp(item["image"]), "label_stamp": _stamp(item["label"])}
        wanted = {str(item["case_id"]) for item in items}
        latents = [cases[c]["latent"] for c in sorted(wanted)]
        manifest["scale_factor"], manifest["scaled_abs_max"] = latent_statistics(latents)
        shape = nib.load(latents[0]).shape
        manifest["latent_shape"] = [int(shape[3]), *map(int, shape[:3])]
        manifest["cases"] = cases
        write_json(manifest, manifest_path)
        if todo:
            logger.info("encoded %d of %d CTs into %s (the rest were up to date)", len(todo), len(items), cache_dir)
    if distributed:
        dist.barrier()
    manifest = _read_manifest(manifest_path)
    cached = []
    for item in items:
        entry = manifest["cases"].get(str(item["case_id"]))
        if entry is None:
            raise GuideGenInputError(f"case '{item['case_id']}' is missing from the latent cache {manifest_path}; delete the cache and rerun")
        cached.append({**item, "latent": entry["latent"]})
    return {"items": cached, "scale_factor": float(manifest["scale_factor"]), "scaled_abs_max": float(manifest["scaled_abs_max"]),
            "autoencoder_sha256": manifest["autoencoder_sha256"], "latent_shape": manifest["latent_shape"]}


def mask_factor(mask_size: Sequence[int], latent_shape: Sequence[int]) -> int:
    """Mask voxels per latent voxel along each axis (paper: 128³ masks over 64³ latents -> 2).

    Args:
        mask_size: the masks' spatial size.
        latent_shape: ``[C, x, y, z]`` of the cached latents.

    Raises:
        GuideGenInputError: the mask size is not the same whole multiple of the latent size on every axis.
    """
    latent_size = [int(n) for n in latent_shape[1:]]
    ratios = {int(m) / n for m, n in zip(mask_size, latent_size)}
    ratio = ratios.pop() if len(ratios) == 1 else None
    if ratio is None or ratio < 1 or ratio != int(ratio):
        raise GuideGenInputError(
            f"mask_size {list(mask_size)} is not a whole multiple (the same on every axis) of the latent size "
            f"{latent_size}; choose mask_size = latent size x 1, 2, ... (paper: 128^3 masks over 64^3 latents)"
        )
    return int(ratio)
