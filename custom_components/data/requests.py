"""What to generate: prompts from the command line, a prompt file, or clinical records.

A generation request is one prompt (with the clinical record it came from, when there is one). Prompt files may be

- ``.txt``: one prompt per line (blank lines and lines starting with ``#`` are skipped);
- ``.csv``: a header row and either a ``prompt`` (or ``text``) column, or the clinical record columns of
  :mod:`custom_components.data.records` (``age, sex, race, diagnosis, tumor_organ, tumor_count, tumor_size_mm,
  stage, remarks``), turned into the paper's prompt;
- ``.json``: a list of prompts and/or records, or ``{"prompts": [...]}`` / ``{"records": [...]}``.

A broken row (wrong number of CSV fields, a field of the wrong kind, no usable text) is reported with its line or
item number and left out; the other rows are still generated.

A prompt given as text is read by :func:`~custom_components.data.free_text.parse_free_text`: the fields it states
become the request's record (so that ``guidegen evaluate`` can score the sample's tumors), and a free-form prompt
("58yo F, RCC of the left kidney, 4.2 cm") is rewritten into the training template the models were trained on,
keeping the text as given in ``given_prompt``. A prompt already in the template, or one in which no field is found,
is used as given.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custom_components.data.free_text import is_template_prompt, parse_free_text
from custom_components.data.prompts import record_to_prompt
from custom_components.data.records import RECORD_FIELDS, normalize_record, read_csv_rows
from custom_components.errors import GuideGenInputError

__all__ = ["GenerationRequest", "load_requests", "request_from_record", "request_from_text"]

_PROMPT_COLUMNS = ("prompt", "text")
_CLINICAL_FIELDS = tuple(name for name in RECORD_FIELDS if name != "case_id")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to generate from.

    Args:
        prompt: the text given to the models.
        source: where it came from, for messages (e.g. ``"prompts.csv line 4"``).
        record: the clinical record behind the prompt: the given fields, or those read from a prompt given as text
            (empty when the text states none).
        given_prompt: the text as the user wrote it, when ``prompt`` is its rewrite into the training template;
            None when ``prompt`` is used as given or was built from record fields.
    """

    prompt: str
    source: str
    record: dict[str, Any] = field(default_factory=dict)
    given_prompt: str | None = None


def request_from_text(text: str, where: str, class_names: Sequence[str] | None = None) -> GenerationRequest:
    """Turn a prompt given as text into a request, rewriting free text into the training template.

    Args:
        text: the prompt as written.
        where: location for messages.
        class_names: the models' class names (``tumor_organ`` is one of them); default: the default class map's.

    Returns:
        the request: the template prompt (the text itself when it is in the template already or states no field),
        the fields read from the text, and the text as given when it was rewritten.

    Raises:
        GuideGenInputError: the text is empty or holds no word (``123``: a number where a description belongs).
    """
    text = " ".join(str(text).split())
    if not text:
        raise GuideGenInputError(f"{where}: empty prompt; write the patient and the findings, e.g. '63 yo male, HCC, 3 cm'")
    if not any(character.isalpha() for character in text):
        raise GuideGenInputError(
            f"{where} {text!r} holds no words; describe the patient and the findings, e.g. '63 yo male, HCC, 3 cm'"
        )
    record = parse_free_text(text, class_names)
    if is_template_prompt(text) or not record:
        return GenerationRequest(prompt=text, source=where, record=record)
    return GenerationRequest(prompt=record_to_prompt(record), source=where, record=record, given_prompt=text)


def request_from_record(raw: Mapping[str, Any], where: str, class_names: Sequence[str] | None = None) -> GenerationRequest:
    """Turn one row (prompt text or clinical record) into a request.

    Args:
        raw: field -> value; the clinical fields are turned into the paper's prompt. A non-empty ``prompt``/``text``
            field is used as given when the row also has clinical fields, and read as in :func:`request_from_text`
            when it has none.
        where: location for messages.
        class_names: the models' class names, for a prompt read as text.

    Raises:
        GuideGenInputError: a field of the wrong kind, or neither a prompt nor any clinical field.
    """
    if not isinstance(raw, Mapping):
        raise GuideGenInputError(f"{where}: expected a prompt string or a record object, got {type(raw).__name__}")
    values = {str(k).strip(): v for k, v in raw.items()}
    text = next((str(values[c]).strip() for c in _PROMPT_COLUMNS if values.get(c) is not None and str(values[c]).strip()), "")
    record_fields = {k: v for k, v in values.items() if k not in _PROMPT_COLUMNS}
    has_clinical = any(values.get(name) not in (None, "") for name in _CLINICAL_FIELDS)
    if not text and not has_clinical:
        raise GuideGenInputError(
            f"{where}: no prompt: give a '{_PROMPT_COLUMNS[0]}' value or clinical fields ({', '.join(_CLINICAL_FIELDS)})"
        )
    if not has_clinical:
        return request_from_text(text, where, class_names)
    record = normalize_record({"case_id": values.get("case_id") or where, **record_fields}, where)
    record = {k: v for k, v in record.items() if v is not None}
    return GenerationRequest(prompt=" ".join((text or record_to_prompt(record)).split()), source=where, record=record)


@dataclass(frozen=True)
class _Refused:
    """A file row the reader refused (wrong field count), with why."""

    problem: str


def _rows(path: Path) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [(f"{path} line {i + 1}", line.strip()) for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    if suffix == ".csv":
        # the records' reader: a row with more or fewer fields than the header is refused (its problem is raised when
        # the row is turned into a request, so the other rows still run)
        return [(where, _Refused(problem) if problem else row)
                for where, row, problem in read_csv_rows(path, required_column=None, header_example="'prompt' or 'age,sex,...'")]
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
    class_names: Sequence[str] | None = None,
) -> tuple[list[GenerationRequest], list[str]]:
    """Collect the requests of one generation run from exactly one source.

    Args:
        prompt: a prompt (or a list of prompts) given directly.
        prompts_file: a ``.txt``, ``.csv`` or ``.json`` file (see the module docstring).
        record: one clinical record (field -> value), turned into the paper's prompt.
        class_names: the models' class names, for prompts read as text (default: the default class map's).

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
            if isinstance(row, _Refused):
                raise GuideGenInputError(row.problem)
            if isinstance(row, str):
                requests.append(request_from_text(row, where, class_names))
            else:
                requests.append(request_from_record(row, where, class_names))
        except GuideGenInputError as err:
            problems.append(str(err))
    if not requests:
        detail = f" ({len(problems)} broken: {problems[0]}{' ...' if len(problems) > 1 else ''})" if problems else ""
        raise GuideGenInputError(f"no prompt to generate from in {origin}{detail}; give at least one prompt")
    return requests, problems
