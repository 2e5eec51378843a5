"""Keep only the running stage's network in memory during chained inference.

The three GuideGen networks at paper widths take 1.6 GiB as float32 (TCSS and latent U-Nets 0.7 GiB each, the
autoencoder 0.2 GiB), and a chain runs one at a time. :class:`StageResidency` releases the networks of the stages
that are not running: on a GPU they move to host memory (quick to bring back), on the CPU their weights are dropped
(moved to PyTorch's ``meta`` device) and read back from the model file when the stage runs again. A model file that
changed since it was loaded is refused rather than silently mixed into a run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from custom_components.networks.checkpoints import read_model_file
from custom_components.errors import GuideGenInputError

__all__ = ["StageResidency", "return_freed_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (None where the C library has none)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> None:
    """Hand free heap pages back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Tensors smaller than glibc's mmap threshold (up to 32 MiB) live in the heap; once freed their pages stay resident
    (reusable by this process, but counted in its memory, and not reusable for larger tensors) until trimmed.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class StageResidency:
    """Networks by stage name, of which only those passed to :meth:`activate` are kept loaded.

    Args:
        networks: stage name -> (loaded network, the model file its weights came from: ``{"model": state_dict}``).
        device: the device the networks run on.
        enabled: False keeps every network loaded (:meth:`activate` then does nothing).
    """

    def __init__(
        self, networks: Mapping[str, tuple[nn.Module, str | os.PathLike]], device: torch.device, enabled: bool = True
    ) -> None:
        self.device = torch.device(device)
        self.enabled = bool(enabled)
        self._networks = {name: network for name, (network, _) in networks.items()}
        self._files = {name: Path(path) for name, (_, path) in networks.items()}
        self._stamps = {name: _file_stamp(path) for name, path in self._files.items()}
        self._where: dict[str, str] = {name: "loaded" for name in self._networks}
        # a buffer outside the state dict cannot be read back from the file: such a network stays loaded on the CPU
        self._reloadable = {
            name: {key for key, _ in network.named_buffers()} <= set(network.state_dict())
            for name, network in self._networks.items()
        }

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the networks whose weights are on the device now."""
        return tuple(name for name, where in self._where.items() if where == "loaded")

    def activate(self, *names: str) -> None:
        """Load the networks of ``names`` (if released) and release every other one (no names: release all).

        Raises:
            KeyError: an unknown name.
            GuideGenInputError: a released network's model file is gone or changed since it was loaded.
        """
        unknown = [name for name in names if name not in self._networks]
        if unknown:
            raise KeyError(f"unknown stage(s) {unknown}; known: {sorted(self._networks)}")
        if not self.enabled:
            return
        released = [name for name in self._networks if name not in names and self._where[name] == "loaded"]
        for name in released:
            self._release(name)
        if released:
            return_freed_memory()
        for name in names:
            self._restore(name)

    def _release(self, name: str) -> None:
        if self._where[name] != "loaded":
            return
        network = self._networks[name]
        if self.device.type == "cpu":
            if not self._reloadable[name]:
                return
            network.to("meta")
            self._where[name] = "file"
        else:
            network.to("cpu")
            self._where[name] = "host"

    def _restore(self, name: str) -> None:
        where, network = self._where[name], self._networks[name]
        if where == "host":
            network.to(self.device)
        elif where == "file":
            path = self._files[name]
            if not path.is_file() or _file_stamp(path) != self._stamps[name]:
                raise GuideGenInputError(
                    f"{path}: the {name} model file changed (or disappeared) while this run was using it; "
                    "rerun with the files left in place"
                )
            # read_model_file maps the file: the stored tensors are copied straight into the parameters
            state = read_model_file(path)["model"]
            network.to_empty(device=self.device)
            network.load_state_dict(state, strict=True)
            del state
        self._where[name] = "loaded"
