"""Layout, metadata and version pins of the three GuideGen MONAI bundles.

The metadata is checked with MONAI's own ``verify_metadata`` against the model-zoo schema, fully offline:
the schema is a verbatim copy in ``tests/resources`` (pinned by sha256), and ``verify_metadata`` skips its
download when ``--filepath`` exists (``monai.apps.utils.download_url``). Any download attempt would go to a
dead loopback proxy and fail the test.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

# what each bundle's card lists beyond monai/torch/numpy: the table `guidegen package` writes, per bundle (issue 17)
from custom_components.packaging import REQUIRED_PACKAGES

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "tests" / "resources"
SCHEMA = RESOURCES / "meta_schema_20240725.json"
GENERATOR_SCHEMA = RESOURCES / "meta_schema_generator_ldm_20240318.json"
# sha256 of the MONAI model-zoo schemas copied verbatim into tests/resources
SCHEMA_SHA256 = {
    SCHEMA.name: "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678",
    GENERATOR_SCHEMA.name: "ed41361ebd2798aeb3125a7cdc22bf8c341329ea3254e27fbd17f20f26de355d",
}
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
CLASS_MAP = REPO / "custom_components" / "data" / "resources" / "class_map_default.json"

BUNDLES = ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
# the meta-bundle chaining them: configs and docs only, checked like the others where it applies
PIPELINE = "guidegen_pipeline"
ALL_BUNDLES = (*BUNDLES, PIPELINE)
REQUIRED_FILES = ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt", "LICENSE")
EXTRA_DATA_FORMAT = {"guidegen_autoencoder": "autoencoder_data_format", "guidegen_ldm": "generator_data_format"}
STATUS_LINE = "Layout, metadata and data preparation are in place; the network, train/inference configs are being"


def _bundle(name: str) -> Path:
    return REPO / "bundles" / name


def _metadata(name: str) -> dict:
    return json.loads((_bundle(name) / "configs" / "metadata.json").read_text())


def _installed(package: str) -> str:
    # compare public versions: a local build tag (torch "2.14.1+cu130") is not part of the pin
    return importlib.metadata.version(package).split("+")[0]


def _verify_metadata(meta_file: Path) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle verify_metadata`` offline against the local schema copy."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # a download attempt (urllib) would hit this dead loopback proxy and fail instead of reaching the network
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        no_proxy="",
        NO_PROXY="",
    )
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        str(meta_file),
        "--filepath",
        str(SCHEMA.relative_to(REPO)),
        "--hash_val",
        SCHEMA_SHA256[SCHEMA.name],
        "--hash_type",
        "sha256",
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_schema_copies_are_verbatim():
    for path in (SCHEMA, GENERATOR_SCHEMA):
        assert path.is_file(), f"missing schema copy {path}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == SCHEMA_SHA256[path.name], f"{path} was modified"


# ---------------------------------------------------------------- (a) verify_metadata, offline


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_verify_metadata_offline(name):
    meta = _bundle(name) / "configs" / "metadata.json"
    result = _verify_metadata(meta.relative_to(REPO))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Downloading" not in output, output
    assert "skipped downloading" in output, output  # monai found the local schema and did not fetch it
    assert "metadata is verified with no error" in output, output
    assert _metadata(name)["schema"] == SCHEMA_URL


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_verify_metadata_rejects_missing_required_key(name, tmp_path):
    meta = _metadata(name)
    del meta["version"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta, indent=4))
    result = _verify_metadata(broken)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "'version' is a required property" in output, output
    assert "Downloading" not in output, output


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_schema_checks_every_data_format(name):
    """The schema validates ``*_data_format`` entries too; a malformed tensor description is rejected."""
    schema = json.loads(SCHEMA.read_text())
    meta = _metadata(name)
    validator = jsonschema.Draft201909Validator(schema)
    validator.validate(meta)
    for key in [k for k in meta if k.endswith("_data_format")]:
        broken = json.loads(json.dumps(meta))
        broken[key]["outputs"]["pred"]["num_channels"] = "many"
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


# ---------------------------------------------------------------- (b) version pins


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_pinned_versions_match_installed(name):
    meta = _metadata(name)
    assert meta["monai_version"] == _installed("monai")
    assert meta["pytorch_version"] == _installed("torch")
    assert meta["numpy_version"] == _installed("numpy")
    pinned = meta["required_packages_version"]
    assert list(pinned) == list(REQUIRED_PACKAGES[name])
    for package, version in pinned.items():
        assert version == _installed(package), f"{name}: {package} pinned {version}, installed {_installed(package)}"
    assert meta["optional_packages_version"] == {}


def test_bundles_pin_the_same_versions():
    keys = ("schema", "monai_version", "pytorch_version", "numpy_version")
    first = _metadata(ALL_BUNDLES[0])
    versions: dict[str, str] = {}
    for name in ALL_BUNDLES:
        meta = _metadata(name)
        assert {k: meta[k] for k in keys} == {k: first[k] for k in keys}, name
        for package, version in meta["required_packages_version"].items():  # a package two bundles need: one version
            assert versions.setdefault(package, version) == version, (name, package)


# ---------------------------------------------------------------- (c) layout, logging config, docs


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_bundle_layout(name):
    root = _bundle(name)
    for rel in REQUIRED_FILES:
        path = root / rel
        assert path.is_file() and path.stat().st_size > 0, f"{name}: missing {rel}"
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "Copyright (c) guidegen developers" in license_text
    data_license = (root / "docs" / "data_license.txt").read_text()
    assert "https://github.com/wasserth/TotalSegmentator" in data_license
    assert "Apache License 2.0" in data_license


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_logging_conf_parses(name):
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logging.config.fileConfig(_bundle(name) / "configs" / "logging.conf", disable_existing_loggers=False)
        handlers = [h for h in root.handlers if h not in saved_handlers]
        assert len(handlers) == 1
        handler = handlers[0]
        assert type(handler) is logging.StreamHandler and handler.stream is sys.stdout
        assert handler.formatter._fmt == "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
        assert root.level == logging.INFO
    finally:
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)


@pytest.mark.parametrize("name", BUNDLES)
def test_readme_states_status_and_commands(name):
    readme = (_bundle(name) / "docs" / "README.md").read_text()
    assert "## Status" in readme
    mentioned = set(re.findall(rf"bundles/{name}/(configs/[\w.]+\.(?:yaml|json))", readme))
    missing = sorted(path for path in mentioned if not (_bundle(name) / path).is_file())
    # A README may describe configs that are not built yet only while its status says so.
    assert not missing or STATUS_LINE in readme, f"{name}: README names missing configs {missing}"
    assert f"python -m monai.bundle run training --config_file bundles/{name}/configs/train.yaml" in readme
    assert f"--config_file bundles/{name}/configs/inference.yaml" in readme
    assert f"bundles/{name}/configs/multi_gpu_train.yaml" in readme
    assert f"bundles/{name}/configs/train_cpu.yaml" in readme
    assert "guidegen prepare --images_dir" in readme and "guidegen demo-data --output_dir demo" in readme
    assert "## Data license" in readme and "## Intended use: research only" in readme


# ---------------------------------------------------------------- (d) stage-specific data formats


@pytest.mark.parametrize("name", sorted(EXTRA_DATA_FORMAT))
def test_stage_data_format_present(name):
    meta = _metadata(name)
    key = EXTRA_DATA_FORMAT[name]
    assert key in meta
    assert {"inputs", "outputs"} <= set(meta[key])
    assert "pred" in meta[key]["outputs"]


@pytest.mark.parametrize("name", BUNDLES)
def test_network_io_matches_stage(name):
    """MONAI tooling reads ``inputs#image`` and ``outputs#pred``; channel counts follow the class map."""
    n_classes = len(json.loads(CLASS_MAP.read_text())["classes"])
    meta = _metadata(name)
    io = meta["network_data_format"]
    image, pred = io["inputs"]["image"], io["outputs"]["pred"]
    expected = {
        "guidegen_tcss": (n_classes, [128, 128, 128], n_classes),
        "guidegen_autoencoder": (1, [256, 256, 256], 1),
        "guidegen_ldm": (4 + n_classes, [64, 64, 64], 4),
    }[name]
    assert (image["num_channels"], image["spatial_shape"], pred["num_channels"]) == expected
    assert len(image.get("channel_def", {})) == image["num_channels"]
    if name != "guidegen_autoencoder":
        assert io["inputs"]["text"]["type"] == "string"
    else:
        assert io["inputs"]["mask"]["num_channels"] == n_classes
        assert io["outputs"]["latent"]["num_channels"] == 4


def test_generator_style_formats_follow_generator_schema():
    """``generator_data_format`` (ldm, tcss) validates against the generator schema's definition of it; the
    autoencoder's follows its definition except MAISI's ``body_region``/``anatomy_list`` inputs, which the
    GuideGen autoencoder does not have (it is conditioned on the full one-hot mask instead)."""
    properties = json.loads(GENERATOR_SCHEMA.read_text())["properties"]
    for name in ("guidegen_ldm", "guidegen_tcss"):
        jsonschema.Draft4Validator(properties["generator_data_format"]).validate(_metadata(name)["generator_data_format"])
    ae_schema = json.loads(json.dumps(properties["autoencoder_data_format"]))
    ae_schema["properties"]["inputs"]["required"] = ["image"]
    jsonschema.Draft4Validator(ae_schema).validate(_metadata("guidegen_autoencoder")["autoencoder_data_format"])


def test_pipeline_bundle_chains_the_stage_bundles():
    readme = (_bundle(PIPELINE) / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run inference --config_file bundles/guidegen_pipeline/configs/inference.yaml" in readme
    assert "guidegen generate" in readme and "## Data license" in readme and "## Intended use: research only" in readme
    config = (_bundle(PIPELINE) / "configs" / "inference.yaml").read_text()
    assert "%" not in config.split("imports:")[1]  # no %file#id macros: they resolve against the working directory
    meta = _metadata(PIPELINE)
    assert meta["network_data_format"]["inputs"]["text"]["type"] == "string"
    assert meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] == [256, 256, 256]
