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


def model_file_from_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, weights: str = "ema") -> Path:
    """Write the model file a training checkpoint stands for: what the trainer would write as ``models/model.pt``.

    The TCSS and latent-generator trainers save the EMA weights as the model file (``InferenceWeights(ema.module)``),
    so an intermediate checkpoint (``checkpoint_epoch=K.pt``) can be scored like a finished run.

    Args:
        checkpoint: a trainer checkpoint holding ``network``, ``info`` and, for ``weights="ema"``, ``ema``.
        output: the model file to write.
        weights: ``"ema"`` (the averaged weights, as the trainer exports them) or ``"network"`` (the raw weights
            of the last optimiser step).

    Returns:
        the written path.

    Raises:
        GuideGenInputError: unreadable file, not a training checkpoint, or no entry for ``weights``.
    """
    if weights not in ("ema", "network"):
        raise GuideGenInputError(f"weights must be 'ema' or 'network', got {weights!r}")
    try:
        content = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise GuideGenInputError(f"cannot read training checkpoint {checkpoint}: {error}") from error
    if not isinstance(content, Mapping) or "info" not in content or weights not in content:
        keys = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise GuideGenInputError(
            f"{checkpoint} is not a training checkpoint with '{weights}' and 'info' entries (it holds {keys}); "
            "a finished run's models/model.pt is already a model file"
        )
    state = content[weights]
    if weights == "ema":  # torch's AveragedModel: the module's entries under "module.", plus its step counter
        state = OrderedDict((k[len("module."):], v) for k, v in state.items() if k.startswith("module."))
    return write_model_file(output, state, content["info"])


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
