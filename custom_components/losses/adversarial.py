"""Frame (2D) and volume (3D) patch discriminators for GuideGen's CT autoencoder (paper Eq. 9).

The adversarial part of the autoencoder loss judges realism at two levels: a 2D PatchGAN on planar slices
(frames, see :func:`custom_components.losses.frames.sample_frames`) and a 3D PatchGAN on the whole volume. The
paper's code averages the two; :class:`AdversarialTerms` does the same with configurable weights. Both use
MONAI's :class:`~monai.networks.nets.PatchDiscriminator` and :class:`~monai.losses.PatchAdversarialLoss`
(least squares, LSGAN):

    L_D = w_f * 1/2 (E[(D_f(x) - 1)^2] + E[D_f(x̂)^2]) + w_v * 1/2 (E[(D_v(x) - 1)^2] + E[D_v(x̂)^2])
    L_G = w_f * E[(D_f(x̂) - 1)^2] + w_v * E[(D_v(x̂) - 1)^2]

(MONAI applies a LeakyReLU(0.05) to the logits before the squared error.)

**Input size.** With the builders' kernel 4 / padding 1, the first conv and ``num_layers_d - 1`` more halve
the size (``n -> floor(n / 2)``) and the last two convs (stride 1) each remove one voxel, so the output has
``floor(n / 2^L) - 2`` voxels per side for ``L = num_layers_d``: every side needs at least
``3 * 2^L`` voxels (12 for ``L = 2``, 24 for ``L = 3``). See :func:`discriminator_min_size`.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import Tensor, nn

from custom_components.errors import GuideGenInputError

__all__ = [
    "AdversarialTerms",
    "build_frame_discriminator",
    "build_volume_discriminator",
    "discriminator_min_size",
]


def discriminator_min_size(num_layers_d: int) -> int:
    """Smallest side length a discriminator from this module accepts: ``3 * 2**num_layers_d``.

    Args:
        num_layers_d: the discriminator's ``num_layers_d``.

    Returns:
        The minimum number of pixels/voxels along every spatial axis.
    """
    return 3 * 2**num_layers_d


def _build(spatial_dims: int, in_channels: int, channels: int, num_layers_d: int) -> PatchDiscriminator:
    for name, value in (("in_channels", in_channels), ("channels", channels), ("num_layers_d", num_layers_d)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GuideGenInputError(f"patch discriminator: {name} must be an integer >= 1, got {value!r}")
    # Instance norm, not MONAI's default batch norm: with one volume per GPU, batch statistics are meaningless.
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        channels=channels,
        in_channels=in_channels,
        num_layers_d=num_layers_d,
        norm="INSTANCE",
    )


def build_frame_discriminator(in_channels: int = 1, channels: int = 64, num_layers_d: int = 3) -> PatchDiscriminator:
    """2D PatchGAN discriminator for slices.

    Args:
        in_channels: channels of the frames.
        channels: filters of the first layer (doubled at every further layer).
        num_layers_d: number of normalised conv layers; frames need sides >= ``3 * 2**num_layers_d``.

    Returns:
        A MONAI ``PatchDiscriminator`` (spatial_dims=2, instance norm); calling it returns the list of
        intermediate feature maps, the last being the logits map.

    Raises:
        GuideGenInputError: a non-positive argument.
    """
    return _build(2, in_channels, channels, num_layers_d)


def build_volume_discriminator(in_channels: int = 1, channels: int = 64, num_layers_d: int = 3) -> PatchDiscriminator:
    """3D PatchGAN discriminator for whole volumes.

    Args:
        in_channels: channels of the volumes.
        channels: filters of the first layer (doubled at every further layer).
        num_layers_d: number of normalised conv layers; volumes need sides >= ``3 * 2**num_layers_d``.

    Returns:
        A MONAI ``PatchDiscriminator`` (spatial_dims=3, instance norm); calling it returns the list of
        intermediate feature maps, the last being the logits map.

    Raises:
        GuideGenInputError: a non-positive argument.
    """
    return _build(3, in_channels, channels, num_layers_d)


def _check_fits(discriminator: nn.Module, x: Tensor, what: str) -> None:
    """Raise a clear error instead of a conv shape error deep inside the discriminator for too-small input."""
    sizes = list(x.shape[2:])
    for module in discriminator.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            if isinstance(module.padding, str):  # "same"/"valid" padding: not a discriminator built here
                return
            sizes = [
                (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
                for size, pad, dil, kernel, stride in zip(
                    sizes, module.padding, module.dilation, module.kernel_size, module.stride
                )
            ]
            if min(sizes) < 1:
                layers = getattr(discriminator, "num_layers_d", None)
                need = f" (at least {discriminator_min_size(layers)} per side)" if isinstance(layers, int) else ""
                raise GuideGenInputError(
                    f"{what} of shape {tuple(x.shape)} is too small for the discriminator{need}; use larger "
                    "crops or fewer discriminator layers (num_layers_d)"
                )


class AdversarialTerms:
    """
    LSGAN losses of the frame and volume discriminators, weighted and summed (see the module docstring).

    Holds no networks: the discriminators are passed to each call, so their optimisers and checkpoints stay with
    the training loop.

    Args:
        frame_weight: weight ``w_f`` of the 2D (frame) term; 0 disables it (the frame discriminator may be None).
        volume_weight: weight ``w_v`` of the 3D (volume) term; 0 disables it (the volume discriminator may be None).
        criterion: criterion of MONAI's ``PatchAdversarialLoss`` (``"least_squares"``, ``"hinge"`` or ``"bce"``).

    Raises:
        GuideGenInputError: a negative weight, or both weights 0.
    """

    def __init__(self, frame_weight: float = 0.5, volume_weight: float = 0.5, criterion: str = "least_squares") -> None:
        if frame_weight < 0 or volume_weight < 0 or frame_weight + volume_weight <= 0:
            raise GuideGenInputError(
                f"AdversarialTerms: weights must be >= 0 and not both 0, got frame_weight={frame_weight}, "
                f"volume_weight={volume_weight}"
            )
        self.frame_weight = float(frame_weight)
        self.volume_weight = float(volume_weight)
        try:
            self.loss = PatchAdversarialLoss(criterion=criterion, reduction="mean")
        except ValueError as err:
            raise GuideGenInputError(f"AdversarialTerms: {err}") from err

    def _logits(self, discriminator: nn.Module | None, x: Tensor, what: str) -> Tensor:
        if discriminator is None:
            raise GuideGenInputError(f"AdversarialTerms: no discriminator given for the {what} term, whose weight > 0")
        _check_fits(discriminator, x, what)
        # PatchDiscriminator returns [features..., logits]. PatchAdversarialLoss treats a *list* as the outputs of
        # several (multi-scale) discriminators, so passing the whole list would also score the feature maps.
        return discriminator(x)[-1]

    def _frame_batches(self, frames: Sequence[Tensor], what: str) -> Sequence[Tensor]:
        if isinstance(frames, Tensor):
            frames = [frames]
        if len(frames) == 0:
            raise GuideGenInputError(f"AdversarialTerms: {what} is empty; pass the batches from sample_frames")
        return frames

    def generator_loss(
        self,
        frame_disc: nn.Module | None,
        volume_disc: nn.Module | None,
        fake_frames: Sequence[Tensor],
        fake_volume: Tensor,
    ) -> Tensor:
        """Adversarial loss of the autoencoder: make both discriminators call the reconstruction real.

        Implements ``L_G = w_f * mean_axes E[(D_f(x̂_frames) - 1)^2] + w_v * E[(D_v(x̂) - 1)^2]``.

        Args:
            frame_disc: 2D discriminator (None allowed when ``frame_weight == 0``).
            volume_disc: 3D discriminator (None allowed when ``volume_weight == 0``).
            fake_frames: 2D batches of reconstructed frames, e.g. the three per-axis batches of
                :func:`~custom_components.losses.frames.sample_frames` (shapes may differ between batches).
            fake_volume: reconstructed volume (B, C, D, H, W).

        Returns:
            A 0-dim tensor with gradient to the reconstruction (and the discriminators' parameters, which the
            generator's optimiser must not step).

        Raises:
            GuideGenInputError: a missing discriminator for an enabled term, no frames, or inputs too small.
        """
        total = fake_volume.new_zeros(())
        if self.frame_weight > 0:
            batches = self._frame_batches(fake_frames, "fake_frames")
            frame_term = sum(
                self.loss(self._logits(frame_disc, f, "fake frame batch"), target_is_real=True, for_discriminator=False)
                for f in batches
            ) / len(batches)
            total = total + self.frame_weight * frame_term
        if self.volume_weight > 0:
            logits = self._logits(volume_disc, fake_volume, "fake volume")
            total = total + self.volume_weight * self.loss(logits, target_is_real=True, for_discriminator=False)
        return total

    def _real_fake(self, discriminator: nn.Module | None, real: Tensor, fake: Tensor, what: str) -> Tensor:
        real_term = self.loss(self._logits(discriminator, real.detach(), f"real {what}"), True, True)
        fake_term = self.loss(self._logits(discriminator, fake.detach(), f"fake {what}"), False, True)
        return 0.5 * (real_term + fake_term)

    def discriminator_loss(
        self,
        frame_disc: nn.Module | None,
        volume_disc: nn.Module | None,
        real_frames: Sequence[Tensor],
        fake_frames: Sequence[Tensor],
        real_volume: Tensor,
        fake_volume: Tensor,
    ) -> Tensor:
        """Loss of the two discriminators: real -> 1, reconstruction -> 0.

        Implements ``L_D = w_f * mean_axes 1/2 (E[(D_f(x) - 1)^2] + E[D_f(x̂)^2]) + w_v * 1/2 (...)`` for the
        volume. Every input is detached here, so this loss never reaches the autoencoder (nor the HDR window
        parameters when the frames are windowed).

        Args:
            frame_disc: 2D discriminator (None allowed when ``frame_weight == 0``).
            volume_disc: 3D discriminator (None allowed when ``volume_weight == 0``).
            real_frames: 2D batches of real frames, matched one to one with ``fake_frames``.
            fake_frames: 2D batches of reconstructed frames.
            real_volume: real volume (B, C, D, H, W).
            fake_volume: reconstructed volume, same shape.

        Returns:
            A 0-dim tensor with gradient only to the discriminators' parameters.

        Raises:
            GuideGenInputError: a missing discriminator for an enabled term, no frames, unmatched real/fake
                batches, or inputs too small.
        """
        total = real_volume.new_zeros((), dtype=fake_volume.dtype)
        if self.frame_weight > 0:
            reals = self._frame_batches(real_frames, "real_frames")
            fakes = self._frame_batches(fake_frames, "fake_frames")
            if len(reals) != len(fakes):
                raise GuideGenInputError(
                    f"AdversarialTerms: {len(reals)} real frame batches but {len(fakes)} fake ones; sample them "
                    "together with sample_frames((real, fake), ...)"
                )
            frame_term = sum(self._real_fake(frame_disc, r, f, "frame batch") for r, f in zip(reals, fakes)) / len(
                reals
            )
            total = total + self.frame_weight * frame_term
        if self.volume_weight > 0:
            total = total + self.volume_weight * self._real_fake(volume_disc, real_volume, fake_volume, "volume")
        return total
