"""Running bundle commands in a subprocess, as a user would, for the bundle end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_bundle(run_id: str, configs: list[Path], *extra: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run RUN_ID --config_file [...] EXTRA`` from ``/`` (so nothing depends on the working
    directory), offline, one thread; ``launcher`` replaces the interpreter (e.g. ``torch.distributed.run``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", run_id,
               "--config_file", str([str(c) for c in configs]), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd="/")


def train_then_resume(configs: list[Path], models: Path) -> dict:
    """Train one epoch, keep the final checkpoint's state, then resume to two epochs.

    Returns:
        ``{"first": result, "resumed": result, "first_state": checkpoint dict, "models": models, "configs": configs}``.
    """
    first = run_bundle("training", configs)
    assert first.returncode == 0, first.stderr[-4000:]
    state = torch.load(models / "checkpoint_final.pt", weights_only=True)
    resumed = run_bundle("training", configs, "--max_epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return {"first": first, "resumed": resumed, "first_state": state, "models": models, "configs": configs}


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]

# The smallest text-conditioned U-Net the TCSS and latent-generator configs accept (architecture override).
TINY_TEXT_UNET = {
    "channels": [8, 16],
    "num_res_blocks": 1,
    "cross_attention_levels": [False, True],
    "self_attention_levels": [False, True],
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "use_checkpointing": False,
    "num_queries": 4,
    "injection_dim": 16,
    "injection_layers": 1,
    "injection_heads": 2,
}


def run_two_process_training(configs: list[Path], override: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Train with 2 gloo processes (torchrun) writing each rank's weights, and check the ranks ended identical.

    Args:
        configs: train.yaml (+ CPU override) + multi_gpu_train.yaml.
        override: the test's tiny settings; outputs are redirected into ``tmp_path``.

    Returns:
        the subprocess result (for further checks of its log).
    """
    import yaml

    settings = dict(override, output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"), save_rank_weights=True, resume=False)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = run_bundle("training", [*configs, config], launcher=TORCHRUN_2)
    assert result.returncode == 0, result.stderr[-6000:]
    rank0 = torch.load(tmp_path / "out/rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "out/rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (tmp_path / "models/model.pt").is_file()
    return result
