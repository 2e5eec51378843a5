"""Stages III + II chained: an anatomy mask and a prompt -> a CT volume in Hounsfield units on the mask's field of view.

The latent generator samples a CT latent conditioned on the mask and the prompt (paper Eq. 10-11), the latent is
divided by the training scale factor, and the mask-guided autoencoder decodes it slab by slab. File writing is
left to :func:`custom_components.runs.mask_to_ct.generate_cts`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from custom_components.errors import GuideGenInputError

__all__ = ["MaskToCTPipeline", "check_autoencoder_matches", "check_mask_fits", "ct_affine_for_mask"]


def check_autoencoder_matches(autoencoder_path: str | os.PathLike, ldm_info: Mapping[str, Any], allow_mismatch: bool = False) -> None:
    """Make sure the autoencoder is the one whose latents the generator learned (its checkpoint's SHA-256).

    Raises:
        GuideGenInputError: a different checkpoint, unless ``allow_mismatch``.
    """
    from custom_components.data.io import file_digest

    expected = ldm_info.get("autoencoder_sha256")
    actual = file_digest(autoencoder_path)
    if expected and actual != expected and not allow_mismatch:
        raise GuideGenInputError(
            f"the autoencoder {autoencoder_path} (sha256 {actual[:12]}...) is not the one the latent generator was trained "
            f"with (sha256 {expected[:12]}...): its latents would decode to noise. Pass the matching --autoencoder_path, "
            "retrain the latent generator on this autoencoder, or set --allow_autoencoder_mismatch true"
        )


def check_mask_fits(mask: np.ndarray, what: str, mask_size: Sequence[int], num_classes: int, mask_factor: int) -> None:
    """Refuse a mask the latent generator cannot condition on, with a message saying what to do.

    Args:
        mask: class indices.
        what: the mask's origin, for the message (e.g. ``--mask mask.nii.gz``).
        mask_size: the mask size the generator was trained with (its latent grid x ``mask_factor``).
        num_classes: classes of the class map the models were trained with.
        mask_factor: how many mask voxels one latent voxel spans per axis.

    Raises:
        GuideGenInputError: wrong size or labels outside the class map.
    """
    mask_size = tuple(int(n) for n in mask_size)
    if tuple(mask.shape) != mask_size:
        latent = [n // int(mask_factor) for n in mask_size]
        raise GuideGenInputError(
            f"{what}: the mask has size {tuple(mask.shape)} but the latent generator works on a {latent} latent grid "
            f"x mask_factor {mask_factor} = {list(mask_size)}; resample the mask (nearest neighbour) to "
            f"{list(mask_size)} over the same field of view"
        )
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high >= num_classes:
        raise GuideGenInputError(
            f"{what}: the mask holds labels {low}..{high} but the class map has {num_classes} classes "
            f"(0..{num_classes - 1}); use a mask made with the class map the models were trained with"
        )


def ct_affine_for_mask(mask_affine: np.ndarray, mask_shape: Sequence[int], ct_shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-world matrix of a CT grid covering exactly the mask's box at another resolution.

    A CT voxel ``i`` lies at mask voxel coordinate ``(i + 0.5) · r − 0.5`` with ``r = mask_shape / ct_shape``, so the
    outer corners of both grids coincide.
    """
    ratio = np.asarray(mask_shape, dtype=np.float64) / np.asarray(ct_shape, dtype=np.float64)
    affine = np.array(mask_affine, dtype=np.float64)
    result = np.eye(4)
    result[:3, :3] = affine[:3, :3] * ratio
    result[:3, 3] = affine[:3, :3] @ (0.5 * ratio - 0.5) + affine[:3, 3]
    return result


class MaskToCTPipeline:
    """Mask + prompt -> CT (HU).

    Args:
        sampler: a :class:`~custom_components.pipelines.ldm.LatentDiffusionSampler`.
        autoencoder: an :class:`~custom_components.pipelines.autoencoder.AutoencoderPipeline`.
        scale_factor: the latent scale factor the generator was trained with.
        mask_size: the mask size the generator was trained with (its latent grid × mask_factor).
        num_classes: classes of the class map the models were trained with.
    """

    def __init__(self, sampler: Any, autoencoder: Any, scale_factor: float, mask_size: Sequence[int], num_classes: int) -> None:
        self.sampler = sampler
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)
        self.mask_size = tuple(int(n) for n in mask_size)
        self.num_classes = int(num_classes)

    def check_mask(self, mask: np.ndarray, what: str) -> None:
        """See :func:`check_mask_fits` (this generator's mask size, mask factor and class count)."""
        check_mask_fits(mask, what, self.mask_size, self.num_classes, int(self.sampler.network.mask_factor))

    def __call__(
        self,
        masks: np.ndarray | torch.Tensor,
        prompts: Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int | None = 0,
        progress: bool = True,
    ) -> torch.Tensor:
        """Generate one CT per (mask, prompt).

        Args:
            masks: (B, *mask_size) class indices.
            prompts: B prompts.
            num_inference_steps: DDIM steps.
            guidance_scale: classifier-free guidance scale (1: plain conditional sampling).
            seed: random seed (None: not seeded).
            progress: progress bars.

        Returns:
            (B, 1, *ct_size) CT in HU (float, CPU).
        """
        masks = torch.as_tensor(np.asarray(masks)).long()
        for index, mask in enumerate(masks):
            self.check_mask(mask.numpy(), f"mask {index}")
        return self._generate(masks, prompts, num_inference_steps, guidance_scale, seed, progress)

    def _generate(
        self, masks: torch.Tensor, prompts: Sequence[str], num_inference_steps: int, guidance_scale: float,
        seed: int | None, progress: bool,
    ) -> torch.Tensor:
        """:meth:`__call__` for masks already passed through :meth:`check_mask`."""
        latents = self.sample_latents(masks, prompts, num_inference_steps, guidance_scale, seed, progress)
        return self.decode_latents(latents, masks)

    def sample_latents(
        self, masks: torch.Tensor, prompts: Sequence[str], num_inference_steps: int, guidance_scale: float,
        seed: int | None, progress: bool,
    ) -> torch.Tensor:
        """Stage III alone: (B, *mask_size) checked masks + prompts -> scaled latents (Eq. 10-11)."""
        return self.sampler(masks[:, None], list(prompts), num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, seed=seed, progress=progress)

    def decode_latents(self, latents: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Stage II's decoder alone: scaled latents + their masks -> (B, 1, *ct_size) CT in HU."""
        return self.autoencoder.decode(latents / self.scale_factor, masks[:, None])
