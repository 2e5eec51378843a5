"""``guidegen demo-data``: a small data set that lets every stage run on a laptop CPU.

It writes procedural torso phantoms (:mod:`custom_components.data.demo.phantom`) as *raw* data, exactly as a
user's real data would look (CT NIfTI, TotalSegmentator-v1 multi-label segmentation, tumor mask, a CSV of
clinical records), adds the real abdominal example CT that ships with the package, and runs the raw folder
through :func:`custom_components.data.prepare.prepare_dataset`. The demo therefore exercises the same
code path as real data.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from custom_components.data.class_map import load_class_map
from custom_components.data.demo.example import EXAMPLE_RECORD, HELD_OUT_SLICES, example_ct_files, example_parts
from custom_components.data.demo.labels import REFERENCE_FIELD_OF_VIEW_MM
from custom_components.data.demo.phantom import generate_phantom
from custom_components.data.demo.records import make_phantom_record
from custom_components.data.prepare import PrepareSettings, parse_size, prepare_dataset
from custom_components.data.records import RECORD_FIELDS
from custom_components.data.writers import atomic_write, save_nifti, write_json
from custom_components.errors import GuideGenInputError

__all__ = ["build_demo_dataset"]

# The raw grid gets 1.25x more slices than the target size so that its voxels follow the field of view's
# proportions (480 mm tall, 384 mm wide) instead of being stretched along z.
_RAW_Z_FACTOR = 1.25

def _raw_geometry(image_size: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = (image_size[0], image_size[1], int(math.ceil(image_size[2] * _RAW_Z_FACTOR)))
    spacing = tuple(fov / n for fov, n in zip(REFERENCE_FIELD_OF_VIEW_MM, shape))
    return shape, spacing  # type: ignore[return-value]


def _write_records_csv(records: list[Mapping[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RECORD_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if record.get(k) is None else record[k]) for k in RECORD_FIELDS})
    atomic_write(path, lambda temporary: temporary.write_text(buffer.getvalue()))


def _write_phantoms(
    raw_dir: Path, num_phantoms: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int, overwrite: bool
) -> list[dict[str, Any]]:
    """Generate the raw phantom cases (skipping those already written with the same geometry)."""
    manifest_path = raw_dir / "phantoms.json"
    manifest = {"shape": list(shape), "spacing_mm": [round(s, 6) for s in spacing], "seed": seed}
    try:
        same_geometry = json.loads(manifest_path.read_text()) == manifest
    except (OSError, json.JSONDecodeError):
        same_geometry = False
    records = []
    for index in tqdm(range(num_phantoms), desc="phantoms", unit="case"):
        rng = np.random.default_rng([seed, index])
        case_id = f"phantom_{index:03d}"
        record = make_phantom_record(case_id, rng)
        records.append(record)
        files = {kind: raw_dir / kind / f"{case_id}.nii.gz" for kind in ("images", "segmentations", "tumors")}
        if same_geometry and not overwrite and all(f.is_file() for f in files.values()):
            continue
        phantom = generate_phantom(record, shape=shape, spacing=spacing, seed=int(rng.integers(2**31)))
        save_nifti(phantom.ct, phantom.affine, files["images"], np.int16)
        save_nifti(phantom.segmentation, phantom.affine, files["segmentations"], np.uint8)
        save_nifti(phantom.tumor, phantom.affine, files["tumors"], np.uint8)
    write_json(manifest, manifest_path)
    return records


def _copy_example(raw_dir: Path, held_out: tuple[int, int]) -> list[str]:
    """The example CT and its labels without the held-out slab, one raw case per part around it; returns their ids."""
    files = example_ct_files()
    images = {kind: nib.load(str(source)) for kind, source in (("images", files["image"]), ("segmentations", files["segmentation"]))}
    try:
        parts = example_parts(images["images"].shape[2], held_out)
    except ValueError as err:
        raise GuideGenInputError(f"--held_out_slices: {err}") from None
    for case_id, (first, stop) in parts.items():
        for kind, image in images.items():
            target = raw_dir / kind / f"{case_id}.nii.gz"
            training_part = image.slicer[:, :, first:stop]
            existing = nib.load(str(target)) if target.is_file() else None
            # a raw folder from another hold-out holds other slices: replace it
            if existing is None or existing.shape != training_part.shape or not np.allclose(existing.affine, training_part.affine):
                atomic_write(target, lambda temporary, image=training_part: nib.save(image, str(temporary)))
    license_copy = raw_dir / files["license"].name
    if not license_copy.is_file():
        shutil.copyfile(files["license"], license_copy)
    return list(parts)


def _remove_stale_cases(raw_dir: Path, case_ids: set[str]) -> None:
    """Delete raw files of cases no longer in the demo (fewer phantoms, example CT switched off), which
    `prepare` would otherwise report as images without records."""
    for kind in ("images", "segmentations", "tumors"):
        folder = raw_dir / kind
        for path in folder.glob("*.nii.gz") if folder.is_dir() else []:
            if path.name[: -len(".nii.gz")] not in case_ids:
                path.unlink()


def build_demo_dataset(
    output_dir: str | os.PathLike,
    num_phantoms: int = 8,
    mask_size: Any = 32,
    image_size: Any = 64,
    include_example_ct: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    body_class: bool = False,
    held_out_slices: tuple[int, int] = HELD_OUT_SLICES,
) -> Path:
    """Write the demo data set (see the module docstring).

    Args:
        output_dir: destination; raw inputs go to ``output_dir/raw``.
        num_phantoms: number of phantom cases (>= 0; with 0 only the example CT is used).
        mask_size: label volume size for ``prepare`` (one number or three).
        image_size: CT size for ``prepare``; also sets the raw phantom resolution.
        include_example_ct: add the real TotalSegmentator example CT.
        val_fraction: validation share (see :func:`custom_components.data.datalist.split_cases`).
        seed: seed of phantoms, records and split.
        overwrite: regenerate the phantoms and re-prepare every case.
        progress: show progress bars.
        body_class: use the shipped body class map (``class_map_body.json``): background inside the body
            becomes its own class (see :mod:`custom_components.data.body`).
        held_out_slices: ``(first, stop)`` axial slices of the example CT kept out of the data set (the real test
            case); see :func:`custom_components.data.demo.example.example_parts`.

    Returns:
        the datalist path.

    Raises:
        GuideGenInputError: bad sizes or counts, or a case that failed to prepare.
    """
    if num_phantoms < 0 or (num_phantoms == 0 and not include_example_ct):
        raise GuideGenInputError(f"--num_phantoms = {num_phantoms}: need at least one phantom or the example CT")
    output_dir = Path(output_dir)
    raw_dir = output_dir / "raw"
    settings = PrepareSettings(
        mask_size=mask_size, image_size=image_size, ts_version="v1", val_fraction=val_fraction, seed=seed
    )
    raw_size = settings.image_size or parse_size(64, "image_size")
    shape, spacing = _raw_geometry(raw_size)
    records = _write_phantoms(raw_dir, num_phantoms, shape, spacing, seed, overwrite) if num_phantoms else []
    if include_example_ct:
        records += [{**EXAMPLE_RECORD, "case_id": case_id} for case_id in _copy_example(raw_dir, held_out_slices)]
    _remove_stale_cases(raw_dir, {record["case_id"] for record in records})
    _write_records_csv(records, raw_dir / "records.csv")
    report = prepare_dataset(
        raw_dir / "images",
        raw_dir / "segmentations",
        raw_dir / "records.csv",
        output_dir,
        tumors_dir=raw_dir / "tumors" if num_phantoms else None,
        class_map=load_class_map(None, body_class=True) if body_class else None,
        settings=settings,
        overwrite=overwrite,
        progress=progress,
    )
    if report.failed:
        raise GuideGenInputError(f"demo cases failed to prepare: {report.failed}")
    return Path(report.datalist)
