"""Clinical record -> text prompt, following the GuideGen paper's template.

The paper conditions both diffusion stages on prompts of the form::

    The patient is {demographics}. In this imaging, the patient's condition is described as {clinical information}.

:func:`record_to_prompt` fills that template deterministically from a normalised record
(:func:`custom_components.data.records.normalize_record`). Missing fields are left out without leaving
dangling words; a sentence whose fields are all missing is dropped. Examples::

    {age: 63, sex: male, race: White, diagnosis: hepatocellular carcinoma, tumor_organ: liver,
     tumor_count: 2, tumor_size_mm: 23.5, stage: II}
    -> "The patient is a 63-year-old White male. In this imaging, the patient's condition is described as
        hepatocellular carcinoma, with two tumors in the liver, the largest measuring 23.5 mm, stage II."

    {sex: female, diagnosis: no abnormality, tumor_count: 0}
    -> "The patient is female. In this imaging, the patient's condition is described as no abnormality,
        with no tumor."

A record read from free text (:mod:`custom_components.data.free_text`) may say "multiple" tumors instead of a
count (``tumor_count_min``); the prompt then reads "with multiple tumors in the liver, the largest measuring ...".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["record_to_prompt", "count_words", "stated_tumor_count", "NO_INFORMATION_PROMPT"]

NO_INFORMATION_PROMPT = "The patient's condition is not described."

_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _indefinite_article(phrase: str) -> str:
    """'a' or 'an' by how the phrase is spoken (ages are read aloud: 'an 8-year-old', 'an 11-year-old')."""
    first = phrase.split("-")[0].split()[0]
    if first.isdigit():
        return "an" if first.startswith("8") or first in {"11", "18"} else "a"
    return "an" if first[0].lower() in "aeiou" else "a"


def _demographics(record: Mapping[str, Any]) -> str | None:
    age, race, sex = record.get("age"), record.get("race"), record.get("sex")
    if age is None and race is None:
        return sex  # "The patient is female." / None
    words = [f"{age}-year-old"] if age is not None else []
    words += [str(race)] if race is not None else []
    words.append(str(sex) if sex is not None else "person")
    phrase = " ".join(words)
    return f"{_indefinite_article(phrase)} {phrase}"


def count_words(count: int) -> str:
    """A tumor count as the template writes it: "no", "one" ... "ten", then digits ("11")."""
    return _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)


def stated_tumor_count(record: Mapping[str, Any]) -> tuple[int, bool] | None:
    """How many tumors a record's prompt states.

    Args:
        record: a record (``tumor_count``, ``tumor_count_min``, ``tumor_organ``, ``tumor_size_mm``).

    Returns:
        ``(count, at_least)``: ``tumor_count`` as given; ``(tumor_count_min, True)`` for "multiple" tumors (a
        free-text plural without a number, see :mod:`custom_components.data.free_text`); ``(1, False)`` when only an
        organ or a size is given (the prompt says "a tumor"); None when the record says nothing about tumors.
    """
    if record.get("tumor_count") is not None:
        return int(record["tumor_count"]), False
    if record.get("tumor_count_min") is not None and int(record["tumor_count_min"]) > 1:
        return int(record["tumor_count_min"]), True
    if record.get("tumor_organ") is not None or record.get("tumor_size_mm") is not None:
        return 1, False
    return None


def _tumor_phrase(record: Mapping[str, Any]) -> str | None:
    stated = stated_tumor_count(record)
    if stated is None:
        return None
    count, at_least = stated
    if count == 0:
        return "no tumor"
    organ, size = record.get("tumor_organ"), record.get("tumor_size_mm")
    phrase = "multiple tumors" if at_least else "a tumor" if count == 1 else f"{count_words(count)} tumors"
    if organ is not None:
        phrase += f" in the {str(organ).replace('_', ' ')}"
    if size is not None:
        phrase += f", {'measuring' if count == 1 and not at_least else 'the largest measuring'} {float(size):g} mm"
    return phrase


def _clinical_information(record: Mapping[str, Any]) -> str | None:
    parts = []
    if record.get("diagnosis") is not None:
        parts.append(str(record["diagnosis"]))
    tumor = _tumor_phrase(record)
    if tumor is not None:
        parts.append(f"with {tumor}" if parts else tumor)
    if record.get("stage") is not None:
        parts.append(f"stage {record['stage']}")
    text = ", ".join(parts)
    if record.get("remarks") is not None:
        text = f"{text}; {record['remarks']}" if text else str(record["remarks"])
    return text or None


def record_to_prompt(record: Mapping[str, Any]) -> str:
    """Build the GuideGen prompt for a clinical record.

    Args:
        record: a normalised record (see :mod:`custom_components.data.records`); missing fields may be
            absent or None.

    Returns:
        the prompt; :data:`NO_INFORMATION_PROMPT` when the record holds neither demographics nor clinical
        information.
    """
    sentences = []
    demographics = _demographics(record)
    if demographics is not None:
        sentences.append(f"The patient is {demographics}.")
    clinical = _clinical_information(record)
    if clinical is not None:
        sentences.append(f"In this imaging, the patient's condition is described as {clinical.rstrip('.')}.")
    return " ".join(sentences) if sentences else NO_INFORMATION_PROMPT
