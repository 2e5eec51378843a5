"""Zipping GuideGen bundles the way the MONAI model zoo distributes them.

A model-zoo archive is ``<name>_v<version>.zip`` holding one top-level folder ``<name>/`` with ``configs/``,
``docs/``, ``LICENSE`` and, when trained, ``models/``. ``python -m monai.bundle download --name <name>
--url file://<zip> --bundle_dir <dir>`` unpacks it to ``<dir>/<name>/``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from custom_components.data.io import atomic_write
from custom_components.errors import GuideGenInputError

__all__ = ["BUNDLE_NAMES", "package_bundle", "package_bundles"]

BUNDLE_NAMES = ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
# Training by-products that never belong in a distributed bundle: resumable checkpoints, run outputs, caches.
_EXCLUDED_DIRS = {"outputs", "eval", "__pycache__", ".ipynb_checkpoints"}


def _included(relative: Path) -> bool:
    if any(part in _EXCLUDED_DIRS for part in relative.parts):
        return False
    return not (relative.parts[0] == "models" and relative.name.startswith("checkpoint"))


def package_bundle(bundle_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` for one bundle (atomically).

    Args:
        bundle_dir: the bundle folder (holding ``configs/metadata.json``); its folder name is the bundle name.
        output_dir: where the archive goes.

    Returns:
        the archive's path.

    Raises:
        GuideGenInputError: not a bundle folder, or metadata without a version.
    """
    bundle_dir = Path(bundle_dir).resolve()
    metadata = bundle_dir / "configs" / "metadata.json"
    if not metadata.is_file():
        raise GuideGenInputError(f"{bundle_dir} is not a bundle folder: {metadata} is missing")
    version = json.loads(metadata.read_text()).get("version")
    if not version:
        raise GuideGenInputError(f"{metadata} has no 'version'; set one before packaging")
    name = bundle_dir.name
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and _included(p.relative_to(bundle_dir)))

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, arcname=str(Path(name) / path.relative_to(bundle_dir)))

    return atomic_write(Path(output_dir) / f"{name}_v{version}.zip", write)


def package_bundles(output_dir: str | os.PathLike, names: Sequence[str] = BUNDLE_NAMES) -> list[Path]:
    """Package several GuideGen bundles (default: all three) from this source tree.

    Raises:
        GuideGenInputError: an unknown bundle name.
    """
    from custom_components.bundles import bundle_dir

    unknown = [n for n in names if n not in BUNDLE_NAMES]
    if unknown:
        raise GuideGenInputError(f"unknown bundle(s) {unknown}; choose from {list(BUNDLE_NAMES)}")
    return [package_bundle(bundle_dir(name), output_dir) for name in names]
