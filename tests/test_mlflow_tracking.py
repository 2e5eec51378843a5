"""MLflow as a user reads it back (issue 17, deliverable 3), on the smallest autoencoder training run: a run killed
mid-epoch and resumed, both with `--tracking mlflow` (which adds MONAI's own handler beside the bundle's).

Checks: one run across the kill and the resume, each metric logged once per step, validation metrics per epoch,
the provenance tags, and the final model registered as an MLflow Model that loads with the trained weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from helpers_bundles import run_bundle

from custom_components.data.io import file_digest
from custom_components.networks import read_model_file

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles/guidegen_autoencoder"
CONFIGS = [BUNDLE / "configs/train.yaml", BUNDLE / "configs/train_cpu.yaml"]
EPOCHS = 3
KILL_AT = 3  # iterations: epoch 1 is checkpointed (2 iterations of 3 training cases in batches of 2), epoch 2 is not


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    from custom_components.data.demo.dataset import build_demo_dataset

    root = tmp_path_factory.mktemp("mlflow")
    # 4 cases: 3 training, 1 validation
    datalist = build_demo_dataset(root / "demo", num_phantoms=3, mask_size=8, image_size=16, progress=False)
    tiny = {
        # output_dir as an expression, as in the bundle: `--tracking` builds the executed config's artifact path by
        # appending to this config text, which works for an expression only
        "datalist": str(datalist), "output_dir": f"$'{root / 'out'}'", "ckpt_dir": str(root / "models"),
        "val_interval": 1,  # train_cpu.yaml validates every 50 epochs; this run checks validation in each of its 3
        "image_size": [16, 16, 16], "patch_size": [16, 16, 16], "max_epochs": EPOCHS, "save_interval": 1,
        "architecture": {"channels": [4, 8], "num_res_blocks": 1, "latent_channels": 2, "norm": "voxel",
                         "norm_num_groups": 4, "use_checkpointing": False},
        "discriminator": {"channels": 4, "num_layers_d": 2},
    }
    override = root / "tiny.yaml"
    override.write_text(yaml.safe_dump(tiny))
    # SIGKILL right after iteration KILL_AT was logged: nothing of the run gets to clean up, as with a lost machine
    kill = root / "kill.yaml"
    kill.write_text(yaml.safe_dump({"run": [
        f"$@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once={KILL_AT}),"
        " lambda engine: os.kill(os.getpid(), 9))",
        "$@train#trainer.run()",
    ]}))
    killed = run_bundle("training", [*CONFIGS, override, kill], "--tracking", "mlflow")
    assert killed.returncode == -9, killed.stderr[-4000:]
    resumed = run_bundle("training", [*CONFIGS, override], "--tracking", "mlflow")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "continues run" in resumed.stderr + resumed.stdout

    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(root / "out/mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name("guidegen_autoencoder").experiment_id])
    return {"root": root, "datalist": datalist, "client": client, "runs": runs}


def test_one_run_across_kill_and_resume(tracked):
    assert len(tracked["runs"]) == 1
    run = tracked["runs"][0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in tracked["client"].get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 2 * EPOCHS + 1))  # every iteration of the kill and the resume, once


def test_no_metric_step_is_logged_twice(tracked):
    """Neither `--tracking mlflow`'s extra handlers nor the iterations redone after the resume log a step again."""
    client, run = tracked["client"], tracked["runs"][0]
    assert run.data.metrics
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert "train_loss" not in run.data.metrics  # MONAI's default handler's tag: it was not attached


def test_validation_metrics_per_epoch(tracked):
    client, run = tracked["client"], tracked["runs"][0]
    for key in ("val_l1", "val_psnr_lung", "val_psnr_soft_tissue", "val_psnr_bone", "val_mae_hu"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        assert all(m.value == m.value for m in history), key  # not NaN


def test_provenance_tags(tracked):
    tags = tracked["runs"][0].data.tags
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == tags["guidegen.git_commit"] == commit
    assert tags["guidegen.stage"] == "autoencoder"
    assert tags["guidegen.bundle_version"] == json.loads((BUNDLE / "configs/metadata.json").read_text())["version"]
    assert tags["guidegen.dataset"] == str(Path(tracked["datalist"]).resolve())
    assert tags["guidegen.dataset_sha256"] == file_digest(tracked["datalist"])
    assert tags["guidegen.class_map"] and tags["guidegen.num_classes"] == "20" and len(tags["guidegen.class_map_sha256"]) == 64


def test_final_model_is_a_registered_mlflow_model(tracked, monkeypatch):
    import mlflow.pytorch

    client, run = tracked["client"], tracked["runs"][0]
    versions = client.search_model_versions("name='guidegen_autoencoder'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; registered first with monkeypatch, it is removed again
    # after this test instead of sending every later test's training subprocess to this test's database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    mlflow.set_tracking_uri(client.tracking_uri)
    network = mlflow.pytorch.load_model(f"models:/guidegen_autoencoder/{versions[0].version}")
    saved = read_model_file(tracked["root"] / "models/model.pt")
    state = network.state_dict()
    assert state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "model.pt" in artifacts and any(a.startswith("config_") for a in artifacts)  # --tracking's executed config


def _handlers(tmp_path):
    """The bundle's handler and MONAI's, both given the bundle's URI (MONAI's as `--tracking mlflow` adds it)."""
    from monai.handlers import MLFlowHandler
    from monai.utils import path_to_sqlite_uri

    from custom_components.engines.tracking import GuideGenMLFlowHandler

    bundle_uri = path_to_sqlite_uri(str(tmp_path / "bundle.db"))
    ours = GuideGenMLFlowHandler(tracking_uri=bundle_uri, experiment_name="guidegen_tcss", artifacts="model.pt")
    monai_same = MLFlowHandler(tracking_uri=bundle_uri, experiment_name="guidegen_tcss", artifacts="config.json")
    monai_other = MLFlowHandler(tracking_uri=bundle_uri, experiment_name="elsewhere")
    return ours, monai_same, monai_other


def test_a_second_handler_on_the_bundles_run_is_dropped_and_its_artifacts_kept(tmp_path, monkeypatch):
    from custom_components.engines import drop_duplicate_trackers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ours, monai_same, monai_other = _handlers(tmp_path)
    kept = drop_duplicate_trackers([ours, monai_same, None, monai_other])
    assert kept == [ours, monai_other]  # another experiment is a separate record and stays
    assert ours.artifacts == ("model.pt", "config.json")


def test_the_tracking_uri_from_the_environment_is_the_one_compared(tmp_path, monkeypatch):
    """MONAI's MLFlowHandler logs to MLFLOW_TRACKING_URI over its tracking_uri argument: so does the comparison."""
    from monai.handlers import MLFlowHandler
    from monai.utils import path_to_sqlite_uri

    from custom_components.engines import drop_duplicate_trackers

    import mlflow.tracking._tracking_service.utils as mlflow_uris

    # a URI set in this process by mlflow.set_tracking_uri (earlier tests do) wins over the environment in MLflow's own
    # resolution, so a fresh process's state is restored first
    monkeypatch.setattr(mlflow_uris, "_tracking_uri", None)
    env_uri = path_to_sqlite_uri(str(tmp_path / "env.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    bundle_uri = path_to_sqlite_uri(str(tmp_path / "bundle.db"))
    monai_handler = MLFlowHandler(tracking_uri=bundle_uri, experiment_name="guidegen_tcss")
    assert str(monai_handler.client.tracking_uri) == env_uri
    assert drop_duplicate_trackers([monai_handler], bundle_uri, "guidegen_tcss") == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    elsewhere = MLFlowHandler(tracking_uri=env_uri, experiment_name="guidegen_tcss")
    assert drop_duplicate_trackers([elsewhere], bundle_uri, "guidegen_tcss") == [elsewhere]


def test_mlflow_telemetry_is_off_unless_the_user_decided(tmp_path, monkeypatch):
    from monai.utils import path_to_sqlite_uri

    from custom_components.engines.tracking import GuideGenMLFlowHandler

    uri = path_to_sqlite_uri(str(tmp_path / "runs.db"))
    for variable in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(variable, "")  # so that monkeypatch restores whatever the handler sets
        monkeypatch.delenv(variable)
    GuideGenMLFlowHandler(tracking_uri=uri, experiment_name="guidegen_tcss")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # a user who opted in keeps it
    GuideGenMLFlowHandler(tracking_uri=uri, experiment_name="guidegen_tcss")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")
    monkeypatch.setenv("DO_NOT_TRACK", "false")
    GuideGenMLFlowHandler(tracking_uri=uri, experiment_name="guidegen_tcss")
    assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ
