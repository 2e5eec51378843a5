"""The MONAI datalist that all three GuideGen stages train on: writing, splitting and checked loading.

Layout (paths relative to the datalist's folder, as :func:`monai.data.load_decathlon_datalist` expects)::

    {
      "name": "...", "class_map": "class_map.json", "num_classes": 20,
      "mask_size": [128, 128, 128], "image_size": [256, 256, 256],
      "training":   [{"case_id": "...", "image": "images/<id>.nii.gz", "label": "labels/<id>.nii.gz",
                      "text": "The patient is ...", "record": {...}}, ...],
      "validation": [...]
    }
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from custom_components.data.class_map import ClassMap, load_class_map
from custom_components.data.writers import write_json
from custom_components.errors import GuideGenInputError

__all__ = ["DATALIST_ITEM_KEYS", "split_cases", "write_datalist", "load_datalist", "median_spacing"]

DATALIST_ITEM_KEYS = ("image", "label", "text")
_PATH_KEYS = ("image", "label")


def split_cases(case_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic training/validation split.

    The ids are sorted before a seeded permutation, so the split depends only on the set of ids, the
    fraction and the seed, not on file-system order. With two or more cases and a positive fraction at
    least one case goes to validation and at least one to training.

    Args:
        case_ids: all case ids.
        val_fraction: share of cases for validation, 0 <= f < 1.
        seed: permutation seed.

    Returns:
        (training ids, validation ids), each sorted.
    """
    if not 0 <= val_fraction < 1:
        raise GuideGenInputError(f"val_fraction = {val_fraction} must be in [0, 1)")
    ordered = sorted(case_ids)
    count = len(ordered)
    num_val = round(val_fraction * count)
    if val_fraction > 0 and count >= 2:
        num_val = min(max(num_val, 1), count - 1)
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(count)]
    return sorted(permuted[num_val:]), sorted(permuted[:num_val])


def write_datalist(
    path: str | os.PathLike,
    entries: Mapping[str, Mapping[str, Any]],
    class_map: ClassMap,
    val_fraction: float,
    seed: int,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the datalist and a copy of the class map beside it (both atomically).

    Args:
        path: datalist JSON file to write.
        entries: case id -> item with at least ``image``, ``label``, ``text`` (paths relative to ``path``'s
            folder).
        class_map: written next to the datalist as ``class_map.json``.
        val_fraction: see :func:`split_cases`.
        seed: see :func:`split_cases`.
        metadata: extra top-level keys (sizes, provenance).

    Returns:
        the datalist path.
    """
    path = Path(path)
    write_json(class_map.raw, path.parent / "class_map.json")
    training, validation = split_cases(list(entries), val_fraction, seed)
    content = {
        **dict(metadata or {}),
        "class_map": "class_map.json",
        "class_map_name": class_map.name,
        "num_classes": class_map.num_classes,
        "split": {"val_fraction": val_fraction, "seed": seed},
        "training": [dict(entries[case]) for case in training],
        "validation": [dict(entries[case]) for case in validation],
    }
    return write_json(content, path)


def _check_item(item: Any, where: str, base: Path, check_files: bool) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise GuideGenInputError(f"{where}: each entry must be an object with {', '.join(DATALIST_ITEM_KEYS)}")
    missing = [key for key in DATALIST_ITEM_KEYS if key not in item]
    if missing:
        raise GuideGenInputError(f"{where}: missing key(s) {missing}; each entry needs {', '.join(DATALIST_ITEM_KEYS)}")
    if not isinstance(item["text"], str) or not item["text"].strip():
        raise GuideGenInputError(f"{where}: 'text' must be a non-empty prompt string")
    resolved = dict(item)
    for key in _PATH_KEYS:
        file = Path(os.path.expanduser(str(item[key])))
        file = file if file.is_absolute() else base / file
        if check_files and not file.is_file():
            raise GuideGenInputError(
                f"{where}: '{key}' points at {file}, which does not exist; re-run `guidegen prepare` or fix the path"
            )
        resolved[key] = str(file)
    return resolved


def load_datalist(
    path: str | os.PathLike | None,
    splits: Sequence[str] = ("training", "validation"),
    class_map: ClassMap | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """Read a datalist and check it before training starts.

    Args:
        path: the datalist JSON.
        splits: lists to read; ``training`` must be present and non-empty when asked for, others may be empty.
        class_map: when given, the datalist's ``num_classes`` must equal its N.
        check_files: require every image/label file to exist.

    Returns:
        the datalist content with image/label paths made absolute and a ``class_map`` entry holding the
        loaded :class:`ClassMap` (from the datalist's own copy unless ``class_map`` is given).

    Raises:
        GuideGenInputError: unreadable file, missing keys, empty training list, missing files or a class
            count that does not match (each message names the datalist, the entry and the fix).
    """
    if path is None:  # the bundles' training configs have no default datalist (nothing outside a bundle is assumed)
        raise GuideGenInputError(
            "no datalist given: pass --datalist <datalist.json> (`guidegen prepare` writes one for your data, "
            "`guidegen demo-data --output_dir demo` the demo set's demo/datalist.json)"
        )
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise GuideGenInputError(f"datalist {path} not found; create it with `guidegen prepare` or `guidegen demo-data`") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GuideGenInputError(f"datalist {path} is not readable JSON ({err})") from err
    if not isinstance(content, Mapping):
        raise GuideGenInputError(f"datalist {path} must be a JSON object with a 'training' list")
    base = path.parent
    result: dict[str, Any] = dict(content)
    for split in splits:
        items = content.get(split, [] if split != "training" else None)
        if not isinstance(items, list) or (split == "training" and not items):
            raise GuideGenInputError(f"datalist {path}: '{split}' must be a non-empty list of entries")
        result[split] = [_check_item(item, f"datalist {path} {split}[{i}]", base, check_files) for i, item in enumerate(items)]
    if class_map is None:
        class_map = load_class_map(base / content["class_map"]) if "class_map" in content else load_class_map()
    declared = content.get("num_classes")
    if declared is not None and (not isinstance(declared, int) or declared != class_map.num_classes):
        raise GuideGenInputError(
            f"datalist {path} declares num_classes = {declared} but class map {class_map.path} has "
            f"{class_map.num_classes}; use the class map the data set was prepared with"
        )
    result["class_map"] = class_map
    return result


def median_spacing(items: Sequence[Mapping[str, Any]], key: str = "label") -> list[float]:
    """Median voxel size (mm) of the files under ``key`` (headers only), e.g. to give generated masks a
    realistic spacing.

    Args:
        items: datalist entries with absolute paths (from :func:`load_datalist`).
        key: which file of each entry.
    """
    if not items:
        raise GuideGenInputError("median_spacing needs at least one datalist entry")
    spacings = [nib.load(str(item[key])).header.get_zooms()[:3] for item in items]
    return [round(float(v), 4) for v in np.median(np.asarray(spacings, dtype=float), axis=0)]
