"""Zipping GuideGen bundles the way the MONAI model zoo distributes them.

A model-zoo archive is ``<name>_v<version>.zip`` holding one top-level folder ``<name>/`` with ``configs/``,
``docs/``, ``LICENSE`` and, when trained, ``models/`` with the model file's digest in ``large_files.yml`` (checked again
whenever the file is read, see :func:`custom_components.engines.read_model_file`). ``python -m monai.bundle download
--name <name> --url file://<zip> --bundle_dir <dir>`` unpacks it to ``<dir>/<name>/``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from custom_components.data.io import atomic_write
from custom_components.errors import GuideGenInputError

__all__ = ["ALL_BUNDLES", "BUNDLE_NAMES", "META_BUNDLE", "package_bundle", "package_bundles", "write_large_files"]

# the stage bundles, each with its own network and weights
BUNDLE_NAMES = ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
# the meta-bundle chaining them (configs only)
META_BUNDLE = "guidegen_pipeline"
ALL_BUNDLES = (*BUNDLE_NAMES, META_BUNDLE)
# Training by-products that never belong in a distributed bundle: resumable checkpoints, run outputs, caches.
_EXCLUDED_DIRS = {"outputs", "eval", "__pycache__", ".ipynb_checkpoints"}


def _included(relative: Path) -> bool:
    if any(part in _EXCLUDED_DIRS for part in relative.parts):
        return False
    return not (relative.parts[0] == "models" and relative.name.startswith("checkpoint"))


def package_bundle(bundle_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` for one bundle (atomically), with its model file's digest refreshed.

    Args:
        bundle_dir: the bundle folder (holding ``configs/metadata.json``); its folder name is the bundle name.
        output_dir: where the archive goes.

    Returns:
        the archive's path.

    Raises:
        GuideGenInputError: not a bundle folder, metadata without a version, or a damaged model file.
    """
    bundle_dir = Path(bundle_dir).resolve()
    metadata = bundle_dir / "configs" / "metadata.json"
    if not metadata.is_file():
        raise GuideGenInputError(f"{bundle_dir} is not a bundle folder: {metadata} is missing")
    version = json.loads(metadata.read_text()).get("version")
    if not version:
        raise GuideGenInputError(f"{metadata} has no 'version'; set one before packaging")
    name = bundle_dir.name
    if (bundle_dir / "models" / "model.pt").is_file():
        _record_model_digest(bundle_dir)
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and _included(p.relative_to(bundle_dir)))

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, arcname=str(Path(name) / path.relative_to(bundle_dir)))

    return atomic_write(Path(output_dir) / f"{name}_v{version}.zip", write)


def package_bundles(output_dir: str | os.PathLike, names: Sequence[str] = ALL_BUNDLES) -> list[Path]:
    """Package several GuideGen bundles (default: the three stages and the meta-bundle) from this source tree.

    Raises:
        GuideGenInputError: an unknown bundle name.
    """
    from custom_components.bundles import bundle_dir

    unknown = [n for n in names if n not in ALL_BUNDLES]
    if unknown:
        raise GuideGenInputError(f"unknown bundle(s) {unknown}; choose from {list(ALL_BUNDLES)}")
    return [package_bundle(bundle_dir(name), output_dir) for name in names]


def _record_model_digest(root: Path) -> Path:
    """Write ``<root>/large_files.yml`` with the md5 of ``<root>/models/model.pt`` (left untouched when unchanged).

    Raises:
        GuideGenInputError: the model file is damaged (a digest must never bless a broken file).
    """
    from custom_components.engines.checkpoints import model_file_digest, read_intact_model_file

    model = root / "models" / "model.pt"
    read_intact_model_file(model)
    text = (
        "# Weights shipped with this bundle (demo weights made by scripts/train_demo.sh); monai.bundle\n"
        "# download_large_files checks their md5 and does not download files that are already in place.\n"
        "large_files:\n"
        '  - path: "models/model.pt"\n'
        '    url: "models/model.pt"\n'
        f'    hash_val: "{model_file_digest(model, "md5")}"\n'
        '    hash_type: "md5"\n'
    )
    listing = root / "large_files.yml"
    if listing.is_file() and listing.read_text() == text:
        return listing
    return atomic_write(listing, lambda temporary: temporary.write_text(text))


def write_large_files(name: str) -> Path:
    """Record a bundle's model files with their md5 in ``<bundle>/large_files.yml`` (the model zoo's format).

    The demo weights are committed with the bundle, so ``python -m monai.bundle download_large_files
    --bundle_path <bundle>`` finds them in place and only verifies their hash; ``url`` names where the file lives
    inside the bundle. Reading the file compares it with this digest too (:func:`custom_components.engines.read_model_file`).

    Args:
        name: bundle name, e.g. ``guidegen_tcss``.

    Returns:
        the file written.

    Raises:
        GuideGenInputError: the bundle has no ``models/model.pt`` (train it first), or that file is damaged.
    """
    from custom_components.bundles import bundle_dir

    root = Path(bundle_dir(name))
    model = root / "models" / "model.pt"
    if not model.is_file():
        raise GuideGenInputError(f"{model} does not exist: train the bundle first (scripts/train_demo.sh)")
    return _record_model_digest(root)
