"""Locating bundle folders, so configs work from any working directory."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_components.errors import GuideGenInputError

__all__ = ["bundle_dir", "bundle_config"]


def bundle_dir(name: str) -> str:
    """Absolute path of a GuideGen bundle folder (the one holding ``configs/metadata.json``).

    Looked up, in order, on ``sys.path`` (``python -m monai.bundle run`` puts the running bundle's folder
    there, also for a bundle downloaded from the model zoo) and in this source tree's ``bundles/`` folder.

    Args:
        name: bundle name, e.g. ``guidegen_tcss``.

    Raises:
        GuideGenInputError: the bundle cannot be found (pass ``--bundle_root`` then).
    """
    candidates = [Path(entry) for entry in sys.path if entry and Path(entry).name == name]
    candidates.append(Path(__file__).resolve().parents[1] / "bundles" / name)
    for candidate in candidates:
        if (candidate / "configs" / "metadata.json").is_file():
            return str(candidate.resolve())
    raise GuideGenInputError(f"bundle '{name}' not found on sys.path or in the source tree; pass --bundle_root <folder>")


def bundle_config(name: str, config_name: str = "inference.yaml", overrides: Mapping[str, Any] | None = None) -> Any:
    """A sibling bundle's config, parsed from its absolute path with ``overrides`` applied.

    This is how the meta-bundle chains the stage bundles: it reads their own inference configs (so each stage's
    schedule, clipping and defaults stay defined in one place) without MONAI's ``%file#id`` macros, which resolve
    relative to the working directory. Overrides whose value is None are left out, so the sibling's default holds.

    Args:
        name: bundle name, e.g. ``guidegen_ldm``.
        config_name: file under the bundle's ``configs/``.
        overrides: config id -> value.

    Returns:
        a :class:`monai.bundle.ConfigParser`; ``parser.get_parsed_content(id)`` builds a component.

    Raises:
        GuideGenInputError: the bundle or its config cannot be found.
    """
    from monai.bundle import ConfigParser

    path = Path(bundle_dir(name)) / "configs" / config_name
    if not path.is_file():
        raise GuideGenInputError(f"bundle '{name}' has no configs/{config_name} (looked at {path})")
    parser = ConfigParser()
    parser.read_config(str(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            parser[key] = value
    return parser
