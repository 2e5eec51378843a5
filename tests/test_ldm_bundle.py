"""Latent-generator bundle end to end on tiny demo data: cache latents with a (tiny, untrained) autoencoder,
train -> resume -> mask + prompt to CT, the latent cache's reuse/re-encode rules, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers_bundles import TINY_TEXT_UNET, run_bundle, run_two_process_training, train_then_resume
from helpers_tiny_text import make_tiny_text_encoder_dir

from custom_components.networks import read_model_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles/guidegen_ldm/configs"
TINY_ARCHITECTURE = TINY_TEXT_UNET


def save_tiny_autoencoder(path: Path, seed: int = 0) -> Path:
    """A tiny random autoencoder model file (16³ CT -> 2 x 8³ latent), as the autoencoder bundle writes it."""
    from custom_components.networks import MaskGuidedAutoencoder

    torch.manual_seed(seed)
    architecture = {"channels": [8, 16], "num_res_blocks": 1, "latent_channels": 2, "norm": "voxel", "norm_num_groups": 4}
    network = MaskGuidedAutoencoder(num_classes=20, **architecture)
    info = {"stage": "autoencoder", "num_classes": 20, "class_map_name": "guidegen_default", "architecture": architecture,
            "mask_input": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict(), "info": info}, path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from custom_components.data.demo.dataset import build_demo_dataset

    root = tmp_path_factory.mktemp("ldm")
    datalist = build_demo_dataset(root / "demo", num_phantoms=3, mask_size=8, image_size=16, progress=False)
    autoencoder = save_tiny_autoencoder(root / "ae" / "model.pt")
    tiny = {
        "datalist": str(datalist),
        "autoencoder_path": str(autoencoder),
        "output_dir": str(root / "out"),
        "ckpt_dir": str(root / "models"),
        "mask_size": [8, 8, 8],
        "max_epochs": 1,
        "save_interval": 1,
        "text_encoder_path": str(make_tiny_text_encoder_dir(root / "tiny_text")),
        "architecture": TINY_ARCHITECTURE,
    }
    override = root / "tiny.yaml"
    override.write_text(yaml.safe_dump(tiny))
    return {"root": root, "override": override, "datalist": datalist, "autoencoder": autoencoder, "tiny": tiny}


@pytest.fixture(scope="module")
def trained(workspace):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    return train_then_resume(configs, workspace["root"] / "models")


def test_training_caches_latents_and_stores_the_scale_factor(trained, workspace):
    info = read_model_file(trained["models"] / "model.pt")["info"]
    assert info["stage"] == "ldm" and info["latent_shape"] == [2, 8, 8, 8] and info["mask_factor"] == 1
    manifest = json.loads((workspace["root"] / "out/latent_cache/manifest.json").read_text())
    assert info["scale_factor"] == pytest.approx(manifest["scale_factor"]) and info["scale_factor"] > 0
    assert info["autoencoder_sha256"] == manifest["autoencoder_sha256"]
    assert len(manifest["cases"]) == len(json.loads(Path(workspace["datalist"]).read_text())["training"])
    # the second run found every latent up to date
    assert "encoded" not in trained["resumed"].stderr


def test_resume_continues_from_the_checkpoint(trained):
    first = trained["first_state"]["trainer"]
    state = torch.load(trained["models"] / "checkpoint_final.pt", weights_only=True)["trainer"]
    assert state["iteration"] == 2 * first["iteration"] > 0
    assert "resuming from" in trained["resumed"].stderr + trained["resumed"].stdout


def test_inference_writes_ct_on_the_mask_field_of_view(trained, workspace):
    out = workspace["root"] / "generated"
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--autoencoder_path", str(workspace["autoencoder"]), "--datalist", str(workspace["datalist"]),
                        "--output_dir", str(out), "--num_inference_steps", "3", "--guidance_scale", "2.0",
                        "--text_encoder_path", workspace["tiny"]["text_encoder_path"])
    assert result.returncode == 0, result.stderr[-4000:]
    validation = json.loads(Path(workspace["datalist"]).read_text())["validation"]
    for case in validation:
        folder = out / case["case_id"]
        ct, mask = nib.load(str(folder / "ct.nii.gz")), nib.load(str(folder / "mask.nii.gz"))
        assert ct.shape == (16, 16, 16) and ct.get_data_dtype() == np.int16 and mask.shape == (8, 8, 8)
        np.testing.assert_allclose(np.array(ct.header.get_zooms()) * 2, mask.header.get_zooms(), rtol=1e-5)
        corner = lambda image: nib.affines.apply_affine(image.affine, [-0.5, -0.5, -0.5])  # noqa: E731
        np.testing.assert_allclose(corner(ct), corner(mask), atol=1e-4)
        assert (folder / "prompt.txt").read_text().strip() == case["text"]
        assert (folder / "preview.png").is_file()


def _infer(trained, workspace, tmp_path, *extra):
    return run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                      "--autoencoder_path", str(workspace["autoencoder"]), "--output_dir", str(tmp_path / "o"),
                      "--num_inference_steps", "2", "--text_encoder_path", workspace["tiny"]["text_encoder_path"], *extra)


def test_mask_of_the_wrong_size_is_refused(trained, workspace, tmp_path):
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.uint8), np.eye(4)), str(mask))
    result = _infer(trained, workspace, tmp_path, "--mask_file", str(mask), "--prompt", "no abnormality")
    assert result.returncode != 0
    assert "latent grid" in result.stderr and "[8, 8, 8]" in result.stderr and not (tmp_path / "o").exists()


def test_mask_of_another_class_map_is_refused(trained, workspace, tmp_path):
    mask = tmp_path / "mask.nii.gz"
    data = np.zeros((8, 8, 8), np.uint8)
    data[2:4, 2:4, 2:4] = 57  # a TotalSegmentator label, not a GuideGen class
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(mask))
    result = _infer(trained, workspace, tmp_path, "--mask_file", str(mask), "--prompt", "no abnormality")
    assert result.returncode != 0
    assert "labels 0..57" in result.stderr and "20 classes" in result.stderr


def test_another_autoencoder_is_refused(trained, workspace, tmp_path):
    other = save_tiny_autoencoder(tmp_path / "other.pt", seed=1)
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--autoencoder_path", str(other), "--output_dir", str(tmp_path / "o"),
                        "--text_encoder_path", workspace["tiny"]["text_encoder_path"], "--datalist", str(workspace["datalist"]))
    assert result.returncode != 0
    assert "is not the one the latent generator was trained with" in result.stderr


def test_missing_autoencoder_checkpoint_is_a_clear_error(workspace, tmp_path):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    missing = tmp_path / "nowhere" / "model.pt"
    result = run_bundle("training", configs, "--autoencoder_path", str(missing), "--output_dir", str(tmp_path / "o"),
                        "--ckpt_dir", str(tmp_path / "m"))
    assert result.returncode != 0
    assert f"autoencoder checkpoint {missing} not found" in result.stderr and "guidegen_autoencoder" in result.stderr


def test_latent_cache_reuses_and_reencodes(workspace, tmp_path):
    from custom_components.data.class_map import load_class_map
    from custom_components.data.datalist import load_datalist
    from custom_components.runs.latent_cache import build_latent_cache
    from custom_components.pipelines import AutoencoderPipeline, load_autoencoder

    items = load_datalist(workspace["datalist"], splits=["training"])["training"]
    ae_path = save_tiny_autoencoder(tmp_path / "ae.pt")
    pipeline = AutoencoderPipeline(load_autoencoder(ae_path, load_class_map(None)))
    first = build_latent_cache(items, pipeline, ae_path, tmp_path / "cache", progress=False)
    stamps = {p: Path(p).stat().st_mtime_ns for p in (i["latent"] for i in first["items"])}
    again = build_latent_cache(items, pipeline, ae_path, tmp_path / "cache", progress=False)
    assert {p: Path(p).stat().st_mtime_ns for p in stamps} == stamps  # nothing re-encoded
    assert again["scale_factor"] == first["scale_factor"]
    # a new autoencoder checkpoint re-encodes everything
    save_tiny_autoencoder(ae_path, seed=3)
    pipeline = AutoencoderPipeline(load_autoencoder(ae_path, load_class_map(None)))
    third = build_latent_cache(items, pipeline, ae_path, tmp_path / "cache", progress=False)
    assert all(Path(p).stat().st_mtime_ns != t for p, t in stamps.items())
    assert third["autoencoder_sha256"] != first["autoencoder_sha256"]


def test_two_process_gloo_training_builds_the_cache_once_and_keeps_ranks_identical(workspace, tmp_path):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", CONFIGS / "multi_gpu_train.yaml"]
    result = run_two_process_training(configs, workspace["tiny"], tmp_path)
    # only rank 0 encoded (the other rank waited and read the manifest): the training cache once, the validation
    # cache (its own folder) once
    folders = [Path(f).name for f in re.findall(r"encoded \d+ of \d+ CTs into (\S+) ", result.stderr + result.stdout)]
    assert len(folders) == 2 and folders.count("validation") == 1, folders
