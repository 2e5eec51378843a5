"""Evaluating generated pairs: every metric of the paper that can be computed here.

- image realism: LPIPS (VGG, slices; paired volumes only), FID over slices of all three axes (averaged), FVD with
  axial slices as frames — each needs its feature network's weights in a local file, and reports
  ``"unavailable: put weights at ..."`` instead of a number without them;
- image–mask alignment: Dice and HD95 (MONAI) per organ between the generated mask and a segmentation of the
  generated CT (e.g. TotalSegmentator run on it; ``segmentations_dir``);
- mask–prompt alignment: tumor count accuracy and tumor location accuracy (paper Fig. 3b) from each sample's record;
  a sample generated from a prompt without a stored record (a run made before prompts were read, or a ``synthesize``
  datalist) is scored with the fields :func:`~custom_components.data.free_text.parse_free_text` reads from its prompt.

Only the realism metrics compare with real CTs: without a reference data set they report why they are unavailable and
the alignment metrics are still computed.

Writes ``metrics.json``, ``metrics.md``, PNG figures, and logs the numbers and files to MLflow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from custom_components.data.class_map import ClassMap, load_class_map
from custom_components.data.io import load_nifti, read_volume
from custom_components.data.writers import write_json
from custom_components.errors import GuideGenInputError

__all__ = ["TS_VERSIONS", "GeneratedSample", "ReferenceCase", "find_generated_samples", "load_reference", "evaluate_run"]

# labellings of the generated CTs' segmentations: TotalSegmentator's (detected, v1, v2) or GuideGen class indices
TS_VERSIONS = ("auto", "v1", "v2", "guidegen")

_SPACING_TOLERANCE = 0.01  # relative
_NO_REFERENCE = ("unavailable: this metric compares the generated CTs with real ones; pass --reference with a prepared "
                 "datalist (guidegen prepare / demo-data)")


@dataclass
class GeneratedSample:
    sample_id: str
    ct_path: Path
    mask_path: Path
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReferenceCase:
    case_id: str
    image_path: Path
    label_path: Path | None


def find_generated_samples(folder: str | os.PathLike) -> list[GeneratedSample]:
    """The samples of a ``guidegen generate`` run folder or a ``guidegen synthesize`` output folder.

    Raises:
        GuideGenInputError: the folder does not exist or holds no finished sample.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GuideGenInputError(f"--generated {folder} is not a folder; pass the output folder of guidegen generate or synthesize")
    root = folder / "samples" if (folder / "samples").is_dir() else folder
    samples = []
    for sample in sorted(root.glob("sample_*")):
        ct, mask, record = sample / "ct.nii.gz", sample / "mask.nii.gz", sample / "record.json"
        if ct.is_file() and mask.is_file():
            samples.append(GeneratedSample(sample.name, ct, mask, json.loads(record.read_text()) if record.is_file() else {}))
    if not samples:
        raise GuideGenInputError(
            f"no generated samples in {root} (expected sample_*/ct.nii.gz and mask.nii.gz, as guidegen generate writes them)"
        )
    return samples


def load_reference(datalist: str | os.PathLike, split: str = "validation") -> tuple[list[ReferenceCase], ClassMap]:
    """Reference CTs (and labels) from a prepared datalist split.

    Raises:
        GuideGenInputError: unreadable datalist, or an empty split.
    """
    from custom_components.data.datalist import load_datalist

    content = load_datalist(datalist, splits=[split])
    items = content.get(split) or []
    if not items:
        raise GuideGenInputError(f"{datalist}: the '{split}' list is empty; pass --split with a list that holds reference cases")
    cases = [ReferenceCase(str(item.get("case_id") or Path(item["image"]).name.split(".")[0]), Path(item["image"]),
                           Path(item["label"]) if item.get("label") else None) for item in items]
    return cases, content["class_map"]


def _spacing(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(nib.affines.voxel_sizes(image.affine), dtype=np.float64)


def _resample(volume: np.ndarray, spacing: np.ndarray, target: np.ndarray) -> np.ndarray:
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, spacing, target)]
    tensor = torch.as_tensor(volume, dtype=torch.float32)[None, None]
    return F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def _read_cts(paths: Sequence[Path], what: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    volumes, spacings = [], []
    for path in paths:
        image = load_nifti(path, what)
        volumes.append(read_volume(image, f"{what} {path}", dtype=np.float32, check_finite=True))
        spacings.append(_spacing(image))
    return volumes, spacings


def _check_spacing(generated: list[np.ndarray], generated_spacing: list[np.ndarray], reference_spacing: list[np.ndarray],
                   resample: bool) -> list[np.ndarray]:
    """Generated and reference slices must show anatomy at the same scale: resample the generated CTs or refuse."""
    target = np.median(np.stack(reference_spacing), axis=0)
    mismatched = [s for s in generated_spacing if np.any(np.abs(s - target) > _SPACING_TOLERANCE * target)]
    if not mismatched:
        return generated
    if not resample:
        raise GuideGenInputError(
            f"generated CTs have spacing {np.round(mismatched[0], 3).tolist()} mm but the reference CTs "
            f"{np.round(target, 3).tolist()} mm: their slices would compare anatomy at different scales. Pass "
            "--resample true to resample the generated CTs to the reference spacing, or evaluate against a reference "
            "prepared at the generated size"
        )
    return [_resample(v, s, target) for v, s in zip(generated, generated_spacing)]


def _feature_metrics(generated: list[np.ndarray], reference: list[np.ndarray], paired: list[tuple[int, int]],
                     weights: Mapping[str, str | None], slices_per_axis: int, frame_size: int) -> dict[str, Any]:
    from custom_components.metrics import features

    results: dict[str, Any] = {}
    try:
        inception = features.load_inception(weights.get("inception") or features.default_inception_weights_path())
        results["fid"] = features.slice_fid(generated, reference, inception, slices_per_axis=slices_per_axis)
    except features.MetricUnavailable as err:
        results["fid"] = str(err)
    try:
        i3d = features.load_i3d(weights.get("i3d") or features.default_i3d_weights_path())
        clip = min(16, min(v.shape[2] for v in generated + reference))
        results["fvd"] = features.axial_fvd(generated, reference, i3d, clip_length=clip, frame_size=frame_size)
    except features.MetricUnavailable as err:
        results["fvd"] = str(err)
    if not paired:
        results["lpips"] = ("unavailable: LPIPS compares paired volumes; generate with --mask <reference label> so that each "
                            "generated CT has a reference CT of the same anatomy")
    else:
        try:
            results["lpips"] = features.slice_lpips([generated[g] for g, _ in paired], [reference[r] for _, r in paired],
                                                    vgg_weights_path=weights.get("vgg"))
        except features.MetricUnavailable as err:
            results["lpips"] = str(err)
    return results


def _image_mask_alignment(samples: Sequence[GeneratedSample], segmentations_dir: str | None, ts_version: str,
                          class_map: ClassMap) -> dict[str, Any]:
    """Dice and HD95 per organ between each generated mask and a segmentation of its CT."""
    if not segmentations_dir:
        return {"unavailable": "segment the generated CTs (e.g. TotalSegmentator --ml on each ct.nii.gz, saved as "
                               "<sample_id>.nii.gz) and pass --segmentations_dir"}
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from custom_components.data.segmentations import load_source_segmentation, map_to_classes

    n = class_map.num_classes
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    dice_rows, hd_rows, missing = [], [], []
    for sample in samples:
        location = Path(segmentations_dir) / f"{sample.sample_id}.nii.gz"
        if not location.exists():
            location = Path(segmentations_dir) / sample.sample_id
        if not location.exists():
            missing.append(sample.sample_id)
            continue
        mask_image = load_nifti(sample.mask_path, f"mask of {sample.sample_id}")
        mask = read_volume(mask_image, f"mask of {sample.sample_id}", dtype=np.int64)
        if ts_version == "guidegen":
            segmentation = read_volume(load_nifti(location, f"segmentation of {sample.sample_id}"), str(location), dtype=np.int64)
        else:
            segmentation = map_to_classes(load_source_segmentation(location, sample.sample_id, class_map, ts_version), class_map, sample.sample_id)
        if segmentation.shape != mask.shape:
            raise GuideGenInputError(
                f"{location}: segmentation shape {segmentation.shape} differs from the generated mask {mask.shape}; segment "
                f"{sample.ct_path} itself (same grid)"
            )
        one_hot = lambda labels: F.one_hot(torch.as_tensor(labels).clamp(0, n - 1), n).permute(3, 0, 1, 2)[None].float()  # noqa: E731
        prediction, truth = one_hot(segmentation), one_hot(mask)
        dice_rows.append(dice_metric(prediction, truth)[0].numpy())
        hd_rows.append(hd_metric(prediction, truth, spacing=_spacing(mask_image).tolist())[0].numpy())
    if missing and not dice_rows:
        raise GuideGenInputError(f"{segmentations_dir} holds no segmentation of the generated samples (e.g. {missing[0]}.nii.gz)")
    dice, hd95 = np.stack(dice_rows), np.stack(hd_rows)
    hd95[~np.isfinite(hd95)] = np.nan
    names = class_map.class_names[1:]
    mean = lambda column: None if np.all(np.isnan(column)) else float(np.nanmean(column))  # noqa: E731
    per_organ = {name: {"dice": mean(dice[:, i]), "hd95_mm": mean(hd95[:, i])} for i, name in enumerate(names)}
    return {
        "cases": len(dice_rows), "missing_segmentations": missing,
        "mean_dice": mean(dice.ravel()), "mean_hd95_mm": mean(hd95.ravel()), "per_organ": per_organ,
    }


def _mask_prompt_alignment(samples: Sequence[GeneratedSample], class_map: ClassMap) -> dict[str, Any]:
    """Tumor count and location accuracy of the generated masks against their records (paper Fig. 3b)."""
    from custom_components.metrics.alignment import tumor_alignment

    from custom_components.data.free_text import parse_free_text
    from custom_components.data.prompts import stated_tumor_count

    counted, located = [], []
    parsed_from_prompt = 0
    confusion: dict[tuple[str, str], int] = {}
    for sample in samples:
        record = sample.record.get("record") or {}
        if not record and (sample.record.get("given_prompt") or sample.record.get("prompt")):
            record = parse_free_text(sample.record.get("given_prompt") or sample.record["prompt"], class_map.class_names)
            parsed_from_prompt += 1
        if stated_tumor_count(record) is None:
            continue
        native = sample.mask_path.with_name("mask_native.nii.gz")
        mask_path = native if native.is_file() else sample.mask_path
        mask = read_volume(load_nifti(mask_path, f"mask of {sample.sample_id}"), str(mask_path), dtype=np.int64)
        try:
            result = tumor_alignment(mask, record, class_map)
        except GuideGenInputError as err:
            raise GuideGenInputError(f"{sample.sample_id}: {err}") from err
        counted.append(result.count_correct)
        if result.location_correct is not None:
            located.append(result.location_correct)
        if record.get("tumor_organ"):
            for organ in result.component_organs or ["(no tumor)"]:
                key = (str(record["tumor_organ"]), organ)
                confusion[key] = confusion.get(key, 0) + 1
    if not counted:
        return {"unavailable": "no generated sample's record or prompt states its tumors (a tumor count, organ or size, "
                               "or 'no tumor'); write them in the prompt or generate from records"}
    return {
        "cases": len(counted),
        "records_read_from_prompts": parsed_from_prompt,
        "tumor_count_accuracy": float(np.mean(counted)),
        "tumor_location_accuracy": float(np.mean(located)) if located else None,
        "location_cases": len(located),
        "confusion": [{"named": a, "found": b, "count": c} for (a, b), c in sorted(confusion.items())],
    }


def _markdown(metrics: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    reference = (f"{metrics['reference']} ({metrics['num_reference']} cases)" if metrics["reference"]
                 else "none (realism metrics need --reference)")
    lines = ["# GuideGen evaluation", "", f"generated: {metrics['generated']} ({metrics['num_generated']} samples)",
             f"reference: {reference}", "", "| metric | value |", "| --- | --- |"]
    realism = metrics["realism"]
    fid = realism["fid"]
    lines.append(f"| FID (slices, mean of 3 axes) | {show(fid['mean']) if isinstance(fid, dict) else fid} |")
    if isinstance(fid, dict):
        lines += [f"| FID axis {a} | {show(fid[f'axis_{a}'])} |" for a in range(3) if f"axis_{a}" in fid]
    lines.append(f"| FVD (axial slices as frames) | {show(realism['fvd'])} |")
    lines.append(f"| LPIPS (VGG, slices) | {show(realism['lpips'])} |")
    image_mask = metrics["image_mask"]
    if "unavailable" in image_mask:
        lines.append(f"| image–mask Dice / HD95 | {image_mask['unavailable']} |")
    else:
        lines.append(f"| image–mask Dice (mean over organs) | {show(image_mask['mean_dice'])} |")
        lines.append(f"| image–mask HD95 mm (mean over organs) | {show(image_mask['mean_hd95_mm'])} |")
    mask_prompt = metrics["mask_prompt"]
    if "unavailable" in mask_prompt:
        lines.append(f"| tumor count / location accuracy | {mask_prompt['unavailable']} |")
    else:
        read = mask_prompt.get("records_read_from_prompts")
        lines.append(f"| tumor count accuracy | {show(mask_prompt['tumor_count_accuracy'])} ({mask_prompt['cases']} cases"
                     f"{f', {read} records read from their prompts' if read else ''}) |")
        lines.append(f"| tumor location accuracy | {show(mask_prompt['tumor_location_accuracy'])} ({mask_prompt['location_cases']} cases) |")
    return "\n".join(lines) + "\n"


def _middle_slices(volumes: Sequence[np.ndarray], count: int = 6) -> list[np.ndarray]:
    return [v[:, :, v.shape[2] // 2] for v in volumes[:count]]


def _log_mlflow(metrics: Mapping[str, Any], output_dir: Path, tracking_uri: str | None, run_name: str) -> str:
    import mlflow
    from monai.utils import path_to_sqlite_uri

    from custom_components.engines.tracking import keep_mlflow_telemetry_off

    keep_mlflow_telemetry_off()

    uri = tracking_uri or path_to_sqlite_uri(str(output_dir / "mlruns.db"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("guidegen_evaluation")
    numbers: dict[str, float] = {}

    def collect(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                collect(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            numbers[prefix.replace(" ", "_").replace("(", "").replace(")", "")] = float(value)

    collect("", {k: metrics[k] for k in ("realism", "image_mask", "mask_prompt")})
    with mlflow.start_run(run_name=run_name):
        mlflow.log_metrics(numbers)
        mlflow.log_artifacts(str(output_dir), artifact_path="evaluation")
    return uri


def evaluate_run(
    generated_dir: str | os.PathLike,
    reference_datalist: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    split: str = "validation",
    class_map_path: str | None = None,
    segmentations_dir: str | None = None,
    ts_version: str = "auto",
    resample: bool = False,
    weights: Mapping[str, str | None] | None = None,
    slices_per_axis: int = 16,
    frame_size: int = 224,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Compute every available metric of a generated folder (against a reference datalist split), and write the report.

    Args:
        generated_dir: a ``guidegen generate`` run folder or ``guidegen synthesize`` output folder.
        reference_datalist: a prepared datalist (``guidegen prepare`` / ``demo-data``), or None: no realism metrics
            (they report why), image–mask and mask–prompt alignment only.
        output_dir: where metrics.json, metrics.md and the figures go.
        split: the datalist list holding the reference cases.
        class_map_path: class map (default: the reference datalist's, or the default class map without one).
        segmentations_dir: segmentations of the generated CTs (``<sample_id>.nii.gz``), for image–mask Dice/HD95.
        ts_version: labelling of those segmentations: ``auto``/``v1``/``v2`` (TotalSegmentator) or ``guidegen`` (class indices).
        resample: resample generated CTs to the reference spacing instead of refusing a mismatch.
        weights: ``{"inception", "i3d", "vgg"}`` -> local weights files (None: the defaults).
        slices_per_axis: slices per volume and axis for FID.
        frame_size: FVD frame size (I3D's 224 by default).
        tracking_uri: MLflow tracking URI (default: sqlite database in ``output_dir``).
        log_to_mlflow: log the numbers and files to MLflow.

    Returns:
        the metrics dict written to ``metrics.json``.

    Raises:
        GuideGenInputError: empty or missing folders, unreadable files, spacing mismatch without ``resample``.
    """
    samples = find_generated_samples(generated_dir)
    references: list[ReferenceCase] = []
    if reference_datalist is not None:
        references, reference_class_map = load_reference(reference_datalist, split)
        class_map = load_class_map(class_map_path) if class_map_path else reference_class_map
    else:
        class_map = load_class_map(class_map_path)
    generated, generated_spacing = _read_cts([s.ct_path for s in samples], "generated CT")
    reference, reference_spacing = _read_cts([r.image_path for r in references], "reference CT")
    paired: list[tuple[int, int]] = []
    if references:
        generated = _check_spacing(generated, generated_spacing, reference_spacing, bool(resample))
        by_label = {str(r.label_path.resolve()): i for i, r in enumerate(references) if r.label_path is not None}
        paired = [(g, by_label[str(Path(s.record.get("mask_from", "")).resolve())]) for g, s in enumerate(samples)
                  if s.record.get("mask_from") and str(Path(s.record["mask_from"]).resolve()) in by_label
                  and generated[g].shape == reference[by_label[str(Path(s.record["mask_from"]).resolve())]].shape]
        realism = _feature_metrics(generated, reference, paired, dict(weights or {}), int(slices_per_axis), int(frame_size))
    else:
        realism = {"fid": _NO_REFERENCE, "fvd": _NO_REFERENCE, "lpips": _NO_REFERENCE}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "generated": str(Path(generated_dir).resolve()), "num_generated": len(samples),
        "reference": None if reference_datalist is None else str(Path(reference_datalist).resolve()),
        "split": None if reference_datalist is None else split, "num_reference": len(references),
        "realism": realism,
        "image_mask": _image_mask_alignment(samples, segmentations_dir, ts_version, class_map),
        "mask_prompt": _mask_prompt_alignment(samples, class_map),
        "paired_for_lpips": len(paired),
    }
    from custom_components.metrics.plots import plot_confusion, plot_dice_bars, plot_montage

    montage_rows = [("generated", _middle_slices(generated))] + ([("reference", _middle_slices(reference))] if reference else [])
    figures = [str(plot_montage(montage_rows, output_dir / "montage_axial.png"))]
    if "per_organ" in metrics["image_mask"]:
        dice = {name: (v["dice"] if v["dice"] is not None else float("nan")) for name, v in metrics["image_mask"]["per_organ"].items()}
        figures.append(str(plot_dice_bars(dice, output_dir / "dice_per_organ.png")))
    if metrics["mask_prompt"].get("confusion"):
        entries = metrics["mask_prompt"]["confusion"]
        rows = sorted({e["named"] for e in entries})
        columns = sorted({e["found"] for e in entries})
        matrix = np.zeros((len(rows), len(columns)), dtype=int)
        for e in entries:
            matrix[rows.index(e["named"]), columns.index(e["found"])] += e["count"]
        figures.append(str(plot_confusion(matrix, rows, columns, output_dir / "tumor_location_confusion.png")))
    metrics["figures"] = figures
    write_json(metrics, output_dir / "metrics.json")
    (output_dir / "metrics.md").write_text(_markdown(metrics))
    if log_to_mlflow:
        metrics["mlflow_tracking_uri"] = _log_mlflow(metrics, output_dir, tracking_uri, Path(generated_dir).name)
        write_json(metrics, output_dir / "metrics.json")
    return metrics
