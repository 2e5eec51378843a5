"""Slice sampling and the KL regulariser for GuideGen's CT autoencoder loss (paper Eq. 8).

The 2D terms of the autoencoder loss (LPIPS perceptual loss, frame discriminator) work on planar slices
("frames") of the 3D volumes. :func:`sample_frames` takes the *same* random slices from several aligned volumes
(real and reconstruction, or their HDR-windowed versions) along all three axes, so that corresponding frames are
compared. :func:`kl_divergence` is the usual VAE term that keeps the latent close to N(0, I).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from custom_components.errors import GuideGenInputError

__all__ = ["sample_frames", "kl_divergence"]


def sample_frames(
    volumes: Sequence[Tensor], num_frames: int, generator: torch.Generator | None = None
) -> list[list[Tensor]]:
    """Take the same random planar slices along each of the three axes from several aligned volumes.

    For each spatial axis ``a`` of the (B, C, D, H, W) volumes, ``n_a = min(num_frames, size_a)`` distinct indices
    are drawn at random (one draw shared by the whole batch and by every volume of the call) and the slices at
    those indices become 2D images.

    Args:
        volumes: one or more volumes of identical shape (B, C, D, H, W), e.g. ``(real, reconstruction)``.
        num_frames: slices per axis (>= 1); capped by the size of that axis.
        generator: optional random generator for reproducible indices; it must live on the volumes' device.

    Returns:
        One list per volume, in input order, holding three 2D batches, one per axis:
        ``(B * n_D, C, H, W)``, ``(B * n_H, C, D, W)``, ``(B * n_W, C, D, H)``. Rows are sample-major (the
        ``n`` slices of sample 0 first). Slices are views into the graph, so gradients flow back to the volumes.

    Raises:
        GuideGenInputError: no volumes, a volume that is not 5D, volumes of different shapes, ``num_frames < 1``,
            or a generator on another device type.
    """
    if len(volumes) == 0:
        raise GuideGenInputError("sample_frames: no volumes given; pass e.g. (real, reconstruction)")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise GuideGenInputError(f"sample_frames: num_frames must be an integer >= 1, got {num_frames!r}")
    shape = tuple(volumes[0].shape)
    for position, volume in enumerate(volumes):
        if volume.ndim != 5:
            raise GuideGenInputError(
                f"sample_frames: volume {position} has shape {tuple(volume.shape)}; expected (B, C, D, H, W)"
            )
        if tuple(volume.shape) != shape:
            raise GuideGenInputError(
                f"sample_frames: volume {position} has shape {tuple(volume.shape)} but volume 0 has {shape}; the "
                "volumes must be aligned (same shape) so that the same slices can be compared"
            )
    device = volumes[0].device
    if generator is not None and generator.device.type != device.type:
        raise GuideGenInputError(
            f"sample_frames: generator is on {generator.device} but the volumes on {device}; create the generator "
            "on the volumes' device"
        )

    frames: list[list[Tensor]] = [[] for _ in volumes]
    for axis in range(3):
        dim = 2 + axis
        size = shape[dim]
        count = min(num_frames, size)
        indices = torch.randperm(size, generator=generator, device=device)[:count]
        for position, volume in enumerate(volumes):
            picked = volume.index_select(dim, indices).movedim(dim, 1)  # (B, n, C, a, b)
            frames[position].append(picked.reshape(shape[0] * count, *picked.shape[2:]))
    return frames


def kl_divergence(z_mu: Tensor, z_sigma: Tensor) -> Tensor:
    """KL divergence of the encoder's diagonal Gaussian from the standard normal.

    Implements ``KL(N(μ, σ²) || N(0, 1)) = 1/2 Σ (μ² + σ² - log σ² - 1)``, summed over all latent dimensions of
    a sample and averaged over the batch.

    Args:
        z_mu: latent means (B, ...).
        z_sigma: latent standard deviations (> 0), same shape (MONAI's ``AutoencoderKL`` returns ``exp(logvar/2)``).

    Returns:
        A 0-dim tensor.

    Raises:
        GuideGenInputError: the shapes differ or there is no batch dimension.
    """
    if z_mu.shape != z_sigma.shape:
        raise GuideGenInputError(
            f"kl_divergence: z_mu has shape {tuple(z_mu.shape)} but z_sigma {tuple(z_sigma.shape)}; they must match"
        )
    if z_mu.ndim < 1 or z_mu.shape[0] == 0:
        raise GuideGenInputError(f"kl_divergence: expected a non-empty batch (B, ...), got shape {tuple(z_mu.shape)}")
    # 2 log σ rather than log(σ²): σ² underflows to 0 in float16/bfloat16 well before σ does.
    per_element = z_mu.pow(2) + z_sigma.pow(2) - 2.0 * torch.log(z_sigma) - 1.0
    return 0.5 * per_element.reshape(per_element.shape[0], -1).sum(dim=1).mean()
