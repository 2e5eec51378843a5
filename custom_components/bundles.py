"""Locating bundle folders, so configs work from any working directory."""

from __future__ import annotations

import sys
from pathlib import Path

from custom_components.errors import GuideGenInputError

__all__ = ["bundle_dir"]


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
