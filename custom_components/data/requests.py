"""What to generate: prompts from the command line, a prompt file, or clinical records.

A generation request is one prompt (with the clinical record it came from, when there is one). Prompt files may be

- ``.txt``: one prompt per line (blank lines and lines starting with ``#`` are skipped);
- ``.csv``: a header row and either a ``prompt`` (or ``text``) column, or the clinical record columns of
  :mod:`custom_components.data.records` (``age, sex, race, diagnosis, tumor_organ, tumor_count, tumor_size_mm,
  stage, remarks``), turned into the paper's prompt;
- ``.json``: a list of prompts and/or records, or ``{"prompts": [...]}`` / ``{"records": [...]}``.

A broken row (wrong number of CSV fields, a field of the wrong kind, no usable text) is reported with its line or
item number and left out; the other rows are still generated.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custom_components.data.prompts import record_to_prompt
from custom_components.data.records import RECORD_FIELDS, normalize_record
from custom_components.errors import GuideGenInputError

__all__ = ["GenerationRequest", "load_requests", "request_from_record"]

_PROMPT_COLUMNS = ("prompt", "text")
_CLINICAL_FIELDS = tuple(name for name in RECORD_FIELDS if name != "case_id")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to generate from.

    Args:
        prompt: the text given to the models.
        source: where it came from, for messages (e.g. ``"prompts.csv line 4"``).
        record: the clinical record behind the prompt (empty when the prompt was given as text).
    """

    prompt: str
    source: str
    record: dict[str, Any] = field(default_factory=dict)


def request_from_record(raw: Mapping[str, Any], where: str) -> GenerationRequest:
    """Turn one row (prompt text or clinical record) into a request.

    Args:
        raw: field -> value; a non-empty ``prompt``/``text`` field is used as given, otherwise the clinical
            fields are turned into the paper's prompt.
        where: location for messages.

    Raises:
        GuideGenInputError: a field of the wrong kind, or neither a prompt nor any clinical field.
    """
    if not isinstance(raw, Mapping):
        raise GuideGenInputError(f"{where}: expected a prompt string or a record object, got {type(raw).__name__}")
    if None in raw:  # csv.DictReader files surplus fields under the key None
        raise GuideGenInputError(f"{where}: more fields than the header has columns; quote fields that hold commas")
    values = {str(k).strip(): v for k, v in raw.items()}
    text = next((str(values[c]).strip() for c in _PROMPT_COLUMNS if values.get(c) is not None and str(values[c]).strip()), "")
    record_fields = {k: v for k, v in values.items() if k not in _PROMPT_COLUMNS}
    has_clinical = any(values.get(name) not in (None, "") for name in _CLINICAL_FIELDS)
    if not text and not has_clinical:
        raise GuideGenInputError(
            f"{where}: no prompt: give a '{_PROMPT_COLUMNS[0]}' value or clinical fields ({', '.join(_CLINICAL_FIELDS)})"
        )
    record: dict[str, Any] = {}
    if has_clinical:
        record = normalize_record({"case_id": values.get("case_id") or where, **record_fields}, where)
        record = {k: v for k, v in record.items() if v is not None}
    return GenerationRequest(prompt=" ".join((text or record_to_prompt(record)).split()), source=where, record=record)


def _rows(path: Path) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [(f"{path} line {i + 1}", line.strip()) for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise GuideGenInputError(f"{path}: empty CSV; the first row must be a header (e.g. 'prompt' or 'age,sex,...')")
            # The header is line 1; reader.line_num is the line the row ended on (rows may span lines when quoted).
            return [(f"{path} line {reader.line_num}", row) for row in reader]
    if suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, Mapping):
            for key in ("prompts", "records"):
                if isinstance(content.get(key), list):
                    content = content[key]
                    break
            else:
                raise GuideGenInputError(f"{path}: expected a list, {{'prompts': [...]}} or {{'records': [...]}}")
        if not isinstance(content, list):
            raise GuideGenInputError(f"{path}: expected a list of prompts or records, got {type(content).__name__}")
        return [(f"{path} item {i}", item) for i, item in enumerate(content)]
    raise GuideGenInputError(f"{path}: prompt files must end in .txt, .csv or .json")


def load_requests(
    prompt: str | Sequence[str] | None = None,
    prompts_file: str | os.PathLike | None = None,
    record: Mapping[str, Any] | None = None,
) -> tuple[list[GenerationRequest], list[str]]:
    """Collect the requests of one generation run from exactly one source.

    Args:
        prompt: a prompt (or a list of prompts) given directly.
        prompts_file: a ``.txt``, ``.csv`` or ``.json`` file (see the module docstring).
        record: one clinical record (field -> value), turned into the paper's prompt.

    Returns:
        the usable requests in order, and one message per broken row (row number and what is wrong).

    Raises:
        GuideGenInputError: no source or several, a missing/unreadable file, or no usable request at all.
    """
    given = [name for name, value in (("--prompt", prompt), ("--prompts", prompts_file), ("--record", record)) if value is not None]
    if len(given) != 1:
        raise GuideGenInputError(
            f"give exactly one of --prompt TEXT, --prompts FILE or --record FIELDS (got {', '.join(given) or 'none'})"
        )
    problems: list[str] = []
    if prompt is not None:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows: list[tuple[str, Any]] = [(f"--prompt {i}" if len(texts) > 1 else "--prompt", t) for i, t in enumerate(texts)]
        origin = "--prompt"
    elif record is not None:
        if not isinstance(record, Mapping):
            raise GuideGenInputError(f"--record must be field=value pairs, e.g. --record '{{age: 63, sex: male}}'; got {record!r}")
        rows = [("--record", dict(record))]
        origin = "--record"
    else:
        path = Path(prompts_file)
        if not path.is_file():
            raise GuideGenInputError(f"prompt file {path} not found; pass --prompts with a .txt, .csv or .json file")
        try:
            rows = _rows(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
            raise GuideGenInputError(f"prompt file {path} is not readable: {err}") from err
        origin = str(path)
    requests = []
    for where, row in rows:
        try:
            if isinstance(row, str):
                if not row.strip():
                    raise GuideGenInputError(f"{where}: empty prompt")
                requests.append(GenerationRequest(prompt=" ".join(row.split()), source=where))
            else:
                requests.append(request_from_record(row, where))
        except GuideGenInputError as err:
            problems.append(str(err))
    if not requests:
        detail = f" ({len(problems)} broken: {problems[0]}{' ...' if len(problems) > 1 else ''})" if problems else ""
        raise GuideGenInputError(f"no prompt to generate from in {origin}{detail}; give at least one prompt")
    return requests, problems
