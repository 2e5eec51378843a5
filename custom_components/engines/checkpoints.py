"""Model files written by training: the inference weights with their info, compacted or converted copies, and
the newest training checkpoint to resume from.

Reading and verifying model files is :mod:`custom_components.networks.checkpoints` (the one reader); the layout is
described there.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from custom_components.errors import GuideGenInputError
from custom_components.networks.checkpoints import CheckpointInfo, model_state_dict, read_model_file, split_model_file

__all__ = ["write_model_file", "InferenceWeights", "latest_checkpoint", "compact_model_file", "convert_model_file"]


def write_model_file(path: str | os.PathLike, state: Mapping[str, Any], info: CheckpointInfo | Mapping[str, Any]) -> Path:
    """Write a model file (the state dict with its info, see :func:`model_state_dict`), atomically.

    Returns:
        the path.
    """
    from custom_components.data.writers import atomic_write

    content = model_state_dict(state, info)
    return atomic_write(path, lambda temporary: torch.save(content, str(temporary)))


class InferenceWeights:
    """The model file's content as a ``save_dict`` entry: ``state_dict()`` is the network's with the info attached.

    A ``CheckpointSaver`` whose ``save_dict`` holds only this entry writes ``state_dict()`` as the whole file (ignite
    saves a single object without a key), i.e. the plain state dict that ``ckpt_export`` reads, with the info in it.

    Args:
        network: the network whose weights are saved (a DDP/DataParallel wrapper is unwrapped).
        info: its :class:`CheckpointInfo`.
    """

    def __init__(self, network: torch.nn.Module, info: CheckpointInfo) -> None:
        self.network = network
        self.info = info

    def _module(self) -> torch.nn.Module:
        network = self.network
        if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            network = network.module
        return network

    def state_dict(self) -> OrderedDict[str, Any]:
        return model_state_dict(self._module().state_dict(), self.info)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the info (stage, class count), then load the weights strictly."""
        split = split_model_file(state)
        if split is None:
            raise GuideGenInputError("not a guidegen model file (no info entry)")
        weights, info = split
        self.info.load_state_dict(info)
        self._module().load_state_dict(weights)


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


def compact_model_file(path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite a model file with its floating-point weights stored in half precision (half the size on disk).

    Loading needs no change: ``load_state_dict`` copies each stored tensor into the network's float32 parameter.
    The info entry records ``weights_dtype`` so that the rounding is visible to whoever reads the file. Used for
    the demo weights shipped in the repository (each model file must stay small); training always writes float32.
    The file is written in the current layout (a plain state dict carrying its info).

    Args:
        path: a model file (either layout), rewritten atomically.
        dtype: storage type of the floating tensors.

    Returns:
        the path.

    Raises:
        GuideGenInputError: see :func:`read_model_file`.
    """
    checkpoint = read_model_file(path)
    model = OrderedDict((k, v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                        for k, v in checkpoint["model"].items())
    model._metadata = getattr(checkpoint["model"], "_metadata", None)  # type: ignore[attr-defined]
    info = {**dict(checkpoint["info"]), "weights_dtype": str(dtype).replace("torch.", "")}
    return write_model_file(path, model, info)


def convert_model_file(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write a model file of the earlier ``{"model", "info"}`` layout as a plain state dict carrying its info.

    The tensors (values and dtypes) and the info are unchanged; only the container differs, so the file's digests
    change (re-record them with ``guidegen package``; a latent generator's ``autoencoder_sha256`` names the
    autoencoder file's bytes). A file already in the current layout is rewritten as it is.

    Args:
        path: the model file (verified as :func:`read_model_file` does).
        output: where to write; default: in place.

    Returns:
        the written path.
    """
    checkpoint = read_model_file(path)
    return write_model_file(path if output is None else output, checkpoint["model"], checkpoint["info"])
