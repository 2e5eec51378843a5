"""Stage 3 pipeline: anatomy masks (+ prompts) -> CT latents by reverse latent diffusion (paper Eq. 10-11).

Chains the pieces without owning their maths: the text encoder gives token features, the
:class:`~custom_components.networks.LatentDenoiser` predicts the noise ``ε_θ(z_t ⊕ c_mask, t, text)``, and a
MONAI DDIM or DDPM scheduler takes the reverse step. Classifier-free guidance combines the conditional and the
null-prompt predictions, ``ε = ε_∅ + s·(ε_text − ε_∅)``. Decoding the latents to Hounsfield units is left to
:class:`~custom_components.pipelines.AutoencoderPipeline` (after dividing by the latent scale factor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from custom_components.errors import GuideGenInputError
from custom_components.networks.latent_denoiser import LatentDenoiser

__all__ = ["LatentDiffusionSampler"]

_SPATIAL_DIMS = 3


class LatentDiffusionSampler:
    """Mask- and text-conditional sampler of CT latents (the reverse process of Eq. 10-11).

    Args:
        network: ``network(z_t, t, mask, text_features, text_mask, text_keep) -> ε`` with a ``mask_factor``
            attribute, e.g. :class:`~custom_components.networks.LatentDenoiser` (weights loaded).
        scheduler: a MONAI :class:`~monai.networks.schedulers.DDIMScheduler` (strided, ``eta`` controls the noise)
            or :class:`~monai.networks.schedulers.DDPMScheduler` (ancestral; every training step must be run).
        text_encoder: ``text_encoder(prompts) -> (features (B, L, D), mask (B, L) bool)``.
        latent_channels: channels of the autoencoder's latent.
        device: where to sample.

    Raises:
        TypeError: if ``scheduler`` is neither a DDIM nor a DDPM scheduler.
    """

    def __init__(
        self,
        network: LatentDenoiser,
        scheduler: DDIMScheduler | DDPMScheduler,
        text_encoder: Callable[[list[str]], tuple[Tensor, Tensor | None]],
        latent_channels: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            raise TypeError(
                f"scheduler must be a MONAI DDIMScheduler or DDPMScheduler, got {type(scheduler).__name__}."
            )
        self.network = network
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.latent_channels = int(latent_channels)
        self.device = torch.device(device)

    def _latent_size(self, masks: Tensor) -> tuple[int, ...]:
        """The latent grid of the masks, ``mask_size / mask_factor``; raises if the sizes do not divide."""
        if not isinstance(masks, Tensor) or masks.ndim != 2 + _SPATIAL_DIMS or masks.shape[1] != 1:
            shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise GuideGenInputError(f"masks must be a (B, 1, H, W, D) tensor of class indices, got {shape}.")
        if masks.shape[0] < 1:
            raise GuideGenInputError(f"masks has no sample (shape {tuple(masks.shape)}); pass at least one mask.")
        factor = int(self.network.mask_factor)
        size = tuple(int(s) for s in masks.shape[2:])
        if any(s % factor for s in size):
            raise GuideGenInputError(
                f"mask size {size} is not divisible by the model's mask_factor={factor}; resample the masks to the "
                "size the model was trained with."
            )
        return tuple(s // factor for s in size)

    def _check_steps(self, num_inference_steps: int, guidance_scale: float, eta: float) -> None:
        total = int(self.scheduler.num_train_timesteps)
        if not 1 <= num_inference_steps <= total:
            raise GuideGenInputError(
                f"num_inference_steps must be in [1, {total}] (the scheduler's num_train_timesteps), got "
                f"{num_inference_steps}."
            )
        if isinstance(self.scheduler, DDPMScheduler) and num_inference_steps != total:
            # MONAI's DDPM step always moves from t to t - 1 (it reads alphas_cumprod[t - 1] and betas[t]), so a
            # strided schedule would under-denoise every jump; only DDIM supports skipping steps.
            raise GuideGenInputError(
                f"DDPMScheduler cannot skip steps: num_inference_steps={num_inference_steps} but it was trained with "
                f"{total}; use num_inference_steps={total} or a DDIMScheduler for fewer steps."
            )
        if not guidance_scale >= 0:  # also rejects NaN
            raise GuideGenInputError(f"guidance_scale must be >= 0 (1: no guidance), got {guidance_scale}.")
        if not 0 <= eta <= 1:
            # Beyond 1 the DDIM direction term sqrt(1 - ᾱ_prev - σ²) becomes imaginary (NaN).
            raise GuideGenInputError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}.")

    def _encode_prompts(self, prompts: Sequence[str] | str | None, batch: int) -> tuple[Tensor, Tensor | None] | None:
        if prompts is None:
            return None
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise GuideGenInputError("empty prompt list: pass one prompt per mask, or prompts=None for no text.")
        if len(prompts) != batch:
            raise GuideGenInputError(
                f"{len(prompts)} prompts for {batch} masks; pass one prompt per mask (or prompts=None)."
            )
        features, text_mask = self.text_encoder(prompts)
        features = features.to(self.device)
        return features, None if text_mask is None else text_mask.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        masks: Tensor,
        prompts: Sequence[str] | str | None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int | None = 0,
        eta: float = 0.0,
        progress: bool = True,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Sample one latent per mask, denoising from ``z_T ~ N(0, I)`` (reverse process of Eq. 10-11).

        Args:
            masks: (B, 1, *mask_size) integer class indices; ``mask_size`` divisible by the network's
                ``mask_factor`` (and equal to the size it was trained with).
            prompts: one prompt per mask, or ``None`` for unconditional (null-prompt) sampling.
            num_inference_steps: reverse steps; DDIM may use fewer than the training steps, DDPM must use all.
            guidance_scale: classifier-free guidance scale ``s`` (1: plain conditional sampling, one network pass
                per step; 0: unconditional); ignored when ``prompts`` is ``None``.
            seed: seed of the initial noise and of the steps' noise (``None``: not seeded).
            eta: DDIM noise weight (0: deterministic, 1: the DDPM posterior variance); ignored by DDPM.
            progress: show a progress bar over the steps.
            noise: (B, latent_channels, *latent_size) initial noise ``z_T`` instead of a seeded draw.

        Returns:
            (B, latent_channels, *latent_size) float latents on the CPU, still multiplied by the latent scale
            factor (divide by it before decoding).

        Raises:
            GuideGenInputError: for masks, prompts, noise or settings that do not fit the model.
        """
        latent_size = self._latent_size(masks)
        batch = int(masks.shape[0])
        self._check_steps(int(num_inference_steps), float(guidance_scale), float(eta))
        shape = (batch, self.latent_channels, *latent_size)
        if noise is not None and tuple(noise.shape) != shape:
            raise GuideGenInputError(
                f"noise has shape {tuple(noise.shape)} but the masks (shape {tuple(masks.shape)}) need {shape}."
            )
        text = self._encode_prompts(prompts, batch)
        guided = text is not None and float(guidance_scale) != 1.0

        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
        if noise is None:
            z = torch.randn(shape, generator=generator, device=self.device)
        else:
            z = noise.to(self.device, torch.float32)
        masks = masks.to(self.device)

        network_inputs: dict[str, Any] = {}
        if text is not None:
            features, text_mask = text
            if guided:
                # One batched pass for both predictions: the second half drops the prompt (null contexts).
                masks = torch.cat([masks, masks])
                features = torch.cat([features, features])
                text_mask = None if text_mask is None else torch.cat([text_mask, text_mask])
                keep = torch.arange(2 * batch, device=self.device) < batch
                network_inputs["text_keep"] = keep
            network_inputs["text_features"] = features
            network_inputs["text_mask"] = text_mask

        if hasattr(self.network, "eval"):
            self.network.eval()
        self.scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        ddim = isinstance(self.scheduler, DDIMScheduler)
        for t in tqdm(self.scheduler.timesteps, desc="latent sampling", unit="step", disable=not progress):
            step = int(t)
            model_in = torch.cat([z, z]) if guided else z
            timesteps = torch.full((model_in.shape[0],), step, device=self.device, dtype=torch.long)
            eps = self.network(model_in, timesteps, masks, **network_inputs).float()
            if guided:
                eps_text, eps_null = eps.chunk(2)
                eps = eps_null + float(guidance_scale) * (eps_text - eps_null)
            # A plain int timestep: MONAI indexes its (CPU) schedule tensors with it and compares it with 0.
            if ddim:
                z, _ = self.scheduler.step(eps, step, z, eta=float(eta), generator=generator)
            else:
                z, _ = self.scheduler.step(eps, step, z, generator=generator)
        return z.cpu()
