"""Checkpoint bookkeeping shared by the three GuideGen stages.

Every checkpoint carries a :class:`CheckpointInfo` entry (``"info"``) that names the stage it belongs to
and the class map it was trained with. Loading a checkpoint of another stage, or one trained for a
different number of classes, fails with a message that says so instead of a wall of shape mismatches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from custom_components.errors import GuideGenInputError

__all__ = ["STAGES", "CheckpointInfo", "latest_checkpoint", "read_model_file", "read_checkpoint_info", "load_model_weights", "load_network", "compact_model_file"]

STAGES = ("tcss", "autoencoder", "ldm")


class CheckpointInfo:
    """What a checkpoint was trained for; saved and checked like any other checkpoint entry.

    Args:
        stage: one of :data:`STAGES`.
        num_classes: N of the class map.
        class_map_name: the class map's name.
        extra: further facts worth keeping with the weights (e.g. sizes, spacing); plain JSON-like values.
    """

    def __init__(self, stage: str, num_classes: int, class_map_name: str = "", extra: Mapping[str, Any] | None = None) -> None:
        if stage not in STAGES:
            raise GuideGenInputError(f"unknown stage '{stage}'; expected one of {STAGES}")
        self.stage = stage
        self.num_classes = int(num_classes)
        self.class_map_name = class_map_name
        self.extra = dict(extra or {})
        self.loaded: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        """The facts as a plain dict (loadable with ``torch.load(weights_only=True)``)."""
        return {"stage": self.stage, "num_classes": self.num_classes, "class_map_name": self.class_map_name, **self.extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that a checkpoint fits this run.

        Raises:
            GuideGenInputError: the checkpoint is from another stage or was trained for another class count.
        """
        stage = state.get("stage")
        if stage != self.stage:
            raise GuideGenInputError(
                f"this checkpoint belongs to the '{stage}' stage but it is being loaded into the '{self.stage}' "
                "stage; pass the checkpoint of the matching bundle"
            )
        if int(state.get("num_classes", -1)) != self.num_classes:
            raise GuideGenInputError(
                f"the checkpoint was trained with {state.get('num_classes')} classes "
                f"(class map '{state.get('class_map_name')}') but the class map in use has {self.num_classes}; "
                "use the class map the checkpoint was trained with"
            )
        self.loaded = dict(state)


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The most recently written training checkpoint in a folder, for resuming.

    Args:
        directory: where the trainer's CheckpointSaver writes ``checkpoint_*.pt``.

    Returns:
        its path, or None when there is none (fresh start).
    """
    folder = Path(directory)
    candidates = list(folder.glob("checkpoint*.pt")) if folder.is_dir() else []
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime_ns))


def read_model_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a model file (``{"model": state_dict, "info": {...}}``, written at the end of training).

    Raises:
        GuideGenInputError: missing, unreadable or not a guidegen model file.
    """
    path = Path(path)
    if not path.is_file():
        raise GuideGenInputError(f"model weights {path} not found; train the bundle first or point the config at the file")
    try:
        # mmap: reading the info entry (or copying weights into a network) does not pull the whole file into memory
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise GuideGenInputError(f"model weights {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint or "info" not in checkpoint:
        raise GuideGenInputError(f"{path} is not a guidegen model file (expected 'model' and 'info' entries)")
    return dict(checkpoint)


def read_checkpoint_info(path: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """The info entry of a model file (architecture, sizes, spacing recorded at training time).

    Args:
        path: model file.
        stage: when given, the file must belong to this stage.

    Raises:
        GuideGenInputError: see :func:`read_model_file`, or a file of another stage.
    """
    info = dict(read_model_file(path)["info"])
    if stage is not None and info.get("stage") != stage:
        raise GuideGenInputError(
            f"{path} belongs to the '{info.get('stage')}' stage, not '{stage}'; pass the checkpoint of the matching bundle"
        )
    return info


def load_model_weights(
    path: str | os.PathLike, network: torch.nn.Module, info: CheckpointInfo, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load inference weights into a network after checking the checkpoint's info entry.

    Args:
        path: the model file written at the end of training.
        network: module to load into (strictly).
        info: what this run expects; raises if the checkpoint does not fit.
        map_location: passed to :func:`torch.load`.

    Returns:
        the checkpoint's info dict.

    Raises:
        GuideGenInputError: see :func:`read_model_file`, wrong stage or class count.
    """
    checkpoint = read_model_file(path, map_location)
    info.load_state_dict(checkpoint["info"])
    network.load_state_dict(checkpoint["model"])
    return dict(checkpoint["info"])


def load_network(
    path: str | os.PathLike, network: torch.nn.Module, info: CheckpointInfo, map_location: Any = "cpu"
) -> torch.nn.Module:
    """:func:`load_model_weights`, returning the network in eval mode (for configs that define a ready network).

    Raises:
        GuideGenInputError: see :func:`load_model_weights`.
    """
    load_model_weights(path, network, info, map_location)
    return network.eval()


def compact_model_file(path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite a model file with its floating-point weights stored in half precision (half the size on disk).

    Loading needs no change: ``load_state_dict`` copies each stored tensor into the network's float32 parameter.
    The info entry records ``weights_dtype`` so that the rounding is visible to whoever reads the file. Used for
    the demo weights shipped in the repository (each model file must stay small); training always writes float32.

    Args:
        path: a model file (``{"model": state_dict, "info": {...}}``), rewritten atomically.
        dtype: storage type of the floating tensors.

    Returns:
        the path.

    Raises:
        GuideGenInputError: see :func:`read_model_file`.
    """
    from custom_components.data.io import atomic_write

    checkpoint = read_model_file(path)
    model = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    info = {**dict(checkpoint["info"]), "weights_dtype": str(dtype).replace("torch.", "")}
    state = {**checkpoint, "model": model, "info": info}
    return atomic_write(path, lambda temporary: torch.save(state, str(temporary)))
