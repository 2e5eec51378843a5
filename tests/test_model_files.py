"""Model files are verified when they are read (issue 16, item 1): torch's own checksums, the digest recorded in the
bundle's large_files.yml, and finite parameters. A damaged file stops the run with the file and the fix named."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from custom_components.networks import read_checkpoint_info, read_model_file
from custom_components.errors import GuideGenInputError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TCSS = ROOT / "bundles/guidegen_tcss/models/model.pt"
PROMPT = ("The patient is a 63-year-old White male. In this imaging, the patient's condition is described as "
          "hepatocellular carcinoma, with a tumor in the liver, measuring 30 mm, stage II.")


def _flip_middle(path: Path, size: int = 4096) -> None:
    """Invert ``size`` bytes in the middle of a file (what the issue did to the shipped TCSS weights)."""
    middle = path.stat().st_size // 2
    with open(path, "r+b") as handle:
        handle.seek(middle)
        chunk = handle.read(size)
        handle.seek(middle)
        handle.write(bytes(byte ^ 0xFF for byte in chunk))


def _small_model_file(path: Path, **state_changes: torch.Tensor) -> Path:
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.GroupNorm(2, 4))
    state = {**network.state_dict(), **state_changes}
    torch.save({"model": state, "info": {"stage": "tcss", "num_classes": 20}}, path)
    return path


def _bundle_copy(tmp_path: Path, name: str = "guidegen_tcss") -> Path:
    """A bundle folder with the shipped model file and its large_files.yml (so the recorded md5 applies)."""
    bundle = tmp_path / name
    (bundle / "models").mkdir(parents=True)
    shutil.copy(ROOT / "bundles" / name / "large_files.yml", bundle / "large_files.yml")
    shutil.copy(ROOT / "bundles" / name / "models/model.pt", bundle / "models/model.pt")
    return bundle


@pytest.mark.parametrize("name", ["guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm"])
def test_shipped_model_files_load_without_warnings(name, caplog):
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint_info(ROOT / "bundles" / name / "models/model.pt")["stage"] == name.split("_", 1)[1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_flipped_bytes_are_refused_naming_the_file_and_the_fix(tmp_path):
    corrupt = tmp_path / "elsewhere" / "tcss.pt"  # a copy passed from outside any bundle: no large_files.yml entry
    corrupt.parent.mkdir()
    shutil.copy(SHIPPED_TCSS, corrupt)
    _flip_middle(corrupt)
    with pytest.raises(GuideGenInputError) as error:
        read_model_file(corrupt)
    message = str(error.value)
    assert str(corrupt) in message and "checksum" in message
    assert "git checkout" in message and "retrain" in message


def test_non_finite_parameters_are_refused_naming_them(tmp_path):
    weight = torch.nn.Conv3d(2, 4, 3).weight.detach().clone()
    weight[0, 0, 0, 0, 0] = float("nan")
    path = _small_model_file(tmp_path / "nan.pt", **{"0.weight": weight})
    with pytest.raises(GuideGenInputError, match=r"non-finite.*0\.weight") as error:
        read_model_file(path)
    assert str(path) in str(error.value)


def test_a_damaged_listed_file_names_both_digests_and_how_to_restore_it(tmp_path):
    bundle = _bundle_copy(tmp_path)
    model = bundle / "models/model.pt"
    recorded = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"][0]["hash_val"]
    _flip_middle(model)
    actual = hashlib.md5(model.read_bytes()).hexdigest()
    with pytest.raises(GuideGenInputError) as error:
        read_model_file(model)
    message = str(error.value)
    assert str(model) in message and recorded in message and actual in message
    assert "large_files.yml" in message and "git checkout -- " in message and "download" in message


def test_an_intact_file_that_differs_from_large_files_yml_is_used_with_a_warning(tmp_path, caplog):
    """Training into a bundle's own models/ folder (README, train_demo.sh) replaces the shipped file on purpose: the
    file is intact (its checksums and values are fine), so it is used, and the stale digest is pointed out."""
    bundle = _bundle_copy(tmp_path)
    model = bundle / "models/model.pt"
    _small_model_file(model)
    recorded = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"][0]["hash_val"]
    with caplog.at_level(logging.WARNING):
        assert read_model_file(model)["info"]["stage"] == "tcss"
        read_model_file(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # once per file version, not once per read
    assert recorded in warnings[0] and hashlib.md5(model.read_bytes()).hexdigest() in warnings[0]
    assert "guidegen package" in warnings[0] and "git checkout -- " in warnings[0]


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    bundle = _bundle_copy(tmp_path)
    model = bundle / "models/model.pt"
    calls = []
    real_new = hashlib.new
    monkeypatch.setattr(hashlib, "new", lambda *a, **k: (calls.append(a), real_new(*a, **k))[1])
    for _ in range(3):
        read_model_file(model)
    assert len(calls) == 1, calls
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))  # a new version: checked again
    read_model_file(model)
    assert len(calls) == 2


def test_files_saved_without_torch_checksums_still_load(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path = _small_model_file(tmp_path / "no_crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert read_model_file(path)["info"]["stage"] == "tcss"


def test_package_refreshes_the_digest_and_refuses_a_damaged_model(tmp_path):
    from custom_components.packaging import package_bundle

    bundle = tmp_path / "guidegen_tcss"
    shutil.copytree(ROOT / "bundles/guidegen_tcss", bundle, ignore=shutil.ignore_patterns("outputs", "eval", "checkpoint*"))
    _small_model_file(bundle / "models/model.pt")  # retrained in place: large_files.yml is stale
    package_bundle(bundle, tmp_path / "dist")
    entry = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"][0]
    assert entry["hash_val"] == hashlib.md5((bundle / "models/model.pt").read_bytes()).hexdigest()
    _flip_middle(bundle / "models/model.pt", size=64)
    with pytest.raises(GuideGenInputError, match="checksum"):
        package_bundle(bundle, tmp_path / "dist2")
    assert not (tmp_path / "dist2").exists() or not list((tmp_path / "dist2").iterdir())


def test_generate_with_a_corrupt_tcss_model_stops_without_a_traceback(tmp_path):
    """The issue's reproduction: `guidegen generate --tcss_model <flipped copy>` ran to exit 0 with NaN weights."""
    corrupt = tmp_path / "tcss.pt"
    shutil.copy(SHIPPED_TCSS, corrupt)
    _flip_middle(corrupt)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", "generate", "--prompt", PROMPT,
                             "--tcss_model", str(corrupt), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert str(corrupt) in result.stderr and "checksum" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("sample_*"))


@pytest.mark.parametrize("name", ["tcss", "ldm", "autoencoder"])
def test_any_stage_is_rebuilt_from_its_model_file_alone(name):
    """One builder for every stage (issue 18): the network a shipped file's info describes takes its weights strictly,
    and what cannot be built is refused by name."""
    from custom_components.networks import load_network, network_from_info, CheckpointInfo

    path = ROOT / f"bundles/guidegen_{name}/models/model.pt"
    info = read_checkpoint_info(path, stage=name)
    network = network_from_info(info, info["num_classes"], text_dim=384)
    loaded = load_network(path, network, CheckpointInfo(name, info["num_classes"], info["class_map_name"]))
    assert not loaded.training and sum(p.numel() for p in loaded.parameters()) > 0
    if name != "autoencoder":
        with pytest.raises(GuideGenInputError, match="text_dim"):
            network_from_info(info, info["num_classes"])
    with pytest.raises(GuideGenInputError, match="stage 'gan'"):
        network_from_info({**info, "stage": "gan"}, info["num_classes"], text_dim=384)


def test_a_training_checkpoint_exports_the_model_file_the_trainer_would_write(tmp_path):
    from custom_components.engines import make_ema, model_file_from_checkpoint

    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.GroupNorm(2, 4))
    ema = make_ema(network, 0.5)
    ema.update_parameters(network)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)  # the raw weights move on after the average was taken
    info = {"stage": "tcss", "num_classes": 20}
    checkpoint = tmp_path / "checkpoint_epoch=3.pt"
    torch.save({"network": network.state_dict(), "ema": ema.state_dict(), "info": info, "optimizer": {}}, checkpoint)

    for weights, expected in (("ema", ema.module.state_dict()), ("network", network.state_dict())):
        written = read_model_file(model_file_from_checkpoint(checkpoint, tmp_path / f"{weights}.pt", weights))
        assert written["info"]["stage"] == "tcss"
        assert set(written["model"]) == set(expected)
        for key, value in expected.items():
            assert torch.equal(written["model"][key], value), (weights, key)
    assert not torch.equal(read_model_file(tmp_path / "ema.pt")["model"]["0.weight"], network.state_dict()["0.weight"])

    model_file = _small_model_file(tmp_path / "model.pt")
    with pytest.raises(GuideGenInputError, match="not a training checkpoint.*already a model file"):
        model_file_from_checkpoint(model_file, tmp_path / "out.pt")
    with pytest.raises(GuideGenInputError, match="weights must be"):
        model_file_from_checkpoint(checkpoint, tmp_path / "out.pt", "latest")
