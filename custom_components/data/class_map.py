"""Class maps: which label index means which structure, and how source segmentations map onto it.

A GuideGen class map is a JSON file (the default one is ``resources/class_map_default.json``)::

    {
      "name": "guidegen_default",
      "tumor_class": "tumor",
      "body_class": "body",                                            # optional
      "classes": [
        {"index": 0, "name": "background"},
        {"index": 1, "name": "spleen", "sources": {"total_v1": ["spleen"], "total_v2": ["spleen"]}},
        ...
      ],
      "source_maps": {"my_labels": {"1": "spleen", "2": "liver"}}      # optional
    }

``sources`` names, for every *source label map*, the source structures merged into the class (by structure
name or by integer label value). Source label maps are TotalSegmentator's ``total_v1`` and ``total_v2``
(shipped in ``resources/totalsegmentator_class_maps.json``) plus any ``source_maps`` the file declares.
A source structure that no class lists maps to background (index 0). Everything downstream reads the number
of classes N from the class map.

``body_class`` (optional) names a class that is not read from any source but derived by ``guidegen prepare``
from the CT: every background voxel inside the skin (see :mod:`custom_components.data.body`). The shipped
``resources/class_map_body.json`` is the default map plus ``body`` (index 20); ``guidegen prepare --body_class
true`` selects it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from custom_components.errors import GuideGenInputError

__all__ = [
    "ClassMap",
    "default_class_map_path",
    "body_class_map_path",
    "load_class_map",
    "totalsegmentator_label_maps",
    "resolve_source_map_name",
    "guess_source_map_from_names",
]

_RESOURCES = "custom_components.data.resources"


def _resource_path(name: str) -> Path:
    return Path(str(resources.files(_RESOURCES).joinpath(name)))


def default_class_map_path() -> Path:
    """Path of the default 20-class GuideGen class map shipped with the package."""
    return _resource_path("class_map_default.json")


def body_class_map_path() -> Path:
    """Path of the shipped 21-class map: the default classes plus a derived ``body`` class (index 20)."""
    return _resource_path("class_map_body.json")


@lru_cache(maxsize=1)
def _load_totalsegmentator_maps() -> dict[str, dict[int, str]]:
    raw = json.loads(_resource_path("totalsegmentator_class_maps.json").read_text())
    return {version: {int(k): v for k, v in labels.items()} for version, labels in raw.items()}


def totalsegmentator_label_maps() -> dict[str, dict[int, str]]:
    """TotalSegmentator's label value -> structure name maps, keyed ``total_v1`` and ``total_v2``.

    Returns:
        a fresh copy (callers may modify it).
    """
    return {version: dict(labels) for version, labels in _load_totalsegmentator_maps().items()}


_VERSION_ALIASES = {"1": "total_v1", "v1": "total_v1", "2": "total_v2", "v2": "total_v2"}


def resolve_source_map_name(name: str, known: Iterable[str]) -> str:
    """Normalise a user-given source label map name (``v1``, ``1``, ``total_v1`` ...).

    Args:
        name: what the user typed.
        known: the source map names available.

    Returns:
        the canonical name.

    Raises:
        GuideGenInputError: the name is not a known source label map.
    """
    known = list(known)
    key = str(name).strip().lower()
    key = _VERSION_ALIASES.get(key, key)
    if key not in known:
        raise GuideGenInputError(
            f"unknown class-map version '{name}': known source label maps are {', '.join(known)} "
            "(TotalSegmentator v1 = total_v1, v2 = total_v2). Add a 'source_maps' entry to your class map "
            "file for another labelling scheme."
        )
    return key


def guess_source_map_from_names(names: Iterable[str], source_maps: Mapping[str, Mapping[int, str]]) -> list[str]:
    """Source label maps whose structure names include every name given.

    Args:
        names: structure names found in the data (file names, or a NIfTI label table).
        source_maps: candidate source label maps.

    Returns:
        matching map names, oldest first; empty when none contains all names.
    """
    wanted = set(names)
    return [name for name, labels in source_maps.items() if wanted <= set(labels.values())]


@dataclass(frozen=True)
class ClassMap:
    """A parsed and validated class map.

    Attributes:
        name: identifier of the class map (stored with data sets and checkpoints).
        class_names: name of each class, position = label index; index 0 is background.
        sources: source map name -> {source structure name -> class index}, listing only mapped structures.
        source_maps: source map name -> {source label value -> structure name}.
        tumor_class: name of the class painted from tumor masks, or None when the map has none.
        path: the file it was read from.
        raw: the JSON content, for writing a copy next to a data set.
        body_class: name of the class derived from the CT for background voxels inside the body, or None.
    """

    name: str
    class_names: tuple[str, ...]
    sources: dict[str, dict[str, int]]
    source_maps: dict[str, dict[int, str]]
    tumor_class: str | None
    path: str
    raw: dict[str, Any] = field(repr=False, compare=False)
    body_class: str | None = None

    @property
    def num_classes(self) -> int:
        """N, the number of classes including background."""
        return len(self.class_names)

    @property
    def tumor_index(self) -> int | None:
        """Label index of the tumor class, or None."""
        return None if self.tumor_class is None else self.class_names.index(self.tumor_class)

    @property
    def body_index(self) -> int | None:
        """Label index of the derived body class, or None when the map has none."""
        return None if self.body_class is None else self.class_names.index(self.body_class)

    def index_of(self, class_name: str) -> int:
        """Label index of a class.

        Raises:
            GuideGenInputError: no class has that name (the message lists the valid names).
        """
        if class_name not in self.class_names:
            raise GuideGenInputError(
                f"class '{class_name}' is not in class map '{self.name}' ({self.path}); "
                f"valid names: {', '.join(self.class_names)}"
            )
        return self.class_names.index(class_name)

    def structure_to_class(self, source_map: str) -> dict[str, int]:
        """Class index of every structure of a source label map (unlisted structures -> 0)."""
        mapped = self.sources.get(source_map, {})
        return {name: mapped.get(name, 0) for name in self.source_maps[source_map].values()}

    def lookup_table(self, labels: Mapping[int, str], source_map: str) -> np.ndarray:
        """Array mapping source label values to class indices.

        Args:
            labels: source label value -> structure name, as present in the data (for a multi-label file,
                the source map itself or the file's own label table).
            source_map: which source map's class assignments to use.

        Returns:
            int16 array ``table`` of length ``max(labels) + 1`` with ``table[value]`` = class index; -1 marks
            values that are not source labels (0 always maps to background).
        """
        by_name = self.structure_to_class(source_map)
        table = np.full(max([0, *labels]) + 1, -1, dtype=np.int16)
        table[0] = 0
        for value, structure in labels.items():
            table[value] = by_name.get(structure, 0)
        return table

    def to_json(self) -> str:
        """The class map as JSON text (same content as the file it came from)."""
        return json.dumps(self.raw, indent=1)


def _fail(path: str | os.PathLike, message: str) -> GuideGenInputError:
    return GuideGenInputError(f"class map {path}: {message}")


def _parse_source_maps(raw: Mapping[str, Any], path: str) -> dict[str, dict[int, str]]:
    maps = totalsegmentator_label_maps()
    extra = raw.get("source_maps", {})
    if not isinstance(extra, Mapping):
        raise _fail(path, "'source_maps' must be an object {map name: {label value: structure name}}")
    for map_name, labels in extra.items():
        try:
            maps[str(map_name)] = {int(k): str(v) for k, v in dict(labels).items()}
        except (TypeError, ValueError) as err:
            raise _fail(path, f"source_maps['{map_name}'] must map integer label values to names ({err})") from err
    return maps


def _parse_classes(raw: Mapping[str, Any], path: str) -> list[Mapping[str, Any]]:
    classes = raw.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise _fail(path, "needs a 'classes' list with background and at least one more class")
    for position, entry in enumerate(classes):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise _fail(path, f"classes[{position}] must be an object with a 'name'")
        if entry.get("index", position) != position:
            raise _fail(
                path,
                f"classes[{position}] ('{entry['name']}') has index {entry['index']}: indices must run 0..N-1 "
                "in list order",
            )
    names = [str(entry["name"]) for entry in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(path, f"duplicate class names {duplicates}")
    return classes


def _parse_sources(
    classes: list[Mapping[str, Any]], source_maps: Mapping[str, Mapping[int, str]], path: str
) -> dict[str, dict[str, int]]:
    sources: dict[str, dict[str, int]] = {}
    for index, entry in enumerate(classes):
        for map_name, structures in dict(entry.get("sources", {})).items():
            try:
                map_name = resolve_source_map_name(map_name, source_maps)
            except GuideGenInputError as err:
                raise _fail(path, f"class '{entry['name']}': {err}") from err
            labels = source_maps[map_name]
            assigned = sources.setdefault(map_name, {})
            for structure in structures:
                name = labels.get(structure) if isinstance(structure, int) else str(structure)
                if name is None or name not in labels.values():
                    raise _fail(path, f"class '{entry['name']}' lists '{structure}', which is not in {map_name}")
                if name in assigned and assigned[name] != index:
                    raise _fail(path, f"{map_name} structure '{name}' is assigned to two classes")
                assigned[name] = index
    return sources


def _parse_body_class(raw: Mapping[str, Any], classes: list[Mapping[str, Any]], path: str) -> str | None:
    body_class = raw.get("body_class")
    if body_class is None:
        return None
    names = [str(entry["name"]) for entry in classes]
    if body_class not in names:
        raise _fail(path, f"body_class '{body_class}' is not one of the classes")
    if body_class in (names[0], raw.get("tumor_class")):
        raise _fail(path, f"body_class '{body_class}' must be a class of its own, not background or the tumor class")
    if classes[names.index(body_class)].get("sources"):
        raise _fail(path, f"body_class '{body_class}' is derived from the CT; remove its 'sources'")
    return str(body_class)


def load_class_map(path: str | os.PathLike | None = None, body_class: bool = False) -> ClassMap:
    """Read and validate a class map file.

    Args:
        path: JSON class map; None for a shipped map: the default GuideGen map (20 classes), or with
            ``body_class`` the default map plus ``body`` (21 classes).
        body_class: require a derived body class (``guidegen prepare --body_class true``).

    Returns:
        the validated :class:`ClassMap`.

    Raises:
        GuideGenInputError: the file is missing or unreadable, its content is inconsistent (the message
            says which entry and why), or ``body_class`` is asked for and the map declares none.
    """
    if path is None:
        path = body_class_map_path() if body_class else default_class_map_path()
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise _fail(path, "file not found; pass an existing class map JSON or omit it for the default") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"not readable as JSON ({err})") from err
    if not isinstance(raw, Mapping):
        raise _fail(path, "must be a JSON object with a 'classes' list")
    source_maps = _parse_source_maps(raw, str(path))
    classes = _parse_classes(raw, str(path))
    names = tuple(str(entry["name"]) for entry in classes)
    tumor_class = raw.get("tumor_class")
    if tumor_class is not None and tumor_class not in names:
        raise _fail(path, f"tumor_class '{tumor_class}' is not one of the classes")
    derived_body = _parse_body_class(raw, classes, str(path))
    if body_class and derived_body is None:
        raise _fail(
            path,
            "has no body_class, but a body class was asked for (--body_class true); add a class such as "
            '{"name": "body"} and "body_class": "body" to the file, or omit --class_map to use the shipped '
            f"{body_class_map_path().name}",
        )
    return ClassMap(
        name=str(raw.get("name", path.stem)),
        class_names=names,
        sources=_parse_sources(classes, source_maps, str(path)),
        source_maps=source_maps,
        tumor_class=tumor_class,
        path=str(path),
        raw=dict(raw),
        body_class=derived_body,
    )
