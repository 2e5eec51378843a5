"""Structured clinical records: reading CSV/JSON record files and normalising their fields.

A record describes one case. Recognised fields (all optional except ``case_id``):

============== ============================================================================
case_id        unique identifier; matches the image file name ``<case_id>.nii.gz``
age            age in years (whole number 0-120)
sex            ``male``/``female`` (``M``/``F``/``man``/``woman`` accepted); other text kept as written
race           race/ethnicity as free text, e.g. ``White``, ``Asian``
diagnosis      free text, e.g. ``hepatocellular carcinoma``
tumor_organ    organ holding the tumor(s); a class name such as ``liver`` or ``kidney``
tumor_count    number of tumors (whole number >= 0)
tumor_size_mm  largest tumor diameter in millimetres (> 0)
stage          e.g. ``II`` or ``T2N0M0`` (a leading word "stage" is dropped)
remarks        free text appended to the prompt
============== ============================================================================

Unrecognised columns are kept in the record untouched, so nothing the user supplied is lost.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_components.errors import GuideGenInputError

__all__ = ["RECORD_FIELDS", "normalize_record", "load_records"]

RECORD_FIELDS = (
    "case_id",
    "age",
    "sex",
    "race",
    "diagnosis",
    "tumor_organ",
    "tumor_count",
    "tumor_size_mm",
    "stage",
    "remarks",
)

_SEX_ALIASES = {"m": "male", "man": "male", "male": "male", "f": "female", "woman": "female", "female": "female"}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in {"", "nan", "none", "null", "n/a", "na"}


def _as_whole_number(value: Any, field: str, where: str, low: int, high: int | None = None) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < low or (high is not None and number > high):
        limits = f"{low}..{high}" if high is not None else f">= {low}"
        raise GuideGenInputError(f"{where}: field '{field}' = {value!r} must be a whole number {limits}")
    return int(number)


def _as_positive_float(value: Any, field: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise GuideGenInputError(f"{where}: field '{field}' = {value!r} must be a positive number (millimetres)")
    return number


def normalize_record(raw: Mapping[str, Any], where: str = "record") -> dict[str, Any]:
    """Validate one record and bring its fields to canonical types.

    Args:
        raw: field name -> value, as read from CSV (strings) or JSON.
        where: location used in error messages, e.g. ``"records.csv row 3"``.

    Returns:
        a new dict holding every field of :data:`RECORD_FIELDS` (missing ones as None) followed by any
        extra fields as given.

    Raises:
        GuideGenInputError: ``case_id`` is missing or a field has a value of the wrong kind.
    """
    record: dict[str, Any] = {name: None for name in RECORD_FIELDS}
    for key, value in raw.items():
        record[str(key).strip()] = None if _is_missing(value) else value
    if record["case_id"] is None:
        raise GuideGenInputError(f"{where}: 'case_id' is missing; every record needs the id of its image")
    record["case_id"] = str(record["case_id"]).strip()
    for text_field in ("race", "diagnosis", "tumor_organ", "remarks"):
        if record[text_field] is not None:
            record[text_field] = " ".join(str(record[text_field]).split())
    if record["age"] is not None:
        record["age"] = _as_whole_number(record["age"], "age", where, 0, 120)
    if record["sex"] is not None:
        sex = str(record["sex"]).strip()
        record["sex"] = _SEX_ALIASES.get(sex.lower(), sex)
    if record["tumor_count"] is not None:
        record["tumor_count"] = _as_whole_number(record["tumor_count"], "tumor_count", where, 0)
    if record["tumor_size_mm"] is not None:
        record["tumor_size_mm"] = _as_positive_float(record["tumor_size_mm"], "tumor_size_mm", where)
    if record["stage"] is not None:
        stage = str(record["stage"]).strip()
        record["stage"] = stage[len("stage") :].strip() if stage.lower().startswith("stage") else stage
    return record


def _read_rows(path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """Rows of a CSV or JSON record file, each with a location string for messages."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "case_id" not in [f.strip() for f in reader.fieldnames]:
                raise GuideGenInputError(
                    f"{path}: the CSV needs a header row with a 'case_id' column (found {reader.fieldnames})"
                )
            # Header is line 1, so data row k sits on line k + 1.
            return [(f"{path} line {i + 2}", row) for i, row in enumerate(reader)]
    if suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, Mapping) and isinstance(content.get("records"), list):
            content = content["records"]
        if isinstance(content, Mapping):  # {case_id: {fields}}
            return [(f"{path} key '{k}'", {"case_id": k, **dict(v)}) for k, v in content.items()]
        if isinstance(content, list):
            return [(f"{path} item {i}", item) for i, item in enumerate(content)]
        raise GuideGenInputError(f"{path}: expected a list of records, {{'records': [...]}} or {{case_id: record}}")
    raise GuideGenInputError(f"{path}: record files must end in .csv or .json")


def load_records(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a CSV or JSON file of clinical records.

    Args:
        path: a CSV with a header row (one row per case), a JSON list of objects, ``{"records": [...]}``,
            or a JSON object keyed by case id.

    Returns:
        case id -> normalised record (see :func:`normalize_record`), in file order.

    Raises:
        GuideGenInputError: the file is missing or unreadable, a row is invalid, or case ids repeat (all
            repeated ids are named with their rows).
    """
    path = Path(path)
    if not path.is_file():
        raise GuideGenInputError(f"records file {path} not found; pass --records with a CSV or JSON file")
    try:
        rows = _read_rows(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise GuideGenInputError(f"records file {path} is not readable: {err}") from err
    records: dict[str, dict[str, Any]] = {}
    seen_at: dict[str, list[str]] = {}
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise GuideGenInputError(f"{where}: a record must be an object of field: value")
        record = normalize_record(row, where)
        seen_at.setdefault(record["case_id"], []).append(where)
        records[record["case_id"]] = record
    repeated = {case: places for case, places in seen_at.items() if len(places) > 1}
    if repeated:
        details = "; ".join(f"'{case}' at {', '.join(places)}" for case, places in repeated.items())
        raise GuideGenInputError(f"duplicate case ids in {path}: {details}. Each case_id must appear once.")
    if not records:
        raise GuideGenInputError(f"records file {path} holds no records")
    return records
