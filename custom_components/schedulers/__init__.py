"""Noise schedulers for GuideGen's diffusion stages (pure math: no networks, no I/O).

- :class:`CategoricalDiffusionScheduler` -- the multinomial (categorical) diffusion of the TCSS stage, which
  generates the 20-class anatomy mask.
- :class:`LeadingDDIMScheduler` -- MONAI's DDIM for the latent generator, with timesteps its update rule jumps
  between.
"""

from __future__ import annotations

from .categorical import CategoricalDiffusionScheduler
from .ddim import LeadingDDIMScheduler

__all__ = ["CategoricalDiffusionScheduler", "LeadingDDIMScheduler"]
