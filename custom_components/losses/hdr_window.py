"""The learnable high-dynamic-range (HDR) window of GuideGen's CT autoencoder loss (paper Eq. 7).

GuideGen (AAAI-26) keeps the full 12-bit HU range (see :mod:`custom_components.data.intensity`). Mapped to
``[-1, 1]``, a soft-tissue window spans only ~0.2 of that range, so a plain reconstruction loss barely sees
low-contrast anatomy. The paper therefore compares reconstruction and target through a randomly placed window,

    h(x) = k * clamp((x - w_c + w_r) / (2 w_r), 0, 1) + b                                          (Eq. 7)

with window centre ``w_c`` and half-width ``w_r`` drawn afresh for every volume and every step, and learnable
``k`` and ``b``; the reconstruction terms of Eq. 8 (L1, perceptual, adversarial) are evaluated on ``h(x̂)`` and
``h(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from custom_components.data.intensity import CT_WINDOWS, hu_to_unit
from custom_components.errors import GuideGenInputError

__all__ = ["HDRWindow", "clinical_window_l1"]

# Half-width used for a constant volume (hi == lo), where the sampled range is empty; any positive value works
# because x - w_c is then exactly 0 and h(x) = k / 2 + b.
_TINY_WIDTH = 1e-6


def _inverse_softplus(y: float) -> float:
    """``softplus^{-1}(y) = log(exp(y) - 1)`` for ``y > 0``, stable for large ``y``."""
    return y + math.log(-math.expm1(-y))


class HDRWindow(nn.Module):
    """
    Learnable HDR window ``h(x) = k * clamp((x - w_c + w_r) / (2 w_r), 0, 1) + b`` (paper Eq. 7).

    **Why k is bounded below.** Under the L1 term of Eq. 8,

        |h(x̂) - h(x)| = |k| * |w(x̂) - w(x)|,      w(x) = clamp((x - w_c + w_r) / (2 w_r), 0, 1),

    ``b`` cancels, and ``dL/dk = sign(k) |w(x̂) - w(x)| >= 0`` whatever the reconstruction is: an unconstrained
    learnable ``k`` is driven to 0 by the very loss it scales, which switches the windowed loss off. Here ``k`` is
    parametrised as

        k = min_scale + softplus(raw_k),

    with ``raw_k`` initialised so that ``k == k_init``. The L1 term still pushes ``k`` down, but only towards
    ``min_scale``: the windowed L1 always keeps at least that weight. ``b`` is a free parameter.

    **Where the gradients come from.** ``k`` receives gradient from the L1 term (downwards, as above) and from the
    perceptual term; ``b`` receives gradient only from terms that are not shift-invariant, in practice the LPIPS
    perceptual loss (its VGG trunk has biases and ReLUs, so ``LPIPS(a + b, c + b) != LPIPS(a, c)``) and the
    adversarial terms. Under the L1 term alone ``b`` gets exactly zero gradient.

    Windows are drawn per volume by :meth:`sample_windows`; :meth:`forward` applies them. With the defaults
    (``k = 2``, ``b = -1``) a window maps onto ``[-1, 1]``, the input range LPIPS expects.

    Args:
        k_init: initial scale ``k``; must exceed ``min_scale``.
        b_init: initial offset ``b``.
        min_scale: lower bound of ``k`` (> 0), see above.
        min_width_fraction: smallest sampled half-width as a fraction of a volume's intensity range, in
            ``(0, 0.5]``; keeps windows from degenerating into a step function with no gradient to ``x``.

    Raises:
        GuideGenInputError: ``min_scale <= 0``, ``k_init <= min_scale`` or ``min_width_fraction`` outside
            ``(0, 0.5]``.
    """

    def __init__(
        self, k_init: float = 2.0, b_init: float = -1.0, min_scale: float = 0.5, min_width_fraction: float = 0.02
    ) -> None:
        super().__init__()
        if not min_scale > 0:
            raise GuideGenInputError(f"HDRWindow: min_scale must be > 0 (it keeps k from collapsing), got {min_scale}")
        if not k_init > min_scale:
            raise GuideGenInputError(
                f"HDRWindow: k_init ({k_init}) must be greater than min_scale ({min_scale}); raise k_init or lower "
                "min_scale"
            )
        if not 0 < min_width_fraction <= 0.5:
            raise GuideGenInputError(
                f"HDRWindow: min_width_fraction must lie in (0, 0.5], got {min_width_fraction}; the largest "
                "half-width sampled is half the intensity range"
            )
        self.min_scale = float(min_scale)
        self.min_width_fraction = float(min_width_fraction)
        self.raw_k = nn.Parameter(torch.tensor(_inverse_softplus(float(k_init) - self.min_scale)))
        self.b = nn.Parameter(torch.tensor(float(b_init)))

    @property
    def scale(self) -> Tensor:
        """The current scale ``k = min_scale + softplus(raw_k)`` (0-dim tensor, differentiable)."""
        return self.min_scale + F.softplus(self.raw_k)

    @property
    def offset(self) -> Tensor:
        """The current offset ``b`` (the parameter itself; an alias for logging)."""
        return self.b

    @torch.no_grad()
    def sample_windows(self, target: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw one window per volume from that volume's own intensity range.

        With ``[lo, hi]`` the min and max of sample ``i``:

            w_c ~ U(lo, hi),     w_r ~ U(min_width_fraction (hi - lo), (hi - lo) / 2).

        Args:
            target: batch of volumes (B, C, *spatial), usually the real CT in ``[-1, 1]``.
            generator: optional random generator for reproducible windows; it must live on ``target``'s device.

        Returns:
            ``(w_c, w_r)``, each of shape (B,), on ``target``'s device, in ``target``'s dtype (float32 for
            integer input); no gradient.

        Raises:
            GuideGenInputError: ``target`` has fewer than 2 dimensions or no elements, or ``generator`` lives on
                another device type.
        """
        if target.ndim < 2 or target.numel() == 0:
            raise GuideGenInputError(
                "HDRWindow.sample_windows: expected a non-empty batch (B, C, *spatial), got shape "
                f"{tuple(target.shape)}"
            )
        if generator is not None and generator.device.type != target.device.type:
            raise GuideGenInputError(
                f"HDRWindow.sample_windows: generator is on {generator.device} but target on {target.device}; "
                "create the generator on the target's device"
            )
        dtype = target.dtype if target.is_floating_point() else torch.float32
        low, high = target.detach().flatten(1).to(dtype).aminmax(dim=1)
        width = high - low
        width = torch.where(width > 0, width, torch.full_like(width, _TINY_WIDTH))
        uniform = torch.rand((2, target.shape[0]), generator=generator, device=target.device, dtype=dtype)
        centre = low + uniform[0] * (high - low)
        smallest = self.min_width_fraction * width
        half_width = smallest + uniform[1] * (width / 2 - smallest)
        return centre, half_width

    def forward(self, x: Tensor, wc: Tensor | float, wr: Tensor | float) -> Tensor:
        """Apply ``h(x) = k * clamp((x - w_c + w_r) / (2 w_r), 0, 1) + b`` (Eq. 7) with a window per sample.

        Args:
            x: batch (B, C, *spatial) (any number of trailing dims).
            wc: window centres, shape (B,), or one value for the whole batch.
            wr: window half-widths (> 0), shape (B,), or one value for the whole batch.

        Returns:
            ``h(x)``, same shape as ``x``, with values in ``[b, b + k]``.

        Raises:
            GuideGenInputError: ``x`` has fewer than 2 dimensions, or ``wc``/``wr`` hold neither 1 nor B values.
        """
        if x.ndim < 2:
            raise GuideGenInputError(f"HDRWindow: expected a batch (B, C, *spatial), got shape {tuple(x.shape)}")
        batch = x.shape[0]
        dtype = x.dtype if x.is_floating_point() else torch.float32
        view = (-1,) + (1,) * (x.ndim - 1)
        params = []
        for name, value in (("wc", wc), ("wr", wr)):
            value = torch.as_tensor(value, device=x.device, dtype=dtype)
            if value.numel() not in (1, batch):
                raise GuideGenInputError(
                    f"HDRWindow: {name} has shape {tuple(value.shape)}; expected one value per sample ({batch},) or "
                    "a single value"
                )
            params.append(value.reshape(view))
        centre, half_width = params
        unit = torch.clamp((x.to(dtype) - centre + half_width) / (2 * half_width), 0.0, 1.0)
        return self.scale.to(dtype) * unit + self.b.to(dtype)

    def extra_repr(self) -> str:
        return f"k={self.scale.item():.4g}, b={self.b.item():.4g}, min_scale={self.min_scale}"


def clinical_window_l1(reconstruction: Tensor, target: Tensor, windows_hu: Mapping[str, Sequence[float]] | None = None) -> Tensor:
    """L1 under each fixed clinical CT window (lung, soft tissue, bone), summed: the windows the CT is read in.

    For a window ``[lo, hi]`` (HU, mapped to the [-1, 1] model scale) the term is

        2 * mean |clamp(x̂, lo, hi) - clamp(x, lo, hi)| / (hi - lo),

    i.e. the L1 of Eq. 8 under the window ``h`` of Eq. 7 with ``w_c, w_r`` set to that window and ``k = 2``
    (the window mapped onto [-1, 1]); the terms of all windows are added. Beyond the paper: its random window
    ``w_c ~ U(min, max)`` mostly lands where few voxels are (between the air and tissue modes, or above bone), so
    most steps teach little; these windows always hold the voxels that matter and their contrast is the one the
    evaluation (:func:`~custom_components.data.intensity.windowed_psnr`) reads.

    Args:
        reconstruction: (B, C, *spatial) reconstruction on the [-1, 1] scale.
        target: the real CT, same shape and scale.
        windows_hu: ``{name: (lo, hi)}`` in HU; default the clinical windows of
            :data:`~custom_components.data.intensity.CT_WINDOWS`.

    Returns:
        A 0-dim tensor.

    Raises:
        GuideGenInputError: the shapes differ or a window has ``hi <= lo``.
    """
    if reconstruction.shape != target.shape:
        raise GuideGenInputError(
            f"clinical_window_l1: reconstruction has shape {tuple(reconstruction.shape)} but target "
            f"{tuple(target.shape)}; they must match"
        )
    total = reconstruction.new_zeros(())
    for name, (low_hu, high_hu) in (windows_hu or CT_WINDOWS).items():
        if not high_hu > low_hu:
            raise GuideGenInputError(f"clinical_window_l1: window {name!r} = ({low_hu}, {high_hu}) needs lo < hi")
        low, high = float(hu_to_unit(torch.tensor(float(low_hu)))), float(hu_to_unit(torch.tensor(float(high_hu))))
        difference = reconstruction.clamp(low, high) - target.clamp(low, high)
        total = total + difference.abs().mean() * (2.0 / (high - low))
    return total
