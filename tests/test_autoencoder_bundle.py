"""Autoencoder bundle end to end on tiny demo data: train (GAN on from the start) -> resume -> reconstruct,
encode/decode files, MLflow record, DDP on 2 CPU processes, the mask-free ablation, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers_bundles import run_bundle, run_two_process_training, train_then_resume

from custom_components.networks import read_model_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles/guidegen_autoencoder/configs"
TINY_ARCHITECTURE = {
    "channels": [8, 16],
    "num_res_blocks": 1,
    "latent_channels": 2,
    "norm": "voxel",
    "norm_num_groups": 4,
    "use_checkpointing": False,
    "intensity_shift": -0.5,
    "intensity_scale": 0.25,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from custom_components.data.demo.dataset import build_demo_dataset

    root = tmp_path_factory.mktemp("autoencoder")
    datalist = build_demo_dataset(root / "demo", num_phantoms=3, mask_size=8, image_size=16, progress=False)
    tiny = {
        "datalist": str(datalist),
        "output_dir": str(root / "out"),
        "ckpt_dir": str(root / "models"),
        "image_size": [16, 16, 16],
        "patch_size": [16, 16, 16],
        "max_epochs": 1,
        "save_interval": 1,
        "adversarial_start": 0,
        "mask_input": True,  # the paper's mask pyramid (the demo recipe trains without it)
        "windows": "clinical+random",
        "architecture": TINY_ARCHITECTURE,
        "discriminator": {"channels": 4, "num_layers_d": 2},
    }
    override = root / "tiny.yaml"
    override.write_text(yaml.safe_dump(tiny))
    return {"root": root, "override": override, "datalist": datalist}


@pytest.fixture(scope="module")
def trained(workspace):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    return train_then_resume(configs, workspace["root"] / "models")


def test_training_writes_model_and_full_gan_state(trained):
    models = trained["models"]
    model = read_model_file(models / "model.pt")
    assert model["info"]["stage"] == "autoencoder" and model["info"]["num_classes"] == 20
    assert model["info"]["architecture"]["channels"] == [8, 16] and model["info"]["mask_input"] is True
    assert model["info"]["hu_range"] == [-1024.0, 3071.0]
    assert (model["info"]["architecture"]["intensity_shift"], model["info"]["architecture"]["intensity_scale"]) == (-0.5, 0.25)
    state = torch.load(models / "checkpoint_final.pt", weights_only=True)
    for key in ("network", "optimizer", "hdr_window", "frame_discriminator", "volume_discriminator", "discriminator_optimizer", "trainer"):
        assert key in state, key
    # the discriminators were trained (adversarial_start 0): their optimiser has state
    assert state["discriminator_optimizer"]["state"]
    assert "perceptual loss off (perceptual_weight = 0)" in trained["first"].stderr + trained["first"].stdout


def test_resume_continues_from_the_checkpoint(trained):
    first = trained["first_state"]["trainer"]
    state = torch.load(trained["models"] / "checkpoint_final.pt", weights_only=True)["trainer"]
    assert state["iteration"] == 2 * first["iteration"] > 0 and state["max_epochs"] == 2
    assert "resuming from" in trained["resumed"].stderr + trained["resumed"].stdout


def test_mlflow_run_logs_every_loss_term(trained, workspace):
    from mlflow.tracking import MlflowClient

    from monai.utils import path_to_sqlite_uri

    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(workspace["root"] / "out/mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name("guidegen_autoencoder").experiment_id])
    assert len(runs) == 1  # the resumed training continues the first run
    metrics = runs[0].data.metrics
    for name in ("loss", "reconstruction_loss", "kl_loss", "generator_adversarial_loss", "discriminator_loss", "hdr_scale"):
        assert name in metrics and np.isfinite(metrics[name]), name
    assert runs[0].data.params["hdr"] == "True"


def test_inference_reconstructs_with_metrics(trained, workspace):
    out = workspace["root"] / "recon"
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--datalist", str(workspace["datalist"]), "--output_dir", str(out), "--decode_tile", "3", "--encode_tile", "8")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["cases"] and not summary["failed"]
    for case_id, metrics in summary["cases"].items():
        assert set(metrics) == {"psnr_lung", "psnr_soft_tissue", "psnr_bone", "mae_hu"}
        original = nib.load(str(workspace["datalist"].parent / "images" / f"{case_id}.nii.gz"))
        recon = nib.load(str(out / case_id / "reconstruction.nii.gz"))
        assert recon.shape == original.shape and recon.get_data_dtype() == np.int16
        np.testing.assert_allclose(recon.affine, original.affine, atol=1e-4)
        assert (out / case_id / "preview.png").is_file()
    assert "| **mean** |" in (out / "metrics.md").read_text()


def test_encode_then_decode_files_keep_geometry(trained, workspace, tmp_path):
    case = json.loads(Path(workspace["datalist"]).read_text())["training"][0]
    base = Path(workspace["datalist"]).parent
    image, label = base / case["image"], base / case["label"]
    latent, decoded = tmp_path / "z.nii.gz", tmp_path / "ct.nii.gz"
    model = ["--model_path", str(trained["models"] / "model.pt")]
    encoded = run_bundle("encode", [CONFIGS / "inference.yaml"], *model, "--image_file", str(image), "--label_file", str(label), "--latent_file", str(latent))
    assert encoded.returncode == 0, encoded.stderr[-4000:]
    z = nib.load(str(latent))
    assert z.shape == (8, 8, 8, 2)  # 16³ / f=2, 2 latent channels
    result = run_bundle("decode", [CONFIGS / "inference.yaml"], *model, "--latent_file", str(latent), "--label_file", str(label), "--output_file", str(decoded))
    assert result.returncode == 0, result.stderr[-4000:]
    original, ct = nib.load(str(image)), nib.load(str(decoded))
    assert ct.shape == original.shape and ct.get_data_dtype() == np.int16
    np.testing.assert_allclose(ct.affine, original.affine, atol=1e-4)


def test_mask_of_another_field_of_view_is_refused(trained, workspace, tmp_path):
    case = json.loads(Path(workspace["datalist"]).read_text())["training"][0]
    image = Path(workspace["datalist"]).parent / case["image"]
    wrong = tmp_path / "wrong_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.diag([9.0, 9.0, 9.0, 1.0])), str(wrong))
    result = run_bundle("encode", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--image_file", str(image), "--label_file", str(wrong), "--latent_file", str(tmp_path / "z.nii.gz"))
    assert result.returncode != 0
    assert "do not cover the same field of view" in result.stderr and not (tmp_path / "z.nii.gz").exists()


def test_class_map_of_another_size_is_refused(trained, workspace, tmp_path):
    class_map = tmp_path / "three.json"
    class_map.write_text(json.dumps({"classes": [{"name": "background"}, {"name": "liver"}, {"name": "tumor"}], "tumor_class": "tumor"}))
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--datalist", str(workspace["datalist"]), "--output_dir", str(tmp_path / "o"), "--class_map_path", str(class_map))
    assert result.returncode != 0
    assert "trained with 20 classes" in result.stderr and "has 3" in result.stderr


def test_paper_config_without_vgg_weights_fails_clearly(workspace, tmp_path):
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    result = run_bundle("training", [CONFIGS / "train.yaml", workspace["override"]], "--device", "$torch.device('cpu')",
                        "--amp", "False", "--vgg_weights_path", str(missing), "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"))
    assert result.returncode != 0
    assert str(missing) in result.stderr and "perceptual_weight" in result.stderr
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_unknown_window_choice_is_refused(workspace, tmp_path):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    result = run_bundle("training", configs, "--windows", "lung", "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"))
    assert result.returncode != 0 and "windows = 'lung' is not one of" in result.stderr
    assert not (tmp_path / "m" / "model.pt").exists()


def test_mask_free_ablation_trains(workspace, tmp_path):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    result = run_bundle("training", configs, "--mask_input", "False", "--hdr", "False", "--ckpt_dir", str(tmp_path / "m"),
                        "--output_dir", str(tmp_path / "o"), "--adversarial_start", "1000")
    assert result.returncode == 0, result.stderr[-4000:]
    model = read_model_file(tmp_path / "m/model.pt")
    assert model["info"]["mask_input"] is False and model["info"]["hdr"] is False
    assert not any(".fuse." in key for key in model["model"])  # no mask-fusion convolutions


def test_two_process_gloo_training_keeps_ranks_identical(workspace, tmp_path):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", CONFIGS / "multi_gpu_train.yaml"]
    run_two_process_training(configs, yaml.safe_load(workspace["override"].read_text()), tmp_path)
