"""Tests of the CT autoencoder losses: HU mapping, HDR window (Eq. 7), LPIPS on slices, frames, adversarial terms."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from custom_components.data.intensity import CT_WINDOWS, HU_MAX, HU_MIN, hu_to_unit, unit_to_hu, windowed_psnr
from custom_components.errors import GuideGenInputError
from custom_components.losses import (
    AdversarialTerms,
    HDRWindow,
    SlicePerceptualLoss,
    build_frame_discriminator,
    build_volume_discriminator,
    default_vgg_weights_path,
    discriminator_min_size,
    kl_divergence,
    sample_frames,
)


# --------------------------------------------------------------------------------------------------- intensity


def test_hu_unit_round_trip_torch_and_numpy() -> None:
    hu = torch.linspace(HU_MIN, HU_MAX, 101)
    unit = hu_to_unit(hu)
    assert unit.min().item() == pytest.approx(-1.0) and unit.max().item() == pytest.approx(1.0)
    torch.testing.assert_close(unit_to_hu(unit), hu, atol=1e-3, rtol=0)
    arr = np.array([-1024, 0, 40, 3071], dtype=np.int16)
    back = unit_to_hu(hu_to_unit(arr))
    assert isinstance(back, np.ndarray)
    np.testing.assert_allclose(back, arr, atol=1e-3)


def test_hu_to_unit_clamps() -> None:
    out = hu_to_unit(torch.tensor([-5000.0, 10000.0]))
    assert out.tolist() == [-1.0, 1.0]
    assert unit_to_hu(np.array([-3.0, 2.0])).tolist() == [HU_MIN, HU_MAX]


def test_windowed_psnr() -> None:
    reference = np.zeros((4, 5, 6))
    assert windowed_psnr(reference, reference, "soft_tissue") == math.inf
    low, high = CT_WINDOWS["soft_tissue"]
    # A constant offset of 10 HU inside the window: MSE = 100, range = 400 -> 20 log10(400 / 10).
    expected = 20 * math.log10((high - low) / 10.0)
    psnr = windowed_psnr(torch.tensor(reference), torch.tensor(reference + 10.0), (low, high))
    assert psnr == pytest.approx(expected)
    # Outside the window both clip to the same value: no error counted.
    assert windowed_psnr(reference + 2000, reference + 2500, "soft_tissue") == math.inf
    with pytest.raises(GuideGenInputError, match=r"\(4, 5, 6\).*\(4, 5\)"):
        windowed_psnr(reference, reference[..., 0], "lung")
    with pytest.raises(GuideGenInputError, match="unknown window"):
        windowed_psnr(reference, reference, "brain")


# --------------------------------------------------------------------------------------------------- HDR window


def test_hdr_window_range_and_formula() -> None:
    window = HDRWindow(k_init=2.0, b_init=-1.0)
    assert window.scale.item() == pytest.approx(2.0)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 6, 5, 4, generator=generator) * 2 - 1
    wc, wr = window.sample_windows(x, generator)
    out = window(x, wc, wr)
    k, b = window.scale.item(), window.offset.item()
    assert out.shape == x.shape
    assert out.min().item() >= b - 1e-6 and out.max().item() <= b + k + 1e-6

    # k = 3, b = 0.5, window centre 0, half-width 1: (x + 1) / 2 clamped, times 3, plus 0.5.
    window = HDRWindow(k_init=3.0, b_init=0.5)
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 3.0]).reshape(1, 1, 5)
    expected = torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]) * 3.0 + 0.5
    torch.testing.assert_close(window(x, torch.tensor([0.0]), torch.tensor([1.0])).flatten(), expected)


def test_hdr_window_gradients() -> None:
    window = HDRWindow()
    target = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    recon = target + 0.1 * torch.randn_like(target)
    wc, wr = torch.zeros(2), torch.ones(2)
    F.l1_loss(window(recon, wc, wr), window(target, wc, wr)).backward()
    assert window.raw_k.grad is not None and window.raw_k.grad.item() > 0  # L1 pushes k down ...
    assert window.b.grad is None or window.b.grad.item() == 0.0  # ... and cannot see b

    window.zero_grad()
    # Any loss that is not shift-invariant reaches b (LPIPS is one; a squared magnitude is the simplest).
    (window(recon, wc, wr) ** 2).mean().backward()
    assert window.b.grad is not None and window.b.grad.abs().item() > 0


def test_hdr_window_scale_never_collapses() -> None:
    window = HDRWindow(k_init=2.0, min_scale=0.5)
    optimiser = torch.optim.SGD(window.parameters(), lr=5.0)
    target = torch.rand(2, 1, 6, 6, 6) * 2 - 1
    recon = target + 0.3 * torch.randn_like(target)
    for _ in range(300):
        wc, wr = window.sample_windows(target)
        loss = F.l1_loss(window(recon, wc, wr), window(target, wc, wr))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert window.scale.item() >= 0.5
    assert window.scale.item() < 1.0  # the L1 did push it down: the bound, not luck, holds it


def test_hdr_window_sample_windows_bounds_and_determinism() -> None:
    window = HDRWindow(min_width_fraction=0.1)
    target = torch.stack([torch.linspace(-1, 0.5, 64), torch.linspace(0, 0.2, 64), torch.full((64,), 0.3)])
    target = target.reshape(3, 1, 4, 4, 4)
    lo = torch.tensor([-1.0, 0.0, 0.3])
    hi = torch.tensor([0.5, 0.2, 0.3])
    for seed in range(20):
        wc, wr = window.sample_windows(target, torch.Generator().manual_seed(seed))
        assert wc.shape == wr.shape == (3,)
        assert torch.all(wc >= lo - 1e-6) and torch.all(wc <= hi + 1e-6)
        assert torch.all(wr[:2] >= 0.1 * (hi - lo)[:2] - 1e-6) and torch.all(wr[:2] <= (hi - lo)[:2] / 2 + 1e-6)
        assert wr[2] > 0  # constant volume: tiny but positive width
    first = window.sample_windows(target, torch.Generator().manual_seed(7))
    second = window.sample_windows(target, torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, second)
    assert torch.isfinite(window(target, *first)).all()


def test_hdr_window_bad_arguments() -> None:
    with pytest.raises(GuideGenInputError, match="min_scale"):
        HDRWindow(k_init=0.4, min_scale=0.5)
    with pytest.raises(GuideGenInputError, match="min_width_fraction"):
        HDRWindow(min_width_fraction=0.7)
    with pytest.raises(GuideGenInputError, match="wc"):
        HDRWindow()(torch.zeros(3, 1, 4), torch.zeros(2), torch.ones(3))


# --------------------------------------------------------------------------------------------------- perceptual


# every test of this module fails loudly if it tries to download weights or reach the network
pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def fake_vgg16_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in torchvision's vgg16-397923af.pth layout (random weights; classifier trimmed to stay small)."""
    import torchvision

    state = torchvision.models.vgg16(weights=None).state_dict()
    kept = {key: value for key, value in state.items() if key.startswith("features.")}
    kept["classifier.6.bias"] = state["classifier.6.bias"]  # classifier keys must be ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(kept, path)
    return path


@pytest.fixture(scope="module")
def perceptual(fake_vgg16_file: Path) -> SlicePerceptualLoss:
    return SlicePerceptualLoss(str(fake_vgg16_file))


def test_perceptual_loads_trunk(perceptual: SlicePerceptualLoss, fake_vgg16_file: Path) -> None:
    assert perceptual.is_pretrained
    saved = torch.load(fake_vgg16_file, weights_only=True)
    torch.testing.assert_close(getattr(perceptual.lpips.net.slice5, "28").weight, saved["features.28.weight"])
    torch.testing.assert_close(getattr(perceptual.lpips.net.slice1, "0").bias, saved["features.0.bias"])
    # lpips loads its calibrated linear layers with strict=False; check they really came from its package.
    import lpips

    packaged_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    packaged = torch.load(packaged_file, map_location="cpu", weights_only=True)
    for key, value in packaged.items():
        torch.testing.assert_close(perceptual.lpips.state_dict()[key], value)


def test_perceptual_values(perceptual: SlicePerceptualLoss) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 32, 24, generator=generator) * 2 - 1
    b = torch.rand(2, 1, 32, 24, generator=generator) * 2 - 1
    assert perceptual(a, a).item() <= 1e-6
    assert perceptual(a, b).item() > 0
    recon = b.clone().requires_grad_(True)
    perceptual(recon, a).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    with pytest.raises(GuideGenInputError, match="too small"):
        perceptual(a[..., :8, :8], b[..., :8, :8])


def test_perceptual_loss_reaches_hdr_offset(perceptual: SlicePerceptualLoss) -> None:
    """LPIPS is not shift-invariant, so the HDR window's b learns through it (it cancels in the L1 term)."""
    window = HDRWindow()
    generator = torch.Generator().manual_seed(3)
    target = torch.rand(1, 1, 16, 16, 16, generator=generator) * 2 - 1
    recon = target + 0.2 * torch.randn(target.shape, generator=generator)
    wc, wr = window.sample_windows(target, generator)
    real_frames, fake_frames = sample_frames([window(target, wc, wr), window(recon, wc, wr)], 2, generator)
    sum(perceptual(f, r) for f, r in zip(fake_frames, real_frames)).backward()
    assert window.b.grad is not None and window.b.grad.abs().item() > 0
    assert window.raw_k.grad is not None and window.raw_k.grad.abs().item() > 0


def test_perceptual_is_frozen(perceptual: SlicePerceptualLoss) -> None:
    assert all(not p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.training
    assert all(not m.training for m in perceptual.modules())


def test_perceptual_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(GuideGenInputError) as info:
        SlicePerceptualLoss(str(missing))
    assert str(missing) in str(info.value) and "perceptual_weight" in str(info.value)
    with pytest.raises(GuideGenInputError, match="perceptual_weight"):
        SlicePerceptualLoss(None)


def test_perceptual_wrong_architecture(tmp_path: Path) -> None:
    import torchvision

    # VGG-11's feature layers (building only them skips the 100M-parameter classifier).
    vgg11_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])
    vgg11 = {f"features.{key}": value for key, value in vgg11_features.state_dict().items()}
    path = tmp_path / "vgg11.pth"
    torch.save(vgg11, path)
    with pytest.raises(GuideGenInputError, match="VGG-16"):
        SlicePerceptualLoss(str(path))

    resnet = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet, path)
    with pytest.raises(GuideGenInputError, match=r"vgg16-397923af\.pth"):
        SlicePerceptualLoss(str(path))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(GuideGenInputError, match="cannot read"):
        SlicePerceptualLoss(str(garbage))


def test_perceptual_shape_mismatch_in_weights(tmp_path: Path, fake_vgg16_file: Path) -> None:
    state = torch.load(fake_vgg16_file, weights_only=True)
    state["features.28.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(GuideGenInputError, match=r"features\.28\.weight"):
        SlicePerceptualLoss(str(path))


def test_perceptual_random_trunk_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="NOT LPIPS"):
        loss = SlicePerceptualLoss(str(tmp_path / "absent.pth"), allow_random_trunk=True)
    assert loss.is_pretrained is False
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    assert loss(x, x).item() <= 1e-6


def test_default_vgg_weights_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUIDEGEN_VGG16_WEIGHTS", "/somewhere/vgg.pth")
    assert default_vgg_weights_path() == "/somewhere/vgg.pth"
    monkeypatch.delenv("GUIDEGEN_VGG16_WEIGHTS")
    assert default_vgg_weights_path().endswith(str(Path(".cache") / "guidegen" / "vgg16-397923af.pth"))


# --------------------------------------------------------------------------------------------------- frames, KL


def test_sample_frames_shapes_and_alignment() -> None:
    x = torch.randn(2, 1, 5, 6, 7)
    real, doubled, same = sample_frames([x, 2 * x, x.clone()], num_frames=3, generator=torch.Generator().manual_seed(1))
    assert [tuple(f.shape) for f in real] == [(6, 1, 6, 7), (6, 1, 5, 7), (6, 1, 5, 6)]
    for a, b, c in zip(real, doubled, same):
        torch.testing.assert_close(b, 2 * a)
        torch.testing.assert_close(c, a)
    # num_frames larger than an axis: capped, every slice taken once.
    frames = sample_frames([x], num_frames=6)[0]
    assert [f.shape[0] for f in frames] == [2 * 5, 2 * 6, 2 * 6]


def test_sample_frames_picks_slices_and_is_deterministic() -> None:
    # Voxel values encode their D index, so each frame of axis 0 must be constant and distinct.
    x = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(1, 1, 8, 4, 4).contiguous()
    first = sample_frames([x], 3, torch.Generator().manual_seed(5))[0]
    second = sample_frames([x], 3, torch.Generator().manual_seed(5))[0]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    picked = first[0].flatten(1)
    assert torch.all(picked == picked[:, :1])
    assert len(set(picked[:, 0].tolist())) == 3


def test_sample_frames_errors() -> None:
    with pytest.raises(GuideGenInputError, match="same shape"):
        sample_frames([torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5)], 2)
    with pytest.raises(GuideGenInputError, match="num_frames"):
        sample_frames([torch.zeros(1, 1, 4, 4, 4)], 0)
    with pytest.raises(GuideGenInputError, match=r"\(B, C, D, H, W\)"):
        sample_frames([torch.zeros(1, 4, 4, 4)], 2)


def test_kl_divergence() -> None:
    mu, sigma = torch.zeros(3, 4, 2, 2, 2), torch.ones(3, 4, 2, 2, 2)
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(mu + 0.5, sigma).item() == pytest.approx(0.5 * 0.25 * 32)
    assert kl_divergence(mu, sigma * 2).item() > 0
    with pytest.raises(GuideGenInputError, match="z_sigma"):
        kl_divergence(mu, sigma[:, :2])


# --------------------------------------------------------------------------------------------------- adversarial


def test_discriminator_output_shapes() -> None:
    assert discriminator_min_size(2) == 12 and discriminator_min_size(3) == 24
    frame = build_frame_discriminator(channels=8, num_layers_d=2)
    volume = build_volume_discriminator(channels=8, num_layers_d=2)
    assert frame(torch.randn(2, 1, 16, 16))[-1].shape == (2, 1, 2, 2)
    assert volume(torch.randn(1, 1, 16, 16, 16))[-1].shape == (1, 1, 2, 2, 2)
    deep = build_frame_discriminator(channels=8, num_layers_d=3)
    assert deep(torch.randn(2, 1, 24, 24))[-1].shape == (2, 1, 1, 1)
    with pytest.raises(GuideGenInputError, match="at least 24"):
        AdversarialTerms(volume_weight=0).generator_loss(deep, None, [torch.randn(2, 1, 16, 16)], torch.zeros(1))


def test_adversarial_losses() -> None:
    frame_disc = build_frame_discriminator(channels=8, num_layers_d=2)
    volume_disc = build_volume_discriminator(channels=8, num_layers_d=2)
    terms = AdversarialTerms()
    real = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    fake = (torch.rand(1, 1, 16, 16, 16) * 2 - 1).requires_grad_(True)
    real_frames, fake_frames = sample_frames([real, fake], 2, torch.Generator().manual_seed(0))

    g_loss = terms.generator_loss(frame_disc, volume_disc, fake_frames, fake)
    assert g_loss.ndim == 0 and torch.isfinite(g_loss)
    g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0

    fake.grad = None
    frame_disc.zero_grad()
    d_loss = terms.discriminator_loss(frame_disc, volume_disc, real_frames, fake_frames, real, fake)
    assert d_loss.ndim == 0 and torch.isfinite(d_loss)
    d_loss.backward()
    assert fake.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in frame_disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in volume_disc.parameters())


def test_adversarial_terms_arguments() -> None:
    with pytest.raises(GuideGenInputError, match="weights"):
        AdversarialTerms(frame_weight=0, volume_weight=0)
    with pytest.raises(GuideGenInputError, match="no discriminator"):
        AdversarialTerms().generator_loss(None, None, [torch.zeros(1, 1, 16, 16)], torch.zeros(1, 1, 16, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdversarialTerms(criterion="hinge")


def test_clinical_window_l1_formula_and_windows() -> None:
    from custom_components.data.intensity import CT_WINDOWS, hu_to_unit
    from custom_components.losses import clinical_window_l1

    target = hu_to_unit(torch.tensor([-1000.0, -500.0, 40.0, 700.0, 2500.0]).reshape(1, 1, 5))
    assert clinical_window_l1(target, target) == 0
    # +20 HU at 40 HU lies inside all three windows: 2 * mean|d| / width per window, added up.
    shifted = hu_to_unit(torch.tensor([-1000.0, -500.0, 60.0, 700.0, 2500.0]).reshape(1, 1, 5))
    expected = sum(2 * (20 / 5) / (high - low) for low, high in CT_WINDOWS.values())
    assert float(clinical_window_l1(shifted, target)) == pytest.approx(expected, rel=1e-3)
    # A change above every window (2500 -> 3000 HU) is not seen, one inside only the lung window is seen by it alone.
    above = hu_to_unit(torch.tensor([-1000.0, -500.0, 40.0, 700.0, 3000.0]).reshape(1, 1, 5))
    assert float(clinical_window_l1(above, target)) == 0
    lung_only = hu_to_unit(torch.tensor([-900.0, -500.0, 40.0, 700.0, 2500.0]).reshape(1, 1, 5))
    assert float(clinical_window_l1(lung_only, target)) == pytest.approx(2 * (100 / 5) / 1200, rel=1e-3)
    with pytest.raises(GuideGenInputError, match="shape"):
        clinical_window_l1(target, target[..., :4])
    with pytest.raises(GuideGenInputError, match="lo < hi"):
        clinical_window_l1(target, target, {"bad": (100.0, 100.0)})


def test_autoencoder_loss_is_eq8_with_its_weights() -> None:
    """Without the window (hdr=False) Eq. 8 is the plain L1 plus kl_weight times the KL; the full-range term adds on."""
    from custom_components.losses import AutoencoderLoss, HDRWindow, kl_divergence

    torch.manual_seed(0)
    image, reconstruction = torch.rand(2, 1, 8, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8, 8) * 2 - 1
    z_mu, z_sigma = torch.randn(2, 4, 2, 2, 2), torch.rand(2, 4, 2, 2, 2) + 0.5
    plain = AutoencoderLoss(HDRWindow(), hdr=False, perceptual_weight=0.0, kl_weight=0.25)
    terms = plain(image, reconstruction, z_mu, z_sigma)
    l1 = (reconstruction - image).abs().mean()
    torch.testing.assert_close(terms.reconstruction, l1)
    torch.testing.assert_close(terms.loss, l1 + 0.25 * kl_divergence(z_mu, z_sigma))
    extra = AutoencoderLoss(HDRWindow(), hdr=False, perceptual_weight=0.0, kl_weight=0.25, full_range_weight=2.0)
    torch.testing.assert_close(extra(image, reconstruction, z_mu, z_sigma).reconstruction, 3 * l1)


@pytest.mark.parametrize("kwargs, message", [
    ({"windows": "lung"}, "is not one of"), ({"kl_weight": -1.0, "perceptual_weight": 0.0}, "must be >= 0"),
    ({"perceptual_weight": 1.0}, "needs a perceptual_loss"), ({"num_frames": 0, "perceptual_weight": 0.0}, "num_frames"),
])  # fmt: skip
def test_autoencoder_loss_refuses_bad_settings(kwargs, message) -> None:
    from custom_components.errors import GuideGenInputError
    from custom_components.losses import AutoencoderLoss, HDRWindow

    with pytest.raises(GuideGenInputError, match=message):
        AutoencoderLoss(HDRWindow(), **kwargs)
