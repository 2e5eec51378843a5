"""The autoencoder's VAE objective of paper Eq. 8: windowed L1 (Eq. 7), slice LPIPS and the KL regulariser.

The adversarial terms of Eq. 9 are :class:`~custom_components.losses.AdversarialTerms`; the training step that adds
them and steps the discriminators is :class:`custom_components.engines.AutoencoderGANIteration`.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

from custom_components.errors import GuideGenInputError

from .frames import kl_divergence, sample_frames
from .hdr_window import HDRWindow, clinical_window_l1

logger = logging.getLogger(__name__)

__all__ = ["AutoencoderLoss", "AutoencoderLossTerms", "WINDOW_CHOICES"]

# How the reconstruction is windowed in the L1 of Eq. 8: the paper's random window, the fixed clinical windows, both.
WINDOW_CHOICES = ("random", "clinical", "clinical+random")


class AutoencoderLossTerms(NamedTuple):
    """The weighted sum and its unweighted parts."""

    loss: Tensor
    reconstruction: Tensor
    perceptual: Tensor
    kl: Tensor


class AutoencoderLoss(nn.Module):
    """Paper Eq. 8 without its adversarial term::

        L = |h(x̂) - h(x)|₁ + perceptual_weight · LPIPS(h(frames of x̂), h(frames of x)) + kl_weight · KL(q(z | x, m) ‖ N(0, I))

    with ``h`` the HDR window of Eq. 7, drawn per volume and step from the volume's own intensity range
    (:meth:`~custom_components.losses.HDRWindow.sample_windows`). With ``hdr=False`` the L1 and LPIPS act on the
    plain intensities (the ablation "without HDR accommodation").

    Beyond the paper (measured in BENCHMARKS.md, "Autoencoder against baselines"): ``windows="clinical"`` replaces
    the random window in the L1 by the three fixed clinical windows (:func:`~custom_components.losses.clinical_window_l1`),
    ``"clinical+random"`` uses both; ``full_range_weight`` adds the plain L1 over the whole range beside the windowed
    terms, so air/tissue/bone levels are learnt together with the contrast inside each window. The perceptual term
    keeps the random window.

    Args:
        hdr_window: the :class:`~custom_components.losses.HDRWindow` (its k, b are trained with the autoencoder).
        perceptual_loss: frozen slice LPIPS module, or None when ``perceptual_weight`` is 0.
        hdr: apply the window h (paper) or not (ablation).
        perceptual_weight: weight of the LPIPS term (0 switches it off; then no VGG weights are needed).
        kl_weight: weight of the KL regulariser.
        num_frames: slices per axis fed to the perceptual loss.
        windows: windows of the L1 term with ``hdr=True``: ``"random"`` (paper Eq. 7-8), ``"clinical"`` or
            ``"clinical+random"``.
        full_range_weight: weight of an extra L1 on the plain [-1, 1] intensities (0: paper).

    Raises:
        GuideGenInputError: an unknown ``windows``, a negative weight, ``perceptual_weight > 0`` without a module,
            ``num_frames < 1``.
    """

    def __init__(
        self,
        hdr_window: HDRWindow,
        perceptual_loss: nn.Module | None = None,
        hdr: bool = True,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        num_frames: int = 3,
        windows: str = "random",
        full_range_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if windows not in WINDOW_CHOICES:
            raise GuideGenInputError(f"windows = {windows!r} is not one of {WINDOW_CHOICES}")
        for name, value in (("perceptual_weight", perceptual_weight), ("kl_weight", kl_weight), ("full_range_weight", full_range_weight)):
            if value < 0:
                raise GuideGenInputError(f"{name} = {value} must be >= 0")
        if perceptual_weight > 0 and perceptual_loss is None:
            raise GuideGenInputError("perceptual_weight > 0 needs a perceptual_loss module; set perceptual_weight: 0 to train without it")
        if perceptual_weight == 0:
            logger.warning("perceptual loss off (perceptual_weight = 0): training without LPIPS, no VGG-16 weights used")
        if num_frames < 1:
            raise GuideGenInputError(f"num_frames = {num_frames} must be >= 1")
        self.hdr_window = hdr_window
        self.perceptual_loss = perceptual_loss
        self.hdr = bool(hdr)
        self.perceptual_weight = float(perceptual_weight)
        self.kl_weight = float(kl_weight)
        self.num_frames = int(num_frames)
        self.windows = windows
        self.full_range_weight = float(full_range_weight)

    def forward(self, image: Tensor, reconstruction: Tensor, z_mu: Tensor, z_sigma: Tensor) -> AutoencoderLossTerms:
        """Eq. 8 for one batch.

        Args:
            image: (B, 1, *spatial) CT scaled to [-1, 1] over the full HU range.
            reconstruction: the autoencoder's output, same shape.
            z_mu, z_sigma: the posterior q(z | x, m) the KL term regularises.

        Returns:
            the weighted loss and its unweighted parts.
        """
        random_window = self.hdr and (self.windows != "clinical" or self.perceptual_weight > 0)
        if random_window:
            wc, wr = self.hdr_window.sample_windows(image)
            target_h, recon_h = self.hdr_window(image, wc, wr), self.hdr_window(reconstruction, wc, wr)
        else:
            target_h, recon_h = image, reconstruction
        if not self.hdr:
            reconstruction_loss = (reconstruction - image).abs().mean()
        else:
            reconstruction_loss = torch.zeros((), device=image.device)
            if "random" in self.windows:
                reconstruction_loss = reconstruction_loss + (recon_h - target_h).abs().mean()
            if "clinical" in self.windows:
                reconstruction_loss = reconstruction_loss + clinical_window_l1(reconstruction, image)
        if self.full_range_weight > 0:
            reconstruction_loss = reconstruction_loss + self.full_range_weight * (reconstruction - image).abs().mean()
        perceptual = torch.zeros((), device=image.device)
        if self.perceptual_weight > 0:
            real_frames_h, fake_frames_h = sample_frames([target_h, recon_h], self.num_frames)
            perceptual = torch.stack([self.perceptual_loss(fake, real) for fake, real in zip(fake_frames_h, real_frames_h)]).mean()
        kl = kl_divergence(z_mu.float(), z_sigma.float())
        loss = reconstruction_loss + self.perceptual_weight * perceptual + self.kl_weight * kl
        return AutoencoderLossTerms(loss, reconstruction_loss, perceptual, kl)
