"""``guidegen prepare``: CTs + TotalSegmentator output + tumor masks + clinical records -> training data set.

For every case this

1. reads the CT, its segmentation (multi-label file or per-structure folder, TotalSegmentator v1/v2)
   and an optional tumor mask, and checks that they are readable, 3D, finite and on one voxel grid, that the
   voxel size is real (finite, > 0) and that the CT is in Hounsfield units;
2. maps the source structures to the class map's classes and paints tumor voxels with the tumor class; with a
   class map that has a ``body_class``, background voxels inside the body become that class
   (:mod:`custom_components.data.body`);
3. reorients to RAS, crops to the torso (x/y: the body outline, the largest connected region above
   ``body_threshold_hu``; z: the extent of the labelled organs) plus a margin, and resizes the label volume
   to ``mask_size`` (nearest) and the CT to ``image_size`` (trilinear, anti-aliased); both keep the same
   field of view, and the affines say so;
4. writes ``images/<id>.nii.gz`` (int16 HU), ``labels/<id>.nii.gz`` (uint8 classes),
   ``previews/<id>.png`` (three views with the labels overlaid) and last ``cases/<id>.json`` (record,
   prompt, provenance, voxel counts), each atomically.

Then it writes ``datalist.json`` and ``class_map.json``. A case whose ``cases/<id>.json`` exists with the
same input fingerprint (input files, record, settings, class map) is skipped, so re-running after an
interruption or after fixing one case redoes only what changed. A failing case is reported and does not
touch the other cases' outputs; so does a bad record (a wrong value, a ragged CSV row), which fails only
its own case.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Resize, SpatialCrop
from tqdm.auto import tqdm

from custom_components.arguments import real_number, whole_number, writable_folder
from custom_components.data.body import add_body_class, largest_component
from custom_components.data.class_map import ClassMap, load_class_map, resolve_source_map_name
from custom_components.data.datalist import write_datalist
from custom_components.data.intensity import HU_MAX, HU_MIN
from custom_components.data.io import check_same_grid, check_voxel_spacing, find_nifti, json_digest, load_nifti, read_volume, strip_nifti_suffix
from custom_components.data.preview import render_preview
from custom_components.data.prompts import record_to_prompt
from custom_components.data.records import read_records
from custom_components.data.segmentations import find_segmentation, load_source_segmentation, map_to_classes
from custom_components.data.writers import save_nifti, save_preview, write_json
from custom_components.errors import CaseError, GuideGenInputError

__all__ = [
    "PrepareSettings",
    "PrepareReport",
    "parse_size",
    "discover_images",
    "check_hounsfield_units",
    "prepare_case",
    "prepare_dataset",
]

logger = logging.getLogger(__name__)

_NNUNET_CHANNEL_SUFFIX = "_0000"
# HU plausibility: a torso CT holds air (below _AIR_BELOW_HU), its median lies between air and soft tissue, and
# next to no voxel lies far outside the 12-bit range (metal is small).
_AIR_BELOW_HU = -500.0
_MEDIAN_HU_RANGE = (HU_MIN - 100.0, 300.0)
_FAR_OUTSIDE_MARGIN_HU = 1000.0
_MAX_SHARE_FAR_OUTSIDE = 0.01
_HU_SAMPLE_VOXELS = 2_000_000


def parse_size(value: Any, name: str) -> tuple[int, int, int] | None:
    """Read a volume size given as 128, "128", "128,128,96", (128, 128, 96) or none/0 (keep the cropped grid).

    Raises:
        GuideGenInputError: anything else, naming the option.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "native", "0", ""}) or value == 0:
        return None
    if isinstance(value, str):
        value = [part for part in value.replace("x", ",").split(",") if part.strip()]
    sizes = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        sizes = [int(str(s).strip()) for s in sizes]
    except ValueError as err:
        raise GuideGenInputError(f"--{name} = {value!r}: give one size (128) or three (128,128,96)") from err
    if len(sizes) == 1:
        sizes *= 3
    if len(sizes) != 3 or min(sizes) < 1:
        raise GuideGenInputError(f"--{name} = {value!r}: give one size (128) or three positive sizes (128,128,96)")
    return tuple(sizes)  # type: ignore[return-value]


@dataclass(frozen=True)
class PrepareSettings:
    """Geometry and split settings of ``guidegen prepare`` (paper: mask 128³, image 256³).

    Attributes:
        mask_size: output label volume size, or None to keep the cropped source grid.
        image_size: output CT size, or None to keep the cropped source grid.
        body_threshold_hu: voxels above this are body when finding the torso outline.
        margin_mm: margin added around the torso crop on every side.
        ts_version: ``auto``, ``v1``, ``v2`` (or a class map ``source_maps`` name).
        val_fraction: share of cases in the validation list.
        seed: split seed.
    """

    mask_size: tuple[int, int, int] | None = (128, 128, 128)
    image_size: tuple[int, int, int] | None = (256, 256, 256)
    body_threshold_hu: float = -500.0
    margin_mm: float = 10.0
    ts_version: str = "auto"
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        # Values arrive as ints, strings or tuples from the CLI and configs; store one checked, canonical form.
        object.__setattr__(self, "mask_size", parse_size(self.mask_size, "mask_size"))
        object.__setattr__(self, "image_size", parse_size(self.image_size, "image_size"))
        object.__setattr__(self, "body_threshold_hu", real_number(self.body_threshold_hu, "body_threshold_hu"))
        object.__setattr__(self, "margin_mm", real_number(self.margin_mm, "margin_mm", minimum=0))
        object.__setattr__(self, "ts_version", str(self.ts_version))
        object.__setattr__(self, "val_fraction", real_number(self.val_fraction, "val_fraction", minimum=0, maximum=1))
        object.__setattr__(self, "seed", whole_number(self.seed, "seed", minimum=0))


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare_dataset`.

    Attributes:
        datalist: path of the datalist written (None when no case succeeded).
        prepared: case ids processed in this run.
        skipped: case ids whose outputs were already up to date.
        failed: case id -> reason, for cases left out of the datalist.
    """

    datalist: Path | None = None
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def discover_images(images_dir: Path) -> dict[str, Path]:
    """Case id -> CT file for every NIfTI file in a folder (nnU-Net's ``_0000`` channel suffix is dropped).

    Raises:
        GuideGenInputError: missing folder, no NIfTI files, or two files giving the same case id.
    """
    if not images_dir.is_dir():
        raise GuideGenInputError(f"images folder {images_dir} not found; pass --images_dir with the CT files")
    found: dict[str, list[Path]] = {}
    for path in sorted(images_dir.iterdir()):
        stem = strip_nifti_suffix(path.name)
        if stem is None or path.name.startswith("."):
            continue
        case_id = stem[: -len(_NNUNET_CHANNEL_SUFFIX)] if stem.endswith(_NNUNET_CHANNEL_SUFFIX) else stem
        found.setdefault(case_id, []).append(path)
    if not found:
        raise GuideGenInputError(f"images folder {images_dir} holds no .nii or .nii.gz files")
    clashes = {case: [p.name for p in paths] for case, paths in found.items() if len(paths) > 1}
    if clashes:
        raise GuideGenInputError(f"duplicate case ids in {images_dir}: {clashes}; keep one file per case")
    return {case: paths[0] for case, paths in found.items()}


def check_hounsfield_units(ct: np.ndarray, what: str, path: Path) -> None:
    """Refuse a CT whose values are not Hounsfield units, e.g. scaled (x1000) or shifted (intercept missing).

    Such a CT would otherwise be clipped to -1024..3071 and written as if it were fine. The values are those after
    the NIfTI header's scl_slope/scl_inter. Scanners fill the outside of the reconstruction circle with one constant
    below -1024 (-2048, -3024, ...); that padding is left out of the statistics.

    Args:
        ct: the CT volume.
        what: what the file is, for messages.
        path: the file, for messages.

    Raises:
        GuideGenInputError: saying what looks wrong and how to fix it.
    """
    values = ct.ravel()[:: max(1, ct.size // _HU_SAMPLE_VOXELS)]  # a regular subsample is plenty for statistics
    lowest = float(values.min())
    if lowest < HU_MIN:
        values = values[values != lowest]
    if not values.size:
        return
    fix = (
        "guidegen prepare needs CT in Hounsfield units (air about -1000, water 0, bone above 300): convert the values, "
        "or set the NIfTI header's scl_slope/scl_inter so that stored value x scl_slope + scl_inter is HU"
    )
    far_outside = float(np.mean((values < HU_MIN - _FAR_OUTSIDE_MARGIN_HU) | (values > HU_MAX + _FAR_OUTSIDE_MARGIN_HU)))
    low, high = np.percentile(values, [1, 99])
    problem = None
    if far_outside > _MAX_SHARE_FAR_OUTSIDE:
        problem = (
            f"{far_outside:.0%} of its voxels lie far outside {HU_MIN:.0f}..{HU_MAX:.0f} HU (1st-99th percentile "
            f"{low:.4g}..{high:.4g}): the values look scaled"
        )
    elif float(values.min()) > _AIR_BELOW_HU:
        problem = (
            f"no voxel is below {_AIR_BELOW_HU:.0f} HU, so it holds no air (lowest value {values.min():.4g}): the values "
            "look shifted, e.g. raw scanner values without the rescale intercept of -1024"
        )
    else:
        median = float(np.median(values))
        if not _MEDIAN_HU_RANGE[0] <= median <= _MEDIAN_HU_RANGE[1]:
            problem = (
                f"its median is {median:.4g}, neither air (about -1000 HU) nor soft tissue (up to "
                f"{_MEDIAN_HU_RANGE[1]:.0f} HU): the values look shifted or scaled"
            )
    if problem is not None:
        raise GuideGenInputError(f"{what}: {path} does not look like Hounsfield units: {problem}. {fix}")


def _ras(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None], affine=torch.as_tensor(affine))
    return Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(tensor)


def _spacing(affine: torch.Tensor) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def torso_box(
    ct: np.ndarray, labels: np.ndarray, spacing: Sequence[float], body_threshold_hu: float, margin_mm: float
) -> tuple[list[int], list[int]]:
    """Crop box around the torso: x/y from the body outline, z from the labelled organs, plus a margin.

    The body is the largest connected region above ``body_threshold_hu`` (this drops the scanner table and
    air-filled clutter); all labelled voxels are kept inside the box whatever the threshold finds.

    Args:
        ct: (X, Y, Z) HU volume in RAS order.
        labels: (X, Y, Z) class volume on the same grid.
        spacing: voxel size in mm.
        body_threshold_hu: body/air threshold.
        margin_mm: margin on every side.

    Returns:
        (start, end) voxel indices, end exclusive.
    """
    foreground = labels > 0
    body = largest_component(ct > body_threshold_hu) | foreground
    start, end = [], []
    margins = [int(math.ceil(margin_mm / s)) for s in spacing]
    for axis in range(3):
        source = foreground if axis == 2 else body
        other_axes = tuple(a for a in range(3) if a != axis)
        occupied = np.flatnonzero(source.any(axis=other_axes))
        start.append(max(int(occupied[0]) - margins[axis], 0))
        end.append(min(int(occupied[-1]) + 1 + margins[axis], ct.shape[axis]))
    return start, end


def _fingerprint(files: Sequence[Path | None], record: Mapping[str, Any], settings: PrepareSettings, class_map: ClassMap) -> str:
    stats = []
    for path in files:
        if path is not None:
            info = path.stat()
            stats.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    payload = {"files": stats, "record": record, "settings": asdict(settings), "class_map": class_map.raw}
    return json_digest(payload)


def _class_counts(labels: np.ndarray, class_map: ClassMap) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=class_map.num_classes)
    return {name: int(counts[i]) for i, name in enumerate(class_map.class_names) if i and counts[i]}


def _segmentation_files(location: Path) -> list[Path]:
    return sorted(location.iterdir()) if location.is_dir() else [location]


def prepare_case(
    case_id: str,
    image_path: Path,
    segmentation_path: Path,
    tumor_path: Path | None,
    record: Mapping[str, Any],
    output_dir: Path,
    class_map: ClassMap,
    settings: PrepareSettings,
) -> dict[str, Any]:
    """Prepare one case (see the module docstring) and write its outputs.

    Returns:
        the case summary written to ``cases/<id>.json``; its ``entry`` is the datalist item.

    Raises:
        GuideGenInputError: (usually :class:`CaseError`) naming the file and the fix.
    """
    what = f"CT of case '{case_id}'"
    ct_image = load_nifti(image_path, what)
    check_voxel_spacing(ct_image, what)
    ct = read_volume(ct_image, what, check_finite=True)
    check_hounsfield_units(ct, what, image_path)
    segmentation = load_source_segmentation(segmentation_path, case_id, class_map, settings.ts_version, ct)
    check_same_grid(ct_image, segmentation.image, f"segmentation of case '{case_id}'")
    if not segmentation.labels.any():
        raise CaseError(case_id, f"segmentation {segmentation_path} is empty (every voxel is 0)")
    labels = map_to_classes(segmentation, class_map, case_id)
    tumor_voxels = 0
    if tumor_path is not None:
        if class_map.tumor_index is None:
            raise CaseError(case_id, f"tumor mask {tumor_path} given but class map {class_map.path} has no tumor_class")
        tumor_image = load_nifti(tumor_path, f"tumor mask of case '{case_id}'")
        check_same_grid(ct_image, tumor_image, f"tumor mask of case '{case_id}'")
        tumor = read_volume(tumor_image, f"tumor mask of case '{case_id}'", check_finite=True) > 0
        labels[tumor] = class_map.tumor_index
        tumor_voxels = int(tumor.sum())
    if not labels.any():
        raise CaseError(
            case_id,
            f"no voxel of {segmentation_path} maps to a class of '{class_map.name}' (only unmapped structures); "
            "check the class map's sources",
        )
    ct_ras, labels_ras = _ras(ct, ct_image.affine), _ras(labels, ct_image.affine)
    if class_map.body_index is not None:
        # In RAS order axis 2 runs along the body, which the slice-wise hole filling needs.
        with_body = add_body_class(
            labels_ras[0].numpy().round().astype(np.uint8), ct_ras[0].numpy(), class_map.body_index, settings.body_threshold_hu
        )
        labels_ras[0] = torch.from_numpy(with_body.astype(np.float32))
    source_counts = _class_counts(labels_ras[0].numpy().round().astype(np.uint8), class_map)
    start, end = torso_box(
        ct_ras[0].numpy(), labels_ras[0].numpy(), _spacing(ct_ras.affine), settings.body_threshold_hu, settings.margin_mm
    )
    crop = SpatialCrop(roi_start=start, roi_end=end)
    ct_ras, labels_ras = crop(ct_ras), crop(labels_ras)
    if settings.image_size is not None:
        ct_ras = Resize(settings.image_size, mode="trilinear", anti_aliasing=True)(ct_ras)
    if settings.mask_size is not None:
        labels_ras = Resize(settings.mask_size, mode="nearest")(labels_ras)
    out_labels = labels_ras[0].numpy().round().astype(np.uint8)
    out_ct = np.clip(ct_ras[0].numpy().round(), HU_MIN, HU_MAX).astype(np.int16)

    image_rel, label_rel = f"images/{case_id}.nii.gz", f"labels/{case_id}.nii.gz"
    preview_rel = f"previews/{case_id}.png"
    save_nifti(out_ct, ct_ras.affine.numpy(), output_dir / image_rel, np.int16)
    save_nifti(out_labels, labels_ras.affine.numpy(), output_dir / label_rel, np.uint8)
    preview = render_preview(out_ct, out_labels, class_map.num_classes, tuple(_spacing(ct_ras.affine)))
    save_preview(preview, output_dir / preview_rel)
    prompt = record_to_prompt(record)
    return {
        "case_id": case_id,
        "entry": {"case_id": case_id, "image": image_rel, "label": label_rel, "text": prompt, "record": dict(record)},
        "preview": preview_rel,
        "sources": {
            "image": str(image_path),
            "segmentation": str(segmentation_path),
            "labelling": segmentation.source_map,
            "tumor": None if tumor_path is None else str(tumor_path),
        },
        "source_class_voxels": source_counts,
        "class_voxels": _class_counts(out_labels, class_map),
        "tumor_voxels_source": tumor_voxels,
        "crop_start_end_ras": [start, end],
        "image_spacing_mm": _spacing(ct_ras.affine).round(4).tolist(),
        "mask_spacing_mm": _spacing(labels_ras.affine).round(4).tolist(),
    }


def _up_to_date(summary_path: Path, fingerprint: str, output_dir: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    entry = summary.get("entry", {})
    outputs_exist = all((output_dir / str(entry.get(key, ""))).is_file() for key in ("image", "label"))
    return summary if summary.get("fingerprint") == fingerprint and outputs_exist else None


def prepare_dataset(
    images_dir: str | os.PathLike,
    segmentations_dir: str | os.PathLike,
    records: str | os.PathLike,
    output_dir: str | os.PathLike,
    tumors_dir: str | os.PathLike | None = None,
    class_map: str | os.PathLike | ClassMap | None = None,
    settings: PrepareSettings = PrepareSettings(),
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Prepare a data set (see the module docstring).

    Args:
        images_dir: CT files ``<case_id>.nii.gz`` (or ``.nii``, or nnU-Net style ``<case_id>_0000.nii.gz``).
        segmentations_dir: per case ``<case_id>.nii.gz`` (multi-label) or a folder ``<case_id>/`` of
            ``<structure>.nii.gz`` files.
        records: CSV/JSON of clinical records with a ``case_id`` per row; a bad row fails only its case.
        output_dir: where images/, labels/, cases/, datalist.json and class_map.json go.
        tumors_dir: optional ``<case_id>.nii.gz`` tumor masks (non-zero = tumor); cases without one have
            no tumor label.
        class_map: class map file or object; None for the default GuideGen map.
        settings: sizes, crop and split settings.
        overwrite: redo cases even when their outputs are up to date.
        progress: show a progress bar.

    Returns:
        a :class:`PrepareReport`; failed cases are listed with reasons and left out of the datalist (a record row
        without a readable case id is listed under its file and line).

    Raises:
        GuideGenInputError: problems that concern the whole run (missing folders, an unreadable records file,
            bad class map, no case prepared at all).
    """
    images_dir, segmentations_dir, output_dir = Path(images_dir), Path(segmentations_dir), writable_folder(output_dir)
    tumors_dir = None if tumors_dir is None else Path(tumors_dir)
    if tumors_dir is not None and not tumors_dir.is_dir():
        raise GuideGenInputError(f"tumor mask folder {tumors_dir} not found; pass an existing --tumors_dir or omit it")
    if not segmentations_dir.is_dir():
        raise GuideGenInputError(f"segmentations folder {segmentations_dir} not found; pass --segmentations_dir")
    class_map = class_map if isinstance(class_map, ClassMap) else load_class_map(class_map)
    if settings.ts_version != "auto":
        try:
            resolve_source_map_name(settings.ts_version, class_map.source_maps)
        except GuideGenInputError as err:
            raise GuideGenInputError(f"--ts_version {settings.ts_version!r}: use auto, v1, v2 or a source map of the class map ({err})") from None
    images = discover_images(images_dir)
    record_file = read_records(records)
    record_table = record_file.records
    report = PrepareReport()
    for key in sorted(set(record_file.rejected) - set(images)):  # bad rows of cases without an image, and rows without an id
        report.failed[key] = record_file.rejected[key]
    for case_id in sorted(set(record_table) - set(images)):
        report.failed[case_id] = f"record has no image: expected {images_dir / (case_id + '.nii.gz')}"
    entries: dict[str, dict[str, Any]] = {}
    cases = sorted(images)
    for case_id in tqdm(cases, desc="prepare", unit="case", disable=not progress):
        try:
            if case_id in record_file.rejected:
                raise CaseError(case_id, record_file.rejected[case_id])
            if case_id not in record_table:
                raise CaseError(case_id, f"image {images[case_id]} has no record; add a row with case_id '{case_id}' to {records}")
            segmentation_path = find_segmentation(segmentations_dir, case_id)
            if segmentation_path is None:
                raise CaseError(case_id, f"no segmentation: expected {segmentations_dir / (case_id + '.nii.gz')} or folder {segmentations_dir / case_id}/")
            tumor_path = None if tumors_dir is None else find_nifti(tumors_dir, case_id)
            record = record_table[case_id]
            inputs = [images[case_id], *_segmentation_files(segmentation_path), tumor_path]
            fingerprint = _fingerprint(inputs, record, settings, class_map)
            summary_path = output_dir / "cases" / f"{case_id}.json"
            summary = None if overwrite else _up_to_date(summary_path, fingerprint, output_dir)
            if summary is not None:
                report.skipped.append(case_id)
            else:
                summary = prepare_case(
                    case_id, images[case_id], segmentation_path, tumor_path, record, output_dir, class_map, settings
                )
                summary["fingerprint"] = fingerprint
                write_json(summary, summary_path)
                report.prepared.append(case_id)
            entries[case_id] = summary["entry"]
        except GuideGenInputError as err:
            report.failed[case_id] = str(err.reason if isinstance(err, CaseError) else err)
            logger.error("case '%s' failed: %s", case_id, report.failed[case_id])
        except Exception as err:  # a bug or an input no check foresaw must not cost the other cases
            report.failed[case_id] = (
                f"unexpected error ({type(err).__name__}: {err}) on {images[case_id]}; please report it with this "
                "message, the traceback at log level DEBUG and the case's header (nib-ls)"
            )
            logger.error("case '%s' failed: %s", case_id, report.failed[case_id])
            logger.debug("traceback of case '%s'", case_id, exc_info=True)
    if not entries:
        details = "; ".join(f"{case}: {reason}" for case, reason in report.failed.items())
        raise GuideGenInputError(f"no case could be prepared. {details}")
    metadata = {
        "name": output_dir.name,
        "mask_size": settings.mask_size,
        "image_size": settings.image_size,
        "intensity": "CT in Hounsfield units (int16), labels as class indices (uint8)",
        "prepare_settings": asdict(settings),
    }
    report.datalist = write_datalist(
        output_dir / "datalist.json", entries, class_map, settings.val_fraction, settings.seed, metadata
    )
    return report
