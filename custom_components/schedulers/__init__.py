"""Noise schedulers for GuideGen's diffusion stages (pure math: no networks, no I/O).

- :class:`CategoricalDiffusionScheduler` -- the multinomial (categorical) diffusion of the TCSS stage, which
  generates the 20-class anatomy mask.
"""

from __future__ import annotations

from .categorical import CategoricalDiffusionScheduler

__all__ = ["CategoricalDiffusionScheduler"]
