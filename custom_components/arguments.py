"""Checking command-line arguments before a command does any work.

python-fire calls a command first and complains about arguments it could not use afterwards, so a mistyped flag
(``--num_sample 2``) used to run the whole job with the default and fail at the end. It also reads every value as a
Python literal: ``--prompt 123`` arrives as a number and ``--prompt "male, HCC"`` as a tuple of two strings.
:func:`checked_command_line` therefore reads the command line first: it refuses unknown, repeated or value-less
flags and stray words (naming the closest valid flag), and passes the values of text options on verbatim.

The value checks (:func:`whole_number`, :func:`real_number`, :func:`choice`, :func:`switch`, :func:`existing_file`,
:func:`existing_folder`, :func:`writable_folder`) are what each command and each settings object calls on its raw
values, so that every bad value is refused with the flag and the fix before a model is loaded or a byte written.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from custom_components.errors import GuideGenInputError

__all__ = [
    "CommandFlags",
    "checked_command_line",
    "choice",
    "existing_file",
    "existing_folder",
    "real_number",
    "switch",
    "whole_number",
    "writable_folder",
]

_HELP_FLAGS = ("--help", "-h")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# a single-dash word is a flag to fire (-h), a single dash before a digit is a negative number (--seed -1)
_FLAG_PATTERN = re.compile(r"^(--.+|-[A-Za-z].*)$")


@dataclass(frozen=True)
class CommandFlags:
    """The flags one command accepts.

    Attributes:
        names: the command's parameter names (``--name`` on the command line).
        text: those whose value is text, handed to the command exactly as typed.
        aliases: other accepted spellings -> parameter name (``format`` -> ``output_format``).
    """

    names: tuple[str, ...]
    text: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, function: Callable[..., Any], aliases: Mapping[str, str] | None = None) -> CommandFlags:
        """The flags of a command function: its keyword parameters; those annotated ``str`` or ``str | None`` are text."""
        parameters = inspect.signature(function).parameters.values()
        names = tuple(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        text = frozenset(p.name for p in parameters if str(p.annotation).replace(" ", "") in ("str", "str|None", "<class'str'>"))
        return cls(names, text, dict(aliases or {}))


def _is_flag(token: str) -> bool:
    return bool(_FLAG_PATTERN.match(token))


def _closest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean --x?)`` for the closest candidate, or nothing when none is close."""
    found = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean --{found[0]}?)" if found else ""


def checked_command_line(command: str, arguments: Sequence[str], flags: CommandFlags) -> list[str]:
    """Check one command's arguments and return them as python-fire should receive them.

    Accepted forms are fire's: ``--name value``, ``--name=value``, ``--name`` alone (true), ``--noname`` (false),
    hyphens for underscores (``--num-samples``), and fire's own flags after a lone ``--``. A help flag anywhere
    shows the command's help.

    Args:
        command: the subcommand's name (for messages).
        arguments: what followed the subcommand on the command line.
        flags: what the command accepts.

    Returns:
        ``[command, --name=value, ...]``: names canonical, text values quoted so that fire passes them on as typed.

    Raises:
        GuideGenInputError: unknown flags (each with the closest valid name), a flag given twice, a text flag without
            a value, or a word that is not a flag's value.
    """
    arguments = list(arguments)
    fire_flags: list[str] = []
    if "--" in arguments:  # fire's own flags (--trace, --verbose ...) follow the last lone "--"
        cut = len(arguments) - 1 - arguments[::-1].index("--")
        arguments, fire_flags = arguments[:cut], arguments[cut:]
    if any(token in _HELP_FLAGS for token in arguments):
        return [command, "--help"]
    accepted = set(flags.names) | set(flags.aliases)
    unknown: list[str] = []
    values: dict[str, Any] = {}
    position = 0
    while position < len(arguments):
        token = arguments[position]
        position += 1
        if not _is_flag(token):
            raise GuideGenInputError(
                f"unexpected argument {token!r}: every option of guidegen {command} is given as --name value "
                f"(a value with spaces in quotes); see guidegen {command} --help"
            )
        typed, has_value, value = token.lstrip("-").partition("=")
        key = typed.replace("-", "_")
        if key in accepted:
            key = flags.aliases.get(key, key)
        elif key.startswith("no") and key[2:] in flags.names and not has_value:
            key, has_value, value = key[2:], True, False  # fire's --noname for --name false
        else:
            unknown.append(f"--{typed}{_closest(key, accepted)}")
            if not has_value and position < len(arguments) and not _is_flag(arguments[position]):
                position += 1  # the unknown flag's value
            continue
        if not has_value:
            if position < len(arguments) and not _is_flag(arguments[position]):
                value = arguments[position]
                position += 1
            else:
                value = True  # fire's "--name" alone
        if key in values:
            raise GuideGenInputError(f"--{key} is given more than once on the command line; keep the one you mean")
        if key in flags.text and isinstance(value, bool) and value:
            raise GuideGenInputError(f"--{key} needs a value, e.g. --{key} VALUE; see guidegen {command} --help")
        values[key] = value
    if unknown:
        raise GuideGenInputError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for guidegen {command}; nothing was run. "
            f"Correct the spelling; guidegen {command} --help lists every option"
        )
    # repr() makes fire's literal parsing return the typed text unchanged ("123" stays text, "male, HCC" one string)
    canonical = [f"--{key}={value!r}" if key in flags.text and isinstance(value, str) else f"--{key}={value}"
                 for key, value in values.items()]
    return [command, *canonical, *fire_flags]


def _shown(value: Any) -> str:
    """A value as the user typed it: text quoted, numbers plain (2.7, -5, nan)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in {minimum:g}..{maximum:g}"
    if minimum is not None:
        return f"at least {minimum:g}"
    return f"at most {maximum:g}" if maximum is not None else "a number"


def whole_number(value: Any, flag: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer option's value: an int, an integral float (``1e3``) or its text; refused otherwise (no rounding).

    Args:
        value: what the command line or a config gave.
        flag: the option's name, for the message.
        minimum, maximum: inclusive limits (None: none).

    Returns:
        the number.

    Raises:
        GuideGenInputError: no value, not a whole number, or outside the limits.
    """
    limits = "" if minimum is None and maximum is None else f" {_bounds(minimum, maximum)}"
    if isinstance(value, bool):
        raise GuideGenInputError(f"--{flag} needs a value: a whole number{limits}")
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, Real) and math.isfinite(float(value)) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        number = int(value)
    if number is None:
        example = minimum if minimum is not None else 1
        raise GuideGenInputError(f"--{flag} {_shown(value)} is not a whole number{limits}; pass e.g. --{flag} {example}")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise GuideGenInputError(f"--{flag} {number}: must be {_bounds(minimum, maximum)}")
    return number


def real_number(value: Any, flag: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real option's value (an int, a float or its text).

    Raises:
        GuideGenInputError: no value, not a number, NaN or infinite, or outside the inclusive limits.
    """
    if isinstance(value, bool):
        raise GuideGenInputError(f"--{flag} needs a value: a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GuideGenInputError(f"--{flag} {_shown(value)} is not a number; pass e.g. --{flag} 1.0") from None
    if not math.isfinite(number):
        raise GuideGenInputError(f"--{flag} {number:g} is not finite; pass a finite number, e.g. --{flag} 1.0")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise GuideGenInputError(f"--{flag} {number:g}: must be {_bounds(minimum, maximum)}")
    return number


def choice(value: Any, flag: str, choices: Sequence[str]) -> str:
    """One of a fixed set of words.

    Raises:
        GuideGenInputError: another value, with the choices and the closest one.
    """
    word = str(value)
    if isinstance(value, bool) or word not in choices:
        found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
        hint = f" (did you mean {found[0]}?)" if found else ""
        raise GuideGenInputError(f"--{flag} {_shown(value)} is not one of {', '.join(choices)}{hint}; pass --{flag} {choices[0]}")
    return word


def switch(value: Any, flag: str) -> bool:
    """A yes/no option's value.

    Fire hands ``--flag false`` over as the string "false", which ``bool()`` would read as True; this reads
    true/false, yes/no, on/off, 1/0 (any case) and refuses anything else.

    Args:
        value: what fire passed (a bool, an int or a string).
        flag: the flag's name, for the error message.

    Returns:
        the flag's truth value.

    Raises:
        GuideGenInputError: the value is not one of the words above.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise GuideGenInputError(f"--{flag} {value!r} is not a yes/no value; pass --{flag} true or --{flag} false")


def _path_text(value: Any, flag: str) -> str:
    if isinstance(value, bool) or value is None or str(value).strip() == "":
        raise GuideGenInputError(f"--{flag} needs a path")
    return str(value)


def existing_file(value: Any, flag: str, expected: str) -> Path:
    """A path that must name an existing file.

    Args:
        value: the path given.
        flag: the option's name.
        expected: what the file should be, for the fix (e.g. "a prepared datalist.json").

    Raises:
        GuideGenInputError: missing, or a folder.
    """
    path = Path(_path_text(value, flag))
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "not found"
        raise GuideGenInputError(f"--{flag} {path} {state}; pass {expected}")
    return path


def existing_folder(value: Any, flag: str, expected: str) -> Path:
    """A path that must name an existing folder.

    Raises:
        GuideGenInputError: missing, or a file.
    """
    path = Path(_path_text(value, flag))
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "not found"
        raise GuideGenInputError(f"--{flag} {path} {state}; pass {expected}")
    return path


def writable_folder(value: Any, flag: str = "output_dir") -> Path:
    """An output folder that exists as a writable folder or can be created; nothing is created here.

    Returns:
        the folder as an absolute path.

    Raises:
        GuideGenInputError: the folder (or the nearest existing folder above it) is a file or not writable.
    """
    folder = Path(_path_text(value, flag)).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GuideGenInputError(f"--{flag} {folder}: {existing} is a file, not a folder; choose another --{flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GuideGenInputError(f"--{flag} {folder}: {existing} is not writable; choose a folder you can write to")
    return folder
