"""Reading source segmentations (TotalSegmentator output) and mapping them onto a GuideGen class map.

TotalSegmentator writes either one multi-label file (``--ml``) or a folder with one binary file per
structure (``<structure>.nii.gz``). Its v1 and v2 releases number the structures differently
(``resources/totalsegmentator_class_maps.json``). The version is taken, in this order, from what the user
states, from the label table TotalSegmentator v2 embeds in the NIfTI header, from the structure file names,
or from the label values when only one version has them all; otherwise the user is asked to state it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom_components.data.class_map import ClassMap, guess_source_map_from_names, resolve_source_map_name
from custom_components.data.io import check_same_grid, find_nifti, load_nifti, read_volume, strip_nifti_suffix
from custom_components.errors import CaseError, GuideGenInputError

__all__ = ["SourceSegmentation", "find_segmentation", "read_label_table", "load_source_segmentation", "map_to_classes"]

logger = logging.getLogger(__name__)

# Tissue of TotalSegmentator structures whose HU leave no doubt, as the range their median HU lies in. Vessels
# and parenchymal organs are left out: contrast agent moves them anywhere between 30 and 400 HU.
_TISSUE_MEDIAN_HU: tuple[tuple[str, re.Pattern[str], float, float], ...] = (
    ("air", re.compile(r"^(lung_|trachea$)"), -math.inf, -400.0),
    ("bone", re.compile(r"^(vertebrae_|rib_|sacrum$|hip_|femur_|humerus_|scapula_|clavicula_|sternum$|skull$)"), 100.0, math.inf),
    ("muscle", re.compile(r"^(gluteus_|iliopsoas_|autochthon_|brain$)"), -150.0, 150.0),
)
# A labelling is contradicted by the CT when less than this share of the voxels of structures with a known tissue
# lies in structures whose median HU fits (the shipped v1 example: 1.0 read as v1, 0.14 read as v2).
_MIN_TISSUE_AGREEMENT = 0.5

_LABEL_ENTRY = re.compile(r'<Label\s+Key="(\d+)"[^>]*>\s*<!\[CDATA\[(.*?)\]\]>\s*</Label>', re.S)


@dataclass
class SourceSegmentation:
    """A case's segmentation in its source labelling.

    Attributes:
        labels: (X, Y, Z) int32 source label values.
        label_names: source label value -> structure name, for the values this labelling defines.
        source_map: which of the class map's source maps assigns these structures to classes.
        image: a NIfTI image on the segmentation's grid (header and affine).
        files: the files read.
    """

    labels: np.ndarray
    label_names: dict[int, str]
    source_map: str
    image: nib.Nifti1Image
    files: list[Path]


def find_segmentation(segmentations_dir: Path, case_id: str) -> Path | None:
    """Where a case's segmentation lies: ``<id>.nii.gz``/``<id>.nii`` or a per-structure folder ``<id>/``
    (or ``<id>/segmentations/``, as TotalSegmentator names it); None when absent."""
    multilabel = find_nifti(segmentations_dir, case_id)
    if multilabel is not None:
        return multilabel
    folder = segmentations_dir / case_id
    if (folder / "segmentations").is_dir():
        return folder / "segmentations"
    return folder if folder.is_dir() else None


def read_label_table(image: nib.Nifti1Image) -> dict[int, str] | None:
    """The label table TotalSegmentator v2 stores in a NIfTI header extension, or None if there is none."""
    for extension in image.header.extensions:
        content = extension.get_content()
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        entries = {int(key): name.strip() for key, name in _LABEL_ENTRY.findall(text)}
        if entries:
            return entries
    return None


def _choose_source_map(
    case_id: str,
    stated: str,
    candidates: list[str],
    evidence: str,
    class_map: ClassMap,
    structure_names: Iterable[str] | None = None,
) -> str:
    """Pick the source labelling; with ``structure_names`` (name-based inputs) several candidates are fine
    when they all put those structures into the same classes."""
    if stated != "auto":
        chosen = resolve_source_map_name(stated, class_map.source_maps)
        if candidates and chosen not in candidates:
            raise CaseError(
                case_id,
                f"you stated {chosen} but the {evidence} only fit {', '.join(candidates)}; "
                "fix --ts_version or check the segmentation",
            )
        return chosen
    if len(candidates) == 1:
        return candidates[0]
    if candidates and structure_names is not None:
        names = sorted(set(structure_names))
        assignments = {tuple(class_map.structure_to_class(c)[n] for n in names) for c in candidates}
        if len(assignments) == 1:
            return candidates[0]
    if not candidates:
        raise CaseError(
            case_id,
            f"the {evidence} match no known labelling ({', '.join(class_map.source_maps)}); "
            "add a 'source_maps' entry to your class map",
        )
    raise CaseError(
        case_id,
        f"cannot tell which labelling the segmentation uses from its {evidence} (fits {', '.join(candidates)}); "
        "state it with --ts_version v1 or --ts_version v2",
    )


def tissue_agreement(
    labels: np.ndarray, ct_hu: np.ndarray, labellings: Mapping[str, Mapping[int, str]]
) -> dict[str, float | None]:
    """How well each labelling's structure names fit the CT: lungs air-filled, bones dense, muscles soft.

    Args:
        labels: (X, Y, Z) source label values.
        ct_hu: (X, Y, Z) CT in HU on the same grid.
        labellings: name -> {label value -> structure name}.

    Returns:
        name -> share (0..1) of the voxels of structures with a known tissue that lie in structures whose median
        HU fits that tissue; None when no such structure is present.
    """
    labelled = labels > 0
    structure_of, hu = labels[labelled], ct_hu[labelled]  # medians over labelled voxels only: far less to sort
    values, counts = np.unique(structure_of, return_counts=True)
    if not values.size:
        return {name: None for name in labellings}
    medians = dict(zip(values.tolist(), np.atleast_1d(ndimage.median(hu, structure_of, values)).tolist()))
    voxels = dict(zip(values.tolist(), counts.tolist()))
    agreement: dict[str, float | None] = {}
    for name, structures in labellings.items():
        fitting = typed = 0
        for value in medians:
            structure = structures.get(value, "")
            for _, pattern, low, high in _TISSUE_MEDIAN_HU:
                if pattern.match(structure):
                    typed += voxels[value]
                    fitting += voxels[value] if low <= medians[value] <= high else 0
                    break
        agreement[name] = round(fitting / typed, 3) if typed else None
    return agreement


def _load_multilabel(
    path: Path, case_id: str, stated: str, class_map: ClassMap, ct_hu: np.ndarray | None = None
) -> SourceSegmentation:
    what = f"segmentation of case '{case_id}'"
    image = load_nifti(path, what)
    data = read_volume(image, what, dtype=np.float64, check_finite=True)
    labels = data.astype(np.int32)
    if not np.array_equal(labels, data):
        raise CaseError(case_id, f"{path} holds non-integer values; a label map must hold whole numbers")
    table = read_label_table(image)
    if table is not None:
        candidates = guess_source_map_from_names(table.values(), class_map.source_maps)
        chosen = _choose_source_map(
            case_id, stated, candidates, "structure names in its header label table", class_map, table.values()
        )
        unknown = sorted(set(table.values()) - set(class_map.source_maps[chosen].values()))
        if unknown:
            raise CaseError(case_id, f"{path} names structures not in {chosen}: {unknown}")
        return SourceSegmentation(labels, table, chosen, image, [path])
    present = {int(v) for v in np.unique(labels) if v != 0}
    candidates = [name for name, m in class_map.source_maps.items() if present <= set(m)]
    evidence = "label values"
    if stated == "auto" and len(candidates) > 1 and ct_hu is not None and ct_hu.shape == labels.shape:
        agreement = tissue_agreement(labels, ct_hu, {c: class_map.source_maps[c] for c in candidates})
        plausible = [c for c in candidates if agreement[c] is None or agreement[c] >= _MIN_TISSUE_AGREEMENT]
        if plausible:  # when the CT contradicts every labelling, the CT is the suspect: leave the choice open
            candidates = plausible
        evidence = "label values and the HU of its lungs, bones and muscles"
        logger.info("case '%s': share of structures with plausible HU per labelling: %s", case_id, agreement)
    chosen = _choose_source_map(case_id, stated, candidates, evidence, class_map)
    return SourceSegmentation(labels, dict(class_map.source_maps[chosen]), chosen, image, [path])


def _load_structure_folder(folder: Path, case_id: str, stated: str, class_map: ClassMap) -> SourceSegmentation:
    files = sorted(p for p in folder.iterdir() if strip_nifti_suffix(p.name) is not None)
    if not files:
        raise CaseError(case_id, f"segmentation folder {folder} holds no .nii/.nii.gz files")
    names = [strip_nifti_suffix(p.name) for p in files]
    candidates = guess_source_map_from_names(names, class_map.source_maps)
    if not candidates:
        known = set().union(*(m.values() for m in class_map.source_maps.values()))
        raise CaseError(
            case_id,
            f"{folder} has structure files not in any known labelling: {sorted(set(names) - known)}",
        )
    chosen = _choose_source_map(case_id, stated, candidates, "structure file names", class_map, names)
    value_of = {name: value for value, name in class_map.source_maps[chosen].items()}
    reference = load_nifti(files[0], f"segmentation of case '{case_id}'")
    labels = np.zeros(reference.shape[:3], dtype=np.int32)
    for path, name in zip(files, names):
        what = f"structure '{name}' of case '{case_id}'"
        image = reference if path == files[0] else load_nifti(path, what)
        check_same_grid(reference, image, what)
        labels[read_volume(image, what, dtype=np.float32, check_finite=True) > 0.5] = value_of[name]
    return SourceSegmentation(labels, dict(class_map.source_maps[chosen]), chosen, reference, files)


def load_source_segmentation(
    location: Path, case_id: str, class_map: ClassMap, ts_version: str = "auto", ct_hu: np.ndarray | None = None
) -> SourceSegmentation:
    """Read a case's segmentation, multi-label file or per-structure folder.

    Args:
        location: from :func:`find_segmentation`.
        case_id: for messages.
        class_map: supplies the known source label maps.
        ts_version: ``auto``, ``v1``/``total_v1``, ``v2``/``total_v2`` or a class map ``source_maps`` name.
        ct_hu: the case's CT in HU on the segmentation's grid; with ``auto``, when the label values of a
            multi-label file fit several labellings, the labellings whose structures have implausible HU are
            ruled out (see :func:`tissue_agreement`).

    Raises:
        GuideGenInputError: unreadable files, unknown version or structures, or an undecidable version.
    """
    if location.is_dir():
        return _load_structure_folder(location, case_id, ts_version, class_map)
    return _load_multilabel(location, case_id, ts_version, class_map, ct_hu)


def map_to_classes(segmentation: SourceSegmentation, class_map: ClassMap, case_id: str) -> np.ndarray:
    """Map source label values to the class map's class indices.

    Returns:
        (X, Y, Z) uint8 class label volume.

    Raises:
        CaseError: label values that the source labelling does not define (all are named).
    """
    table = class_map.lookup_table(segmentation.label_names, segmentation.source_map)
    values = np.unique(segmentation.labels)
    unknown = [int(v) for v in values if v < 0 or v >= len(table) or table[v] < 0]
    if unknown:
        known = sorted(segmentation.label_names)
        raise CaseError(
            case_id,
            f"{segmentation.files[0]} has label values {unknown} that are not in {segmentation.source_map} "
            f"(its values are {known[0]}..{known[-1]}); check --ts_version or the class map's source_maps",
        )
    if class_map.num_classes > 256:
        raise GuideGenInputError(f"class map {class_map.path} has {class_map.num_classes} classes; at most 256 fit uint8")
    return table[segmentation.labels].astype(np.uint8)
