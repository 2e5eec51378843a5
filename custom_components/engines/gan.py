"""Training iteration of the anatomy-aware HDR autoencoder (paper Eq. 7-9): a VAE step plus two discriminators.

The losses are composed in :mod:`custom_components.losses` (Eq. 8: :class:`~custom_components.losses.AutoencoderLoss`,
Eq. 9: :class:`~custom_components.losses.AdversarialTerms`); this module steps the networks with them.

The generator side (autoencoder + the learnable k, b of the HDR window) is stepped by the shared
:class:`~custom_components.engines.iterations.AccumulatingIteration` machinery (accumulation, DDP no_sync,
clipping, AMP, EMA). After each generator step the frame and volume discriminators take one step of their
own optimiser on the same (detached) reconstruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import convert_to_tensor

from custom_components.engines.distributed import average_gradients, broadcast_parameters
from custom_components.engines.iterations import AccumulatingIteration
from custom_components.errors import GuideGenInputError
from custom_components.losses import AdversarialTerms, AutoencoderLoss, HDRWindow, sample_frames


__all__ = ["AutoencoderGANIteration", "LOGGED_TERMS", "loss_terms"]


class AutoencoderGANIteration(AccumulatingIteration):
    """One training step of the HDR autoencoder.

    Generator objective (paper Eq. 8-9)::

        L = AutoencoderLoss(v, D(E(v, m), m))               (Eq. 7-8: windowed L1, slice LPIPS, KL)
            + adversarial_weight * [frame GAN + volume GAN]  (Eq. 9, after ``adversarial_start`` iterations)

    The Eq. 8 arguments (``hdr_window`` ... ``full_range_weight``) build the
    :class:`~custom_components.losses.AutoencoderLoss` (see it for the windows and the ablation switches). The
    discriminators see the plain intensities (not under h), as in the paper.

    Args:
        hdr_window: the :class:`~custom_components.losses.HDRWindow` (its k, b belong in the generator optimiser).
        frame_discriminator: 2D PatchDiscriminator on planar slices from all three axes.
        volume_discriminator: 3D PatchDiscriminator on the whole (patch) volume.
        discriminator_optimizer: optimiser over both discriminators' parameters.
        adversarial: the adversarial loss terms (frame/volume weighting, least-squares criterion).
        perceptual_loss: frozen slice LPIPS module, or None when ``perceptual_weight`` is 0.
        image_key: batch key of the (B, 1, *spatial) CT, scaled to [-1, 1] over the full HU range.
        label_key: batch key of the (B, 1, *spatial') label volume (any resolution), ignored when the network
            has no mask input (``num_classes == 0``).
        hdr: apply the random window h (paper) or not (ablation).
        perceptual_weight: weight of the LPIPS term (0 switches it off; then no VGG weights are needed).
        kl_weight: weight of the KL regulariser.
        adversarial_weight: weight of the generator's adversarial term once active.
        adversarial_start: iteration after which the adversarial terms (and discriminator updates) start.
        num_frames: slices per axis fed to the frame discriminator and the perceptual loss.
        windows: windows of the L1 term with ``hdr=True``: ``"random"`` (paper Eq. 7-8), ``"clinical"`` or
            ``"clinical+random"`` (see above).
        full_range_weight: weight of an extra L1 on the plain [-1, 1] intensities (0: paper).
        kwargs: see :class:`AccumulatingIteration` (accumulation, clipping, EMA).
    """

    def __init__(
        self,
        hdr_window: HDRWindow,
        frame_discriminator: torch.nn.Module,
        volume_discriminator: torch.nn.Module,
        discriminator_optimizer: torch.optim.Optimizer,
        adversarial: AdversarialTerms,
        perceptual_loss: torch.nn.Module | None = None,
        image_key: str = "image",
        label_key: str = "label",
        hdr: bool = True,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        adversarial_weight: float = 0.1,
        adversarial_start: int = 20000,
        num_frames: int = 3,
        windows: str = "random",
        full_range_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # k and b of the window are optimised with the autoencoder but live outside its DDP wrapper.
        kwargs["synchronized_modules"] = [hdr_window, *kwargs.get("synchronized_modules", ())]
        super().__init__(**kwargs)
        if adversarial_weight < 0:
            raise GuideGenInputError(f"adversarial_weight = {adversarial_weight} must be >= 0")
        self.vae_loss = AutoencoderLoss(
            hdr_window, perceptual_loss, hdr=hdr, perceptual_weight=perceptual_weight, kl_weight=kl_weight,
            num_frames=num_frames, windows=windows, full_range_weight=full_range_weight,
        )  # fmt: skip
        self.hdr_window = hdr_window
        self.frame_discriminator = frame_discriminator
        self.volume_discriminator = volume_discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.adversarial = adversarial
        self.image_key = image_key
        self.label_key = label_key
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_start = int(adversarial_start)
        self.num_frames = int(num_frames)
        self._discriminators_broadcast = False
        self._last: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]] | None = None

    def adversarial_active(self, engine: Any) -> bool:
        """Whether the GAN terms are on at this iteration (after the warm-up)."""
        return self.adversarial_weight > 0 and engine.state.iteration > self.adversarial_start

    def _inputs(self, engine: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = engine.state.device
        # Plain tensors: MetaTensor's __torch_function__ hides the outputs from DDP's gradient hooks.
        image = convert_to_tensor(batch[self.image_key], track_meta=False).to(device).float()
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        if not getattr(network, "num_classes", 0):
            return image, None
        mask = convert_to_tensor(batch[self.label_key], track_meta=False).to(device)
        return image, mask

    def compute_loss(self, engine: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self._discriminators_broadcast:
            broadcast_parameters([self.frame_discriminator, self.volume_discriminator])
            self._discriminators_broadcast = True
        image, mask = self._inputs(engine, batch)
        device_type = image.device.type
        with torch.autocast(device_type=device_type, enabled=bool(engine.amp)):
            # a mask-free network may be MONAI's AutoencoderKL (benchmark baseline), whose forward takes the image only
            reconstruction, z_mu, z_sigma = engine.network(image) if mask is None else engine.network(image, mask)
        reconstruction = reconstruction.float()
        loss, reconstruction_loss, perceptual, kl = self.vae_loss(image, reconstruction, z_mu, z_sigma)
        generator_adv = torch.zeros((), device=image.device)
        real_frames, fake_frames = sample_frames([image, reconstruction], self.num_frames)
        if self.adversarial_active(engine):
            generator_adv = self.adversarial.generator_loss(self.frame_discriminator, self.volume_discriminator, fake_frames, reconstruction)
            loss = loss + self.adversarial_weight * generator_adv
        self._last = (image, real_frames, reconstruction.detach(), [f.detach() for f in fake_frames])
        batch_size = image.shape[0]
        per_sample = lambda value: value.detach().expand(batch_size)  # noqa: E731  (decollation needs batch-first)
        return loss, {
            "reconstruction_loss": per_sample(reconstruction_loss),
            "perceptual_loss": per_sample(perceptual),
            "kl_loss": per_sample(kl),
            "generator_adversarial_loss": per_sample(generator_adv),
            "hdr_scale": per_sample(self.hdr_window.scale.detach().reshape(())),
            "hdr_offset": per_sample(self.hdr_window.offset.detach().reshape(())),
        }

    def after_step(self, engine: Any) -> dict[str, Any]:
        """One discriminator step on this iteration's real and (detached) reconstructed volume and frames."""
        last, self._last = self._last, None
        if last is None:
            return {}
        image, real_frames, reconstruction, fake_frames = last
        discriminator_loss = torch.zeros((), device=image.device)
        if self.adversarial_active(engine):
            self.frame_discriminator.train()
            self.volume_discriminator.train()
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            discriminator_loss = self.adversarial.discriminator_loss(
                self.frame_discriminator, self.volume_discriminator, real_frames, fake_frames, image, reconstruction
            )
            discriminator_loss.backward()
            average_gradients([self.frame_discriminator, self.volume_discriminator])
            self.discriminator_optimizer.step()
        return {"discriminator_loss": discriminator_loss.detach().expand(image.shape[0])}


LOGGED_TERMS = (
    "loss",
    "reconstruction_loss",
    "perceptual_loss",
    "kl_loss",
    "generator_adversarial_loss",
    "discriminator_loss",
    "hdr_scale",
    "hdr_offset",
)


def loss_terms(output: Any) -> dict[str, float]:
    """Output transform for MONAI's MLFlowHandler: every loss term of the first decollated sample.

    Args:
        output: ``engine.state.output`` after decollation (a list of per-sample dicts) or one dict.

    Returns:
        ``{term: value}`` for the terms in :data:`LOGGED_TERMS` that are present.
    """
    first = output[0] if isinstance(output, (list, tuple)) else output
    return {name: float(first[name]) for name in LOGGED_TERMS if name in first}
