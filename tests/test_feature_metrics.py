"""Paper feature metrics (slice LPIPS, 3-axis slice FID, axial FVD) on tiny volumes with random local weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from custom_components.errors import GuideGenInputError
from custom_components.metrics import (
    MetricUnavailable,
    axial_fvd,
    default_i3d_weights_path,
    default_inception_weights_path,
    feature_frechet_distance,
    frechet_distance,
    gaussian_statistics,
    load_i3d,
    load_inception,
    slice_fid,
    slice_lpips,
)
from custom_components.networks.i3d import InceptionI3d

SHAPE = (24, 24, 20)


# every test of this module fails loudly if it tries to download weights or reach the network
pytestmark = pytest.mark.usefixtures("no_network")


def _variance_preserving(net: torch.nn.Module) -> torch.nn.Module:
    """He-initialise the convolutions: with PyTorch's default init, activations shrink layer after layer and
    the features of a deep random network are ~1e-7 whatever the input, too small to tell sets apart."""
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the layout of torchvision's inception_v3_google file (auxiliary head included)."""
    from torchvision.models import inception_v3

    state = _variance_preserving(inception_v3(weights=None, aux_logits=True, init_weights=False)).state_dict()
    assert any(key.startswith("AuxLogits.") for key in state)
    path = tmp_path_factory.mktemp("inception") / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random I3D weights without BatchNorm step counters, like checkpoints saved before PyTorch 0.4."""
    state = _variance_preserving(InceptionI3d()).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("i3d") / "rgb_imagenet.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random VGG-16 trunk in torchvision's layout (classifier left out: SlicePerceptualLoss ignores it)."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file: Path):
    return load_inception(inception_file)


@pytest.fixture(scope="module")
def i3d(i3d_file: Path):
    return load_i3d(i3d_file)


def _body(seed: int) -> np.ndarray:
    """Soft tissue with noise in air: a crude CT volume."""
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[4:-4, 4:-4, :] = 40.0 + np.random.default_rng(seed).normal(0, 30, size=(16, 16, SHAPE[2]))
    return volume


def _bone(seed: int) -> np.ndarray:
    """Bright random bone-like speckle, nothing like a body in air."""
    return np.random.default_rng(seed).uniform(300, 2500, size=SHAPE).astype(np.float32)


# ------------------------------------------------------------------------------------------- networks, weights


def test_i3d_has_the_kinetics_checkpoint_layout() -> None:
    net = InceptionI3d()
    state = net.state_dict()
    expected_shapes = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_var": (64,),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_4f.b2a.bn.weight": (32,),
        "Mixed_5c.b3b.bn.running_mean": (128,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "logits.bn.weight" not in state and "Conv3d_1a_7x7.conv3d.bias" not in state
    assert net.logits.conv3d.out_channels == 400
    # Same count as piergiaj/pytorch-i3d's InceptionI3d (checked key by key against it when written).
    assert sum(p.numel() for p in net.parameters()) == 12_697_264


def test_loaders_read_local_weights(inception, i3d, inception_file: Path, i3d_file: Path) -> None:
    saved = torch.load(inception_file, weights_only=True)
    torch.testing.assert_close(inception.net.Conv2d_1a_3x3.conv.weight, saved["Conv2d_1a_3x3.conv.weight"])
    torch.testing.assert_close(inception.net.Mixed_7c.branch_pool.bn.running_var, saved["Mixed_7c.branch_pool.bn.running_var"])
    assert not hasattr(inception.net, "AuxLogits") or inception.net.AuxLogits is None
    saved = torch.load(i3d_file, weights_only=True)
    torch.testing.assert_close(i3d.net.Mixed_5c.b3b.bn.running_mean, saved["Mixed_5c.b3b.bn.running_mean"])
    torch.testing.assert_close(i3d.net.logits.conv3d.bias, saved["logits.conv3d.bias"])
    for module in (inception, i3d):
        module.train()
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    with torch.no_grad():
        # HU below -1024 is clamped by the window: -2000 and -1024 HU give the same features.
        features = inception(torch.tensor([-2000.0, -1024.0, 500.0]).view(3, 1, 1, 1).expand(3, 1, 20, 24))
    assert features.shape == (3, 2048)
    torch.testing.assert_close(features[0], features[1])
    assert not torch.allclose(features[1], features[2])


def test_missing_weights_are_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "absent" / "weights.pth"
    for load in (load_inception, load_i3d):
        with pytest.raises(MetricUnavailable) as info:
            load(missing)
        assert str(missing) in str(info.value) and "put" in str(info.value)
    with pytest.raises(MetricUnavailable, match="put") as info:
        slice_lpips([_body(0)], [_body(1)], vgg_weights_path=missing)
    assert str(missing) in str(info.value)
    monkeypatch.setenv("GUIDEGEN_INCEPTION_WEIGHTS", str(missing))
    monkeypatch.setenv("GUIDEGEN_I3D_WEIGHTS", "")
    assert default_inception_weights_path() == str(missing)
    assert default_i3d_weights_path().endswith(str(Path(".cache", "guidegen", "i3d_rgb_imagenet.pt")))
    with pytest.raises(MetricUnavailable, match="GUIDEGEN_INCEPTION_WEIGHTS"):
        load_inception()


def test_wrong_weights_are_input_errors(inception_file: Path, i3d_file: Path, tmp_path: Path) -> None:
    with pytest.raises(GuideGenInputError, match="not I3D weights") as info:
        load_i3d(inception_file)
    assert str(inception_file) in str(info.value) and "rgb_imagenet.pt" in str(info.value)
    with pytest.raises(GuideGenInputError, match="not Inception-v3 weights") as info:
        load_inception(i3d_file)
    assert "inception_v3_google-0cc3c7bd.pth" in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(GuideGenInputError, match="cannot read"):
        load_inception(garbage)
    # Right keys, wrong shapes: an I3D with 10 classes.
    wrong = tmp_path / "i3d_10_classes.pt"
    torch.save(InceptionI3d(num_classes=10).state_dict(), wrong)
    with pytest.raises(GuideGenInputError, match=r"not I3D weights.*logits\.conv3d"):
        load_i3d(wrong)


# ------------------------------------------------------------------------------------------------------ metrics


def test_feature_frechet_distance_matches_the_covariance_formula() -> None:
    rng = np.random.default_rng(0)
    for n_gen, n_ref, dim in ((4, 5, 16), (40, 30, 6)):  # fewer samples than dims (exact low-rank path), and more
        a, b = rng.normal(size=(n_gen, dim)), rng.normal(1.0, 2.0, size=(n_ref, dim))
        expected = frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
        assert feature_frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
        assert feature_frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(GuideGenInputError, match="at least 2"):
        feature_frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(3, 4)))


def test_slice_fid(inception) -> None:
    body = _body(0)
    same = slice_fid([body], [body.copy()], inception, slices_per_axis=2, batch_size=1)
    assert set(same) == {"axis_0", "axis_1", "axis_2", "mean"}
    assert abs(same["mean"]) < 1e-3 and all(abs(same[f"axis_{a}"]) < 1e-3 for a in range(3))
    air = np.full(SHAPE, -1000.0, dtype=np.float32)
    different = slice_fid([air], [_bone(1)], inception, slices_per_axis=2)
    assert different["mean"] > 1e-3 and different["mean"] > abs(same["mean"])
    assert different["mean"] == pytest.approx(np.mean([different[f"axis_{a}"] for a in range(3)]))


def test_axial_fvd(i3d) -> None:
    body = _body(0)
    same = axial_fvd([body], [body.copy()], i3d, clip_length=16, frame_size=64, clips_per_volume=2)
    assert abs(same) < 1e-3
    air = np.full(SHAPE, -1000.0, dtype=np.float32)
    different = axial_fvd([air, air], [_bone(1), _bone(2)], i3d, clip_length=16, frame_size=64)
    assert different > 1e-3 and different > abs(same)
    with pytest.raises(GuideGenInputError, match="fewer than clip_length"):
        axial_fvd([body], [np.zeros((24, 24, 8))], i3d, clip_length=16, frame_size=64, clips_per_volume=2)


def test_slice_lpips(vgg_file: Path) -> None:
    body, other = _body(0), _body(1)
    assert slice_lpips([body, other], [body.copy(), other.copy()], vgg_weights_path=vgg_file, slices_per_axis=2) == 0.0
    assert slice_lpips([body], [_bone(2)], vgg_weights_path=vgg_file, slices_per_axis=2) > 0.0
    with pytest.raises(GuideGenInputError, match="same shape"):
        slice_lpips([body], [body[:, :, :18]], vgg_weights_path=vgg_file)
    with pytest.raises(GuideGenInputError, match="pairs volumes"):
        slice_lpips([body, body], [body], vgg_weights_path=vgg_file)


def test_bad_inputs(inception, i3d, vgg_file: Path) -> None:
    body = _body(0)
    with pytest.raises(GuideGenInputError, match="generated is empty"):
        slice_fid([], [body], inception)
    with pytest.raises(GuideGenInputError, match="reference is empty"):
        axial_fvd([body], [], i3d)
    with pytest.raises(GuideGenInputError, match="generated is empty"):
        slice_lpips([], [], vgg_weights_path=vgg_file)
    with pytest.raises(GuideGenInputError, match=r"reference\[0\] has shape \(24, 24\)"):
        slice_fid([body], [body[:, :, 0]], inception)
    with pytest.raises(GuideGenInputError, match="needs at least 2"):
        slice_fid([body], [body], inception, slices_per_axis=1)
    with pytest.raises(GuideGenInputError, match="needs at least 2"):
        axial_fvd([body], [body], i3d, clip_length=16)  # one clip per volume, one volume per set
