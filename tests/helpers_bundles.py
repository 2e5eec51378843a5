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
