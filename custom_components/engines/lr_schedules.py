"""Learning-rate schedules over training iterations, by name (a registry, like MONAI's ``NoiseSchedules``).

The paper trains at a constant lr of 2e-5. A cosine decay to zero over the run is beyond the paper: on the demo's
few real voxels the autoencoder's lung-window error wanders by +-0.4 dB between checkpoints at a constant lr
(BENCHMARKS.md, "Autoencoder against baselines"), and annealing lets the last steps settle.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total_steps: 1.0,
    "cosine": lambda step, total_steps: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))),
}


class _ScheduleFactor:
    """Picklable ``step -> lr factor`` (LambdaLR keeps it; a lambda would not survive ``torch.save``)."""

    def __init__(self, schedule: str, total_steps: int) -> None:
        self.schedule = schedule
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return LR_SCHEDULES[self.schedule](step, self.total_steps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration lr scheduler: the optimizer's lr times ``LR_SCHEDULES[schedule](step, total_steps)``.

    Step it once per iteration (MONAI's ``LrScheduleHandler`` with ``epoch_level=False``) and keep it in the
    checkpoint's state so a resumed run continues the same curve.

    Args:
        optimizer: the optimizer whose lr is scheduled.
        schedule: a key of :data:`LR_SCHEDULES` ("constant": the paper; "cosine": decay to 0 at ``total_steps``).
        total_steps: iterations of the whole run (``max_epochs`` x iterations per epoch).

    Returns:
        The ``LambdaLR`` scheduler.

    Raises:
        ValueError: an unknown schedule name or a non-positive ``total_steps``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r} is not one of {sorted(LR_SCHEDULES)}: set lr_schedule in the training config to one of them")
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1 for the lr schedule, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _ScheduleFactor(schedule, int(total_steps)))
