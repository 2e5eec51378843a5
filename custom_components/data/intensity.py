"""CT intensity conventions of GuideGen: the full 12-bit HU range and windowed evaluation.

GuideGen (AAAI-26) trains its CT autoencoder on the *whole* Hounsfield range instead of one clipping window, so
that a single generated volume can be read with any clinical window (lung, soft tissue, bone) afterwards. The
model therefore sees CT mapped linearly from the 12-bit range ``[HU_MIN, HU_MAX] = [-1024, 3071]`` to
``[-1, 1]``:

    u = 2 (clamp(x, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) - 1

and the learnable HDR window of the loss (paper Eq. 7, :class:`custom_components.losses.HDRWindow`) recovers
contrast inside narrow windows. Image quality is reported per clinical window with :func:`windowed_psnr`.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from custom_components.errors import GuideGenInputError

__all__ = ["HU_MIN", "HU_MAX", "CT_WINDOWS", "hu_to_unit", "unit_to_hu", "windowed_psnr"]

HU_MIN = -1024.0
HU_MAX = 3071.0

# (low, high) HU bounds of the clinical windows used to evaluate generated CT.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-1000.0, 200.0),
    "soft_tissue": (-160.0, 240.0),
    "bone": (-200.0, 1500.0),
}

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def _as_float(x: ArrayT) -> ArrayT:
    """``x`` as a floating tensor/array; CT is usually stored as int16, whose arithmetic would overflow/truncate."""
    if isinstance(x, Tensor):
        return x if x.is_floating_point() else x.float()
    if isinstance(x, np.ndarray):
        return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
    raise GuideGenInputError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _clip(x: ArrayT, low: float, high: float) -> ArrayT:
    return torch.clamp(x, low, high) if isinstance(x, Tensor) else np.clip(x, low, high)


def hu_to_unit(x: ArrayT) -> ArrayT:
    """Map Hounsfield units linearly from ``[HU_MIN, HU_MAX]`` to ``[-1, 1]``, clamping values outside.

    Implements ``u = 2 (clamp(x, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) - 1``.

    Args:
        x: CT in HU, a torch tensor or numpy array of any shape (integer inputs are converted to float32).

    Returns:
        The same kind of container (and device for tensors) with values in ``[-1, 1]``.

    Raises:
        GuideGenInputError: ``x`` is neither a tensor nor an array.
    """
    x = _as_float(x)
    return _clip((x - HU_MIN) * (2.0 / (HU_MAX - HU_MIN)) - 1.0, -1.0, 1.0)


def unit_to_hu(x: ArrayT) -> ArrayT:
    """Inverse of :func:`hu_to_unit`: map ``[-1, 1]`` back to ``[HU_MIN, HU_MAX]``.

    Implements ``x = (clamp(u, -1, 1) + 1) (HU_MAX - HU_MIN) / 2 + HU_MIN``. The clamp keeps decoder overshoot
    of generated volumes inside the 12-bit range that a CT file can store.

    Args:
        x: values in model space, a torch tensor or numpy array of any shape.

    Returns:
        The same kind of container with values in HU, in ``[HU_MIN, HU_MAX]``.

    Raises:
        GuideGenInputError: ``x`` is neither a tensor nor an array.
    """
    x = _as_float(x)
    return (_clip(x, -1.0, 1.0) + 1.0) * ((HU_MAX - HU_MIN) / 2.0) + HU_MIN


def _to_numpy64(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    raise GuideGenInputError(f"windowed_psnr: {name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def windowed_psnr(
    reference_hu: Tensor | np.ndarray, test_hu: Tensor | np.ndarray, window: tuple[float, float] | str
) -> float:
    """PSNR of ``test_hu`` against ``reference_hu`` inside one clinical CT window.

    Both volumes are clipped to the window ``[lo, hi]`` and compared with data range ``R = hi - lo``:

        PSNR = 10 log10(R^2 / MSE(clip(ref), clip(test)))

    so differences outside the window (e.g. bone detail when reading soft tissue) do not count.

    Args:
        reference_hu: reference CT in HU (tensor or array).
        test_hu: CT to evaluate, in HU, same shape as ``reference_hu``.
        window: ``(lo, hi)`` in HU, or the name of a window in :data:`CT_WINDOWS`.

    Returns:
        The PSNR in dB as a Python float; ``inf`` when the clipped volumes are identical.

    Raises:
        GuideGenInputError: unknown window name, ``hi <= lo``, non tensor/array inputs or differing shapes.
    """
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise GuideGenInputError(f"windowed_psnr: unknown window '{window}'; use one of {sorted(CT_WINDOWS)}")
        window = CT_WINDOWS[window]
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError) as err:
        raise GuideGenInputError(f"windowed_psnr: window must be (low, high) in HU, got {window!r}") from err
    if not high > low:
        raise GuideGenInputError(f"windowed_psnr: window {window!r} has high <= low; give (low, high) with low < high")
    reference = _to_numpy64(reference_hu, "reference_hu")
    test = _to_numpy64(test_hu, "test_hu")
    if reference.shape != test.shape:
        raise GuideGenInputError(
            f"windowed_psnr: reference has shape {reference.shape} but test has {test.shape}; compare volumes on "
            "the same voxel grid"
        )
    if reference.size == 0:
        raise GuideGenInputError(f"windowed_psnr: the volumes are empty (shape {reference.shape})")
    mse = float(np.mean((np.clip(reference, low, high) - np.clip(test, low, high)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10((high - low) ** 2 / mse)
