"""Multi-GPU helpers: process group set-up from torchrun's environment, rank checks.

The bundles' ``multi_gpu_train.yaml`` calls :func:`init_distributed` before building anything; with
``nccl`` on GPUs and ``gloo`` on CPU the same configs run under ``torchrun`` on either.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import ignite.distributed as idist

__all__ = [
    "init_distributed",
    "local_device",
    "is_rank0",
    "save_rank_weights",
    "cleanup_distributed",
    "broadcast_parameters",
    "average_gradients",
]


def init_distributed(backend: str | None = None) -> str:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...).

    Args:
        backend: ``nccl``/``gloo``; None picks ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        the backend in use.

    Raises:
        RuntimeError: not launched by torchrun (no ``RANK``/``WORLD_SIZE`` in the environment).
    """
    if dist.is_initialized():
        return dist.get_backend()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "multi_gpu_train.yaml must be launched with torchrun, e.g. "
            "`torchrun --standalone --nproc_per_node=2 -m monai.bundle run training --config_file ...`"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # Ignite's distributed helpers create a process group (a collective) the first time any of them is
    # called. Rank-0-only handlers (checkpoint savers) call them first on rank 0 alone, which deadlocks
    # the others; doing it here, on every rank at once, keeps the collective symmetric.
    idist.sync()
    return backend


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` with GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def is_rank0() -> bool:
    """True in a single process and on rank 0 of a process group (handlers that write run only there)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_rank_weights(network: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Save this rank's network weights as ``rank<k>.pt`` (used to check that DDP ranks stay in sync)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    module = network.module if hasattr(network, "module") else network
    path = Path(directory) / f"rank{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), str(path))
    return path


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_parameters(modules: Sequence[torch.nn.Module]) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op in a single process).

    For modules trained outside DDP (GAN discriminators, the HDR window's k and b): each rank seeds
    differently, so without this they would start from different weights.
    """
    if not _distributed():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(modules: Sequence[torch.nn.Module]) -> None:
    """Average the gradients of modules kept outside DDP across ranks (no-op in a single process).

    A discriminator scored several times per step (one call per slicing axis) cannot be wrapped in DDP, whose
    hooks expect one forward per backward; averaging by hand before the optimiser step is equivalent.
    """
    if not _distributed():
        return
    world_size = dist.get_world_size()
    for module in modules:
        for parameter in module.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad.div_(world_size)


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
