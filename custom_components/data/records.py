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

Unrecognised columns are kept in the record untouched, so nothing the user supplied is lost, but each one is
warned about once, with the closest recognised name: a column ``tumor_site`` meant as ``tumor_organ`` would
otherwise leave the organ out of every prompt without a word.

:func:`read_records` keeps going past bad rows (a value of the wrong kind, a CSV row with more or fewer fields
than the header, a repeated or missing ``case_id``) and lists each with its file, line and column, so that one
bad row fails only its own case; :func:`load_records` refuses the whole file instead.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custom_components.errors import GuideGenInputError

__all__ = ["RECORD_FIELDS", "RecordFile", "normalize_record", "suggest_field", "read_csv_rows", "read_records", "load_records"]

logger = logging.getLogger(__name__)

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

# Column names people use for a recognised field whose spelling is too far from it for a string-similarity guess
# (difflib would offer 'tumor_size_mm' for 'tumor_site').
_FIELD_SYNONYMS = {
    "tumor_site": "tumor_organ", "tumor_location": "tumor_organ", "site": "tumor_organ", "location": "tumor_organ",
    "organ": "tumor_organ", "gender": "sex", "ethnicity": "race", "id": "case_id", "patient_id": "case_id",
    "tumor_size": "tumor_size_mm", "size_mm": "tumor_size_mm", "diameter_mm": "tumor_size_mm",
    "tumor_number": "tumor_count", "num_tumors": "tumor_count", "notes": "remarks", "comment": "remarks",
}

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
        raise GuideGenInputError(
            f"{where}: field '{field}' = {value!r} must be a whole number {limits}; correct it or leave it empty"
        )
    return int(number)


def _as_positive_float(value: Any, field: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise GuideGenInputError(
            f"{where}: field '{field}' = {value!r} must be a positive number (millimetres); correct it or leave it empty"
        )
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


def suggest_field(column: str) -> str | None:
    """The recognised field a user probably meant by an unrecognised column name, or None.

    Args:
        column: the column (CSV header) or key (JSON) as written.

    Returns:
        a name from :data:`RECORD_FIELDS`: a known synonym (``gender`` -> ``sex``) or else the closest spelling
        (``Age`` -> ``age``, ``tumour_organ`` -> ``tumor_organ``); None when nothing is close.
    """
    key = column.strip().lower().replace(" ", "_").replace("-", "_").replace("tumour", "tumor")
    if key in RECORD_FIELDS:
        return key
    if key in _FIELD_SYNONYMS:
        return _FIELD_SYNONYMS[key]
    close = difflib.get_close_matches(key, RECORD_FIELDS, n=1, cutoff=0.75)
    return close[0] if close else None


@dataclass
class RecordFile:
    """The records of one file, read row by row (see :func:`read_records`).

    Attributes:
        path: the file.
        records: case id -> normalised record (see :func:`normalize_record`), for the valid rows, in file order.
        rejected: case id -> why its row(s) were refused (file, line, column and fix); a row without a
            readable case id is listed under its location (``"records.csv line 4"``).
        unknown_columns: unrecognised column -> the recognised field it probably meant (None if none is close).
    """

    path: Path
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    unknown_columns: dict[str, str | None] = field(default_factory=dict)


_Row = tuple[str, Any, str | None]  # (location for messages, the row's fields, why its shape is wrong or None)


def read_csv_rows(path: Path, required_column: str | None = "case_id", header_example: str = "case_id,age,sex,...") -> list[_Row]:
    """The rows of a CSV with a header, the package's one CSV reader of records and prompts.

    Rules: UTF-8 (a byte-order mark is dropped); the first row is the header; blank rows are skipped; a row whose
    field count differs from the header's (too few or too many, usually an unquoted comma) carries a problem that
    names its line and the fix, rather than being aligned by guesswork.

    Args:
        path: the CSV file.
        required_column: a column the header must have (None: any header).
        header_example: a header to show in the message about an empty file.

    Returns:
        ``(location, column -> value, problem or None)`` per row, in file order.

    Raises:
        GuideGenInputError: no header, or no ``required_column`` in it.
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        columns = [] if header is None else [name.strip() for name in header]
        if required_column is not None and required_column not in columns:
            raise GuideGenInputError(f"{path}: the CSV needs a header row with a '{required_column}' column (found {header})")
        if not columns:
            raise GuideGenInputError(f"{path}: empty CSV; the first row must be a header (e.g. {header_example})")
        rows: list[_Row] = []
        for values in reader:
            if not any(value.strip() for value in values):
                continue  # blank lines carry no record
            # line_num is the line the row ends on, which also counts line breaks inside quoted fields.
            where = f"{path} line {reader.line_num}"
            problem = None
            if len(values) != len(columns):
                problem = (
                    f"{where}: {len(values)} fields but the header has {len(columns)} columns; quote values that "
                    'contain commas ("liver, metastatic") and give every row one value per column (empty for none)'
                )
            rows.append((where, dict(zip(columns, values)), problem))
        return rows


def _json_rows(path: Path) -> list[_Row]:
    content = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(content, Mapping) and isinstance(content.get("records"), list):
        content = content["records"]
    if isinstance(content, Mapping):  # {case_id: {fields}}
        return [
            (f"{path} key '{key}'", {"case_id": key, **value} if isinstance(value, Mapping) else value, None)
            for key, value in content.items()
        ]
    if isinstance(content, list):
        return [(f"{path} item {i}", item, None) for i, item in enumerate(content)]
    raise GuideGenInputError(f"{path}: expected a list of records, {{'records': [...]}} or {{case_id: record}}")


def _read_rows(path: Path) -> list[_Row]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    raise GuideGenInputError(f"{path}: record files must end in .csv or .json")


def _case_id_of(row: Any) -> str | None:
    value = row.get("case_id") if isinstance(row, Mapping) else None
    return None if _is_missing(value) else str(value).strip()


def read_records(path: str | os.PathLike) -> RecordFile:
    """Read a CSV or JSON file of clinical records, keeping the valid rows and listing the bad ones.

    Each unrecognised column is logged once as a warning naming the column and the closest recognised field.

    Args:
        path: a CSV with a header row (one row per case), a JSON list of objects, ``{"records": [...]}``,
            or a JSON object keyed by case id.

    Returns:
        a :class:`RecordFile`; a row with a bad value, the wrong number of fields or a repeated or missing
        ``case_id`` is in ``rejected`` (every row of a repeated id), not in ``records``.

    Raises:
        GuideGenInputError: problems of the whole file: missing, unreadable, not CSV/JSON, no ``case_id``
            column, or no row at all.
    """
    path = Path(path)
    if not path.is_file():
        raise GuideGenInputError(f"records file {path} not found; pass --records with a CSV or JSON file")
    try:
        rows = _read_rows(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise GuideGenInputError(f"records file {path} is not readable: {err}") from err
    if not rows:
        raise GuideGenInputError(f"records file {path} holds no records")
    table = RecordFile(path)
    seen_at: dict[str, list[str]] = {}
    for where, row, problem in rows:
        case_id = _case_id_of(row)
        if isinstance(row, Mapping):
            for column in row:
                if str(column).strip() not in RECORD_FIELDS and str(column) not in table.unknown_columns:
                    table.unknown_columns[str(column)] = suggest_field(str(column))
        try:
            if problem is not None:
                raise GuideGenInputError(problem)
            if not isinstance(row, Mapping):
                raise GuideGenInputError(f"{where}: a record must be an object of field: value")
            record = normalize_record(row, where)
        except GuideGenInputError as err:
            table.rejected[case_id if case_id is not None else where] = str(err)
            continue
        seen_at.setdefault(record["case_id"], []).append(where)
        table.records[record["case_id"]] = record
    for case_id, places in seen_at.items():
        if len(places) > 1:
            del table.records[case_id]
            table.rejected[case_id] = (
                f"duplicate case ids in {path}: '{case_id}' at {', '.join(places)}; each case_id must appear once, "
                "delete or rename the extra rows"
            )
    for column, suggestion in table.unknown_columns.items():
        hint = f"did you mean '{suggestion}'? " if suggestion else ""
        logger.warning(
            "%s: column '%s' is not a record field and does not reach the prompt; %srecognised fields: %s",
            path, column, hint, ", ".join(RECORD_FIELDS),
        )
    return table


def load_records(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a CSV or JSON file of clinical records, refusing it if any row is bad.

    Args:
        path: as for :func:`read_records`.

    Returns:
        case id -> normalised record (see :func:`normalize_record`), in file order.

    Raises:
        GuideGenInputError: the file is missing or unreadable, or any row is bad (all bad rows are named).
    """
    table = read_records(path)
    if table.rejected:
        raise GuideGenInputError("; ".join(table.rejected.values()))
    return table.records
