"""Frozen LPIPS (VGG-16) perceptual loss on 2D CT slices, for GuideGen's autoencoder loss (paper Eq. 8).

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018,
https://arxiv.org/abs/1801.03924) compares unit-normalised VGG-16 features of two images, weighted per channel
by linear layers calibrated on human judgements:

    LPIPS(x, y) = sum_l mean_{h,w} || w_l ⊙ (φ_l(x) / ||φ_l(x)|| - φ_l(y) / ||φ_l(y)||) ||^2

GuideGen applies it to planar slices of the HDR-windowed reconstruction and target (:mod:`.frames`).

No weight is ever downloaded. The ``lpips`` package fetches the ImageNet VGG-16 trunk through torchvision's
downloader unless asked for a random trunk; here it is built with ``pnet_rand=True`` (random trunk, no download)
and the trunk is then loaded from a local copy of torchvision's ``vgg16-397923af.pth``. The LPIPS linear layers
(``pretrained=True``) are read by ``lpips`` from ``weights/v0.1/vgg.pth`` inside its own installed package.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from custom_components.errors import GuideGenInputError

__all__ = ["SlicePerceptualLoss", "default_vgg_weights_path", "VGG16_URL"]

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
_ENV_VAR = "GUIDEGEN_VGG16_WEIGHTS"
# VGG-16 halves the resolution 4 times before LPIPS's last feature layer (relu5_3); smaller slices leave it empty.
_MIN_SIZE = 16


def default_vgg_weights_path() -> str:
    """Where the VGG-16 trunk weights are looked for by default.

    Returns:
        The value of the environment variable ``GUIDEGEN_VGG16_WEIGHTS`` when it is set and non-empty, else
        ``~/.cache/guidegen/vgg16-397923af.pth`` (expanded). The file need not exist.
    """
    from_env = os.environ.get(_ENV_VAR)
    if from_env:
        return from_env
    return str(Path.home() / ".cache" / "guidegen" / VGG16_FILENAME)


def _build_lpips() -> nn.Module:
    """LPIPS-VGG with a random trunk and the packaged linear layers, without touching the network."""
    import lpips  # imported lazily: it imports torchvision, which is slow and unused elsewhere

    with warnings.catch_warnings():
        # lpips still calls torchvision's vgg16(pretrained=False), which warns about the deprecated argument.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


def _read_state_dict(path: Path) -> dict:
    """Load a state dict with ``weights_only=True`` (no arbitrary code from a pickled file)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, EOF) for unreadable files
        raise GuideGenInputError(
            f"cannot read VGG-16 weights file {path} ({type(err).__name__}: {err}); it must be torchvision's VGG-16 "
            f"state dict ({VGG16_FILENAME}, {VGG16_URL})"
        ) from err
    if not isinstance(loaded, dict):
        raise GuideGenInputError(
            f"{path} holds a {type(loaded).__name__}, not a state dict; the perceptual loss needs torchvision's "
            f"VGG-16 state dict {VGG16_FILENAME} ({VGG16_URL})"
        )
    return loaded


def _trunk_state_dict(loaded: dict, path: Path, trunk: nn.Module) -> dict[str, Tensor]:
    """Rename torchvision's ``features.{i}.*`` keys to lpips' ``slice{k}.{i}.*``, checking every key and shape.

    lpips' ``vgg16`` wrapper splits ``features`` into ``slice1`` .. ``slice5`` but keeps the original layer index
    as the submodule name, so the index alone identifies the target key.
    """
    wrong = (
        f"{path} is not torchvision's VGG-16 state dict; the perceptual loss needs {VGG16_FILENAME} ({VGG16_URL})"
    )
    expected = trunk.state_dict()
    by_torchvision_name = {}
    for name in expected:
        _, index, param = name.split(".")  # "slice{k}.{index}.{weight|bias}"
        by_torchvision_name[f"features.{index}.{param}"] = name
    given = {key for key in loaded if isinstance(key, str) and key.startswith("features.")}
    missing = sorted(set(by_torchvision_name) - given)
    unexpected = sorted(given - set(by_torchvision_name))
    if missing or unexpected:
        raise GuideGenInputError(f"{wrong}: missing keys {missing[:6]}, unexpected keys {unexpected[:6]}")
    renamed: dict[str, Tensor] = {}
    for source, target in by_torchvision_name.items():
        value = loaded[source]
        if not isinstance(value, Tensor) or value.shape != expected[target].shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise GuideGenInputError(
                f"{wrong}: {source} has shape {shape}, VGG-16 needs {tuple(expected[target].shape)}"
            )
        renamed[target] = value
    return renamed


class SlicePerceptualLoss(nn.Module):
    """
    LPIPS-VGG perceptual distance between two batches of 2D slices, with every weight frozen.

    The trunk and the LPIPS linear layers never train (``requires_grad`` is off and the module stays in eval
    mode: :meth:`train` is a no-op), but gradients flow through it to the inputs.

    Args:
        vgg_weights_path: path of torchvision's VGG-16 ImageNet state dict ``vgg16-397923af.pth`` (see
            :func:`default_vgg_weights_path`). Only the 13 ``features`` conv layers are used; ``classifier`` keys
            are ignored.
        allow_random_trunk: when the weights file is absent (or the path is None), use a randomly initialised
            trunk instead of failing. That is **not** LPIPS; meant for tests only, and warned about.

    Attributes:
        is_pretrained: True when the VGG-16 trunk was loaded from ``vgg_weights_path``.

    Raises:
        GuideGenInputError: the file is missing (and ``allow_random_trunk`` is False), unreadable, or not a
            torchvision VGG-16 state dict.
    """

    def __init__(self, vgg_weights_path: str | os.PathLike[str] | None, allow_random_trunk: bool = False) -> None:
        super().__init__()
        path = None if vgg_weights_path is None else Path(vgg_weights_path).expanduser()
        found = path is not None and path.is_file()
        if not found and not allow_random_trunk:
            where = "(no path given)" if path is None else str(path)
            raise GuideGenInputError(
                f"VGG-16 weights for the perceptual loss not found at {where}; download torchvision's "
                f"{VGG16_FILENAME} ({VGG16_URL}) on a machine with network access and put it there, or set "
                "perceptual_weight: 0"
            )
        # Read the file before the (slow) LPIPS build so that an unreadable file fails fast.
        loaded = _read_state_dict(path) if found and path is not None else None
        self.lpips = _build_lpips()
        if loaded is not None:
            assert path is not None
            self.lpips.net.load_state_dict(_trunk_state_dict(loaded, path, self.lpips.net), strict=True)
            self.is_pretrained = True
        else:
            warnings.warn(
                f"SlicePerceptualLoss: no VGG-16 weights at {path}; using a RANDOM trunk. This is NOT LPIPS and is "
                "only meant for tests.",
                UserWarning,
                stacklevel=2,
            )
            self.is_pretrained = False
        self.lpips.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> SlicePerceptualLoss:
        """Keep eval mode whatever is asked: LPIPS has dropout before its linear layers that must stay off.

        Args:
            mode: ignored.

        Returns:
            self.
        """
        return super().train(False)

    def forward(self, input_frames: Tensor, target_frames: Tensor) -> Tensor:
        """Mean LPIPS distance between corresponding slices.

        Args:
            input_frames: slices (N, 1, H, W) (or already 3-channel), values roughly in ``[-1, 1]``;
                ``H, W >= 16``.
            target_frames: slices of the same shape.

        Returns:
            A 0-dim tensor, the LPIPS distance averaged over the N slices.

        Raises:
            GuideGenInputError: the batches differ in shape, are not 4D with 1 or 3 channels, or are smaller than
                16 x 16.
        """
        if input_frames.shape != target_frames.shape:
            raise GuideGenInputError(
                f"SlicePerceptualLoss: input has shape {tuple(input_frames.shape)} but target "
                f"{tuple(target_frames.shape)}; they must match"
            )
        if input_frames.ndim != 4 or input_frames.shape[1] not in (1, 3):
            raise GuideGenInputError(
                f"SlicePerceptualLoss: expected 2D slices (N, 1, H, W), got shape {tuple(input_frames.shape)}"
            )
        if min(input_frames.shape[2:]) < _MIN_SIZE:
            raise GuideGenInputError(
                f"SlicePerceptualLoss: slices of {tuple(input_frames.shape[2:])} are too small; VGG-16 needs at "
                f"least {_MIN_SIZE} x {_MIN_SIZE}"
            )
        if input_frames.shape[1] == 1:
            # VGG was trained on RGB; a grey slice is the same intensity in all three channels.
            input_frames = input_frames.expand(-1, 3, -1, -1)
            target_frames = target_frames.expand(-1, 3, -1, -1)
        return self.lpips(input_frames, target_frames).mean()
