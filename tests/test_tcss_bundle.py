"""TCSS bundle end to end on the demo data: train -> resume -> sample, MLflow record, DDP on 2 CPU processes,
and the bad-input paths of inference."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers_bundles import TINY_TEXT_UNET, run_bundle, run_two_process_training, train_then_resume
from helpers_tiny_text import make_tiny_text_encoder_dir

from custom_components.engines import write_model_file
from custom_components.networks import MODEL_INFO_KEY, read_model_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles/guidegen_tcss/configs"
TINY_ARCHITECTURE = TINY_TEXT_UNET


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from custom_components.data.demo.dataset import build_demo_dataset

    root = tmp_path_factory.mktemp("tcss")
    datalist = build_demo_dataset(root / "demo", num_phantoms=3, mask_size=16, image_size=16, progress=False)
    text_dir = make_tiny_text_encoder_dir(root / "tiny_text")
    tiny = {
        "datalist": str(datalist),
        "output_dir": str(root / "out"),
        "ckpt_dir": str(root / "models"),
        "mask_size": [16, 16, 16],
        "max_epochs": 1,
        "save_interval": 1,
        "text_encoder_path": str(text_dir),
        "architecture": TINY_ARCHITECTURE,
    }
    override = root / "tiny.yaml"
    override.write_text(yaml.safe_dump(tiny))
    return {"root": root, "override": override, "datalist": datalist, "text_dir": text_dir}


@pytest.fixture(scope="module")
def trained(workspace):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    return train_then_resume(configs, workspace["root"] / "models")


def test_training_writes_checkpoints_and_model(trained):
    models = trained["models"]
    assert (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file()
    model = read_model_file(models / "model.pt")
    # the file is the network's plain state dict (what ckpt_export reads), the info in its metadata
    raw = torch.load(models / "model.pt", weights_only=True)
    assert "info" not in raw and raw._metadata[MODEL_INFO_KEY] == model["info"]
    assert model["info"]["stage"] == "tcss" and model["info"]["num_classes"] == 20
    assert model["info"]["architecture"]["channels"] == [8, 16]
    assert len(model["info"]["mask_spacing_mm"]) == 3


def test_resume_continues_from_the_checkpoint(trained):
    first = trained["first_state"]["trainer"]
    assert first["iteration"] == first["epoch_length"] > 0  # one epoch
    state = torch.load(trained["models"] / "checkpoint_final.pt", weights_only=True)["trainer"]
    assert state["iteration"] == 2 * first["iteration"] and state["max_epochs"] == 2
    assert "resuming from" in trained["resumed"].stderr + trained["resumed"].stdout


def test_mlflow_run_has_params_metrics_and_model(trained, workspace):
    from mlflow.tracking import MlflowClient

    from monai.utils import path_to_sqlite_uri

    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(workspace["root"] / "out/mlruns.db")))
    experiment = client.get_experiment_by_name("guidegen_tcss")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed training continues the first run
    run = runs[-1]
    assert run.data.params["lr"] == "0.0002" and run.data.params["num_classes"] == "20"
    assert "train_loss" in run.data.metrics and np.isfinite(run.data.metrics["train_loss"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "model.pt" in artifacts


def test_inference_writes_masks_with_affine(trained, workspace):
    out = workspace["root"] / "samples"
    prompts = ["The patient is a 60-year-old female. In this imaging, the patient's condition is described as no abnormality, with no tumor.",
               "In this imaging, the patient's condition is described as renal cell carcinoma, with a tumor in the kidney."]
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--output_dir", str(out), "--num_inference_steps", "3", "--text_encoder_path", str(workspace["text_dir"]),
                        "--prompts", json.dumps(prompts))
    assert result.returncode == 0, result.stderr[-4000:]
    info = read_model_file(trained["models"] / "model.pt")["info"]
    for index in range(2):
        image = nib.load(str(out / f"sample_{index:03d}/mask.nii.gz"))
        assert image.shape == (16, 16, 16) and image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.header.get_zooms(), info["mask_spacing_mm"], rtol=1e-5)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.asarray(image.dataobj).max() < 20
        assert json.loads((out / f"sample_{index:03d}/prompt.json").read_text())["prompt"] == prompts[index]
        assert (out / f"sample_{index:03d}/preview.png").is_file()


def test_inference_rejects_a_checkpoint_of_another_stage(trained, workspace, tmp_path):
    model = read_model_file(trained["models"] / "model.pt")
    foreign = tmp_path / "ldm_model.pt"
    write_model_file(foreign, model["model"], {**model["info"], "stage": "ldm"})
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(foreign),
                        "--output_dir", str(tmp_path / "o"), "--text_encoder_path", str(workspace["text_dir"]))
    assert result.returncode != 0
    assert "belongs to the 'ldm' stage, not 'tcss'" in result.stderr


def test_inference_rejects_a_class_map_of_another_size(trained, workspace, tmp_path):
    class_map = tmp_path / "three.json"
    class_map.write_text(json.dumps({"classes": [{"name": "background"}, {"name": "liver"}, {"name": "tumor"}], "tumor_class": "tumor"}))
    result = run_bundle("inference", [CONFIGS / "inference.yaml"], "--model_path", str(trained["models"] / "model.pt"),
                        "--output_dir", str(tmp_path / "o"), "--text_encoder_path", str(workspace["text_dir"]),
                        "--class_map_path", str(class_map))
    assert result.returncode != 0
    assert "trained with 20 classes" in result.stderr and "has 3" in result.stderr


def test_two_process_gloo_training_keeps_ranks_identical(workspace, tmp_path):
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", CONFIGS / "multi_gpu_train.yaml"]
    run_two_process_training(configs, yaml.safe_load(workspace["override"].read_text()), tmp_path)


def test_tracking_mlflow_option_works(workspace, tmp_path):
    """`python -m monai.bundle run ... --tracking mlflow` adds MONAI's default MLflow handler, which reads the
    trainer's `loss` output."""
    configs = [CONFIGS / "train.yaml", CONFIGS / "train_cpu.yaml", workspace["override"]]
    result = run_bundle("training", configs, "--tracking", "mlflow", "--output_dir", str(tmp_path / "out"),
                        "--ckpt_dir", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    from monai.utils import path_to_sqlite_uri

    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(tmp_path / "out/mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name("guidegen_tcss").experiment_id])
    assert runs and "train_loss" in runs[0].data.metrics
