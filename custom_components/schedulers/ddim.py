"""DDIM with timesteps that its own update rule actually jumps between.

MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` lays out the inference timesteps as a rounded
``linspace(T - 1, 0, n)`` but its ``step`` goes from ``t`` to ``t - T // n``. When ``T`` is not a multiple of
``n - 1`` the two disagree: with ``T = 1000, n = 50`` the sample computed for timestep 959 is next denoised as if it
were at 958, for 19 of the 49 jumps. Here, with ``r = T // n``, the timesteps are ``n·r - 1, n·r - 1 - r, ..., r - 1``
("trailing" spacing): every step lands exactly on the next one, the last lands on ``t = -1`` (the clean sample),
and the first is ``T - 1`` (the noisiest level, matching the pure-noise start ``z_T ~ N(0, I)``) whenever n divides
T, and within ``n - 1`` steps of it otherwise. With ``n = T`` the layout is MONAI's (``T - 1, ..., 0``).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler

__all__ = ["TrailingDDIMScheduler"]


class TrailingDDIMScheduler(DDIMScheduler):
    """MONAI's DDIM scheduler (paper Eq. 11 sampling for the latent generator) with step-consistent timesteps.

    Args: as :class:`~monai.networks.schedulers.DDIMScheduler`.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Timesteps ``n·r - 1 - k·r`` with ``r = T // n`` for ``k = 0 .. n - 1`` (plus ``steps_offset``), largest first.

        Args:
            num_inference_steps: number of denoising steps n (1 .. T).
            device: where to put the timesteps.

        Raises:
            ValueError: n outside 1 .. T, or a ``steps_offset`` outside [0, T).
        """
        super().set_timesteps(num_inference_steps, device)  # MONAI's checks and bookkeeping
        ratio = self.num_train_timesteps // num_inference_steps
        start = min(num_inference_steps * ratio - 1, self.num_train_timesteps - 1 - self.steps_offset)
        self.timesteps = (start - torch.arange(num_inference_steps, device=device) * ratio).long() + self.steps_offset
