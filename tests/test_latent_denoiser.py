"""LatentDenoiser (paper Eq. 10-11) and LatentDiffusionSampler: mask conditioning, per-sample prompt dropout,
input errors, learning on a fixed batch, DDIM(eta=1) = DDPM ancestral sampling, classifier-free guidance.

Tiny configuration (4 × 8³ latents, 16³ masks, U-Net widths 8/16) so the file runs in seconds on a busy CPU.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from custom_components.errors import GuideGenInputError
from custom_components.networks import LatentDenoiser, MaskEncoder, build_latent_denoiser, build_text_conditioned_unet
from custom_components.pipelines import LatentDiffusionSampler

LATENT_CHANNELS, NUM_CLASSES, TEXT_DIM = 4, 5, 32
LATENT_SIZE, MASK_SIZE = (8, 8, 8), (16, 16, 16)
TINY: dict[str, Any] = dict(
    channels=(8, 16),
    num_res_blocks=1,
    cross_attention_levels=(False, True),
    self_attention_levels=(False, True),
    num_head_channels=8,
    norm_num_groups=4,
    num_queries=4,
    injection_dim=16,
    injection_layers=1,
    injection_heads=2,
)


def randomize_zero_init(net: nn.Module, seed: int = 1) -> nn.Module:
    """Random values for the zero-initialised weights (output conv, cross-attention projections), as in
    tests/test_unet.py: a fresh network predicts 0 and ignores the prompt, which would hide conditioning bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def tiny_denoiser(mask_encoding: str = "onehot", randomize: bool = True) -> LatentDenoiser:
    torch.manual_seed(0)
    net = build_latent_denoiser(
        LATENT_CHANNELS, NUM_CLASSES, TEXT_DIM, mask_encoding=mask_encoding, mask_factor=2, mask_embed_channels=6,
        **TINY,
    )
    return (randomize_zero_init(net) if randomize else net).eval()


def batch_inputs(batch: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, LATENT_CHANNELS, *LATENT_SIZE, generator=gen)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen)
    mask = torch.randint(0, NUM_CLASSES, (batch, 1, *MASK_SIZE), generator=gen)
    features = torch.randn(batch, 5, TEXT_DIM, generator=gen)
    text_mask = torch.ones(batch, 5, dtype=torch.bool)
    text_mask[:, -2:] = False  # padding tokens
    return z_t, timesteps, mask, features, text_mask


def fake_text_encoder(prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Deterministic per-prompt token features (a stand-in for the BERT encoder)."""
    feats = [torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
    text_mask = torch.ones(len(prompts), 5, dtype=torch.bool)
    text_mask[:, -1] = False
    return torch.stack(feats), text_mask


# --------------------------------------------------------------------------------------------- conditioning


def test_onehot_condition_is_subsampled_one_hot() -> None:
    net = tiny_denoiser("onehot")
    _, _, mask, _, _ = batch_inputs()
    cond = net.mask_condition(mask, LATENT_SIZE)
    assert net.cond_channels == NUM_CLASSES
    assert cond.shape == (2, NUM_CLASSES, *LATENT_SIZE)
    expected = F.one_hot(mask[:, 0, ::2, ::2, ::2], NUM_CLASSES).movedim(-1, 1).float()
    assert torch.equal(cond, expected)


def test_fractions_condition_is_class_share_per_latent_voxel() -> None:
    net = tiny_denoiser("fractions")
    assert net.cond_channels == NUM_CLASSES and net.mask_encoder is None
    mask = torch.zeros(1, 1, *MASK_SIZE, dtype=torch.long)
    mask[0, 0, 0, 0, 0] = 3  # the voxel subsampling keeps: onehot calls the whole latent voxel class 3
    mask[0, 0, 1, 1, 1] = 4
    mask[0, 0, 2:4, 2:4, 2:4] = 2  # a whole latent voxel of class 2
    cond = net.mask_condition(mask, LATENT_SIZE)
    assert cond.shape == (1, NUM_CLASSES, *LATENT_SIZE)
    torch.testing.assert_close(cond[0, :, 0, 0, 0], torch.tensor([6 / 8, 0.0, 0.0, 1 / 8, 1 / 8]))
    torch.testing.assert_close(cond[0, :, 1, 1, 1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(cond.sum(1), torch.ones(1, *LATENT_SIZE))
    _, _, random_mask, _, _ = batch_inputs()
    expected = F.avg_pool3d(F.one_hot(random_mask[:, 0], NUM_CLASSES).movedim(-1, 1).float(), 2)
    torch.testing.assert_close(net.mask_condition(random_mask, LATENT_SIZE), expected)


def test_fractions_at_mask_factor_one_is_onehot() -> None:
    kwargs = dict(mask_factor=1, **TINY)
    fractions = build_latent_denoiser(LATENT_CHANNELS, NUM_CLASSES, TEXT_DIM, mask_encoding="fractions", **kwargs)
    onehot = build_latent_denoiser(LATENT_CHANNELS, NUM_CLASSES, TEXT_DIM, mask_encoding="onehot", **kwargs)
    mask = torch.randint(0, NUM_CLASSES, (2, 1, *LATENT_SIZE), generator=torch.Generator().manual_seed(3))
    assert torch.equal(fractions.mask_condition(mask, LATENT_SIZE), onehot.mask_condition(mask, LATENT_SIZE))


def test_fractions_refuses_a_mask_encoder() -> None:
    unet = build_text_conditioned_unet(LATENT_CHANNELS + NUM_CLASSES, LATENT_CHANNELS, TEXT_DIM, **TINY)
    with pytest.raises(GuideGenInputError, match="mask_encoding='fractions'.*mask_encoding='learned'"):
        LatentDenoiser(unet, LATENT_CHANNELS, NUM_CLASSES, "fractions", 2, MaskEncoder(NUM_CLASSES, downsample=2))


def test_learned_condition_shape() -> None:
    net = tiny_denoiser("learned")
    _, _, mask, _, _ = batch_inputs()
    assert isinstance(net.mask_encoder, MaskEncoder) and net.cond_channels == 6
    assert net.mask_condition(mask, LATENT_SIZE).shape == (2, 6, *LATENT_SIZE)
    assert net.denoiser.unet.in_channels == LATENT_CHANNELS + 6


@pytest.mark.parametrize("downsample, size", [(1, 8), (2, 8), (4, 16)])
def test_mask_encoder_downsamples(downsample: int, size: int) -> None:
    enc = MaskEncoder(3, out_channels=5, downsample=downsample, hidden_channels=4)
    assert enc(torch.rand(1, 3, size, size, size)).shape == (1, 5, *(size // downsample,) * 3)


@pytest.mark.parametrize("mask_encoding", ["onehot", "fractions", "learned"])
def test_output_shape(mask_encoding: str) -> None:
    net = tiny_denoiser(mask_encoding)
    z_t, t, mask, feats, tmask = batch_inputs()
    with torch.no_grad():
        out = net(z_t, t, mask, feats, tmask)
        assert out.shape == z_t.shape and torch.isfinite(out).all()
        assert net(z_t, t, mask).shape == z_t.shape  # unconditional
        # The mask reaches the output.
        assert not torch.allclose(net(z_t, t, (mask + 1) % NUM_CLASSES, feats, tmask), out)


def test_text_keep_drops_prompt_per_sample() -> None:
    net = tiny_denoiser()
    z_t, t, mask, feats, tmask = batch_inputs()
    with torch.no_grad():
        cond = net(z_t, t, mask, feats, tmask)
        uncond = net(z_t, t, mask, None)
        assert not torch.allclose(cond, uncond, atol=1e-4), "the prompt must reach the output for this test"
        none_kept = net(z_t, t, mask, feats, tmask, text_keep=torch.zeros(2, dtype=torch.bool))
        assert torch.equal(none_kept, uncond)  # zeroed contexts are exactly the null prompt
        all_kept = net(z_t, t, mask, feats, tmask, text_keep=torch.ones(2, dtype=torch.bool))
        torch.testing.assert_close(all_kept, cond)
        mixed = net(z_t, t, mask, feats, tmask, text_keep=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], cond[0])
    torch.testing.assert_close(mixed[1], uncond[1])


# --------------------------------------------------------------------------------------------- bad input


def test_mask_size_must_match_latent_grid() -> None:
    net = tiny_denoiser()
    z_t, t, _, _, _ = batch_inputs()
    with pytest.raises(GuideGenInputError, match=r"does not match the latent grid .*mask_factor=2.*resample"):
        net(z_t, t, torch.zeros(2, 1, 12, 12, 12, dtype=torch.long))


def test_mask_values_must_fit_class_map() -> None:
    net = tiny_denoiser()
    z_t, t, mask, _, _ = batch_inputs()
    mask[0, 0, 0, 0, 0] = NUM_CLASSES + 2
    with pytest.raises(GuideGenInputError, match=rf"max value {NUM_CLASSES + 2}.*num_classes={NUM_CLASSES}"):
        net(z_t, t, mask)
    with pytest.raises(GuideGenInputError, match="integer class indices"):
        net(z_t, t, torch.zeros(2, 1, *MASK_SIZE))


def test_batch_and_text_keep_errors() -> None:
    net = tiny_denoiser()
    z_t, t, mask, feats, tmask = batch_inputs()
    with pytest.raises(GuideGenInputError, match="batch size 1"):
        net(z_t, t, mask[:1])
    with pytest.raises(GuideGenInputError, match="text_keep"):
        net(z_t, t, mask, feats, tmask, text_keep=torch.ones(3, dtype=torch.bool))


def test_wrong_unet_channels_at_construction() -> None:
    unet = build_text_conditioned_unet(LATENT_CHANNELS + 3, LATENT_CHANNELS, TEXT_DIM, **TINY)
    with pytest.raises(GuideGenInputError, match=rf"in_channels = latent_channels \+ cond_channels = 4 \+ 5 = 9"):
        LatentDenoiser(unet, LATENT_CHANNELS, NUM_CLASSES)
    with pytest.raises(GuideGenInputError, match="power of two"):
        MaskEncoder(NUM_CLASSES, downsample=3)
    with pytest.raises(GuideGenInputError, match="unknown latent-denoiser architecture keys"):
        build_latent_denoiser(LATENT_CHANNELS, NUM_CLASSES, TEXT_DIM, width=3)


# --------------------------------------------------------------------------------------------- learning


def test_loss_decreases_on_fixed_batch() -> None:
    """Eq. 11: fit ε on one fixed (z_0, mask, prompt, t, ε) batch."""
    net = tiny_denoiser(randomize=False).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, LATENT_CHANNELS, *LATENT_SIZE, generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    timesteps = torch.tensor([150, 600])
    _, _, mask, feats, tmask = batch_inputs()
    z_t = scheduler.add_noise(z0, noise, timesteps)
    keep = torch.tensor([True, False])  # one conditional, one null-prompt sample, as in CFG training
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(net(z_t, timesteps, mask, feats, tmask, text_keep=keep), noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------------------------- samplers


class GaussianOracle(nn.Module):
    """Exact ε-prediction for unit-Gaussian data, ``ε(z_t, t) = √(1−ᾱ_t)·z_t``: a fixed toy denoiser.

    Unlike a constant ``ε = c·z_t`` it keeps ``x̂_0 = √ᾱ_t·z_t`` and every step O(1), so float32 comparisons stay
    meaningful (``ε = 0.3·z_t`` gives ``x̂_0 ≈ z_t / √ᾱ_T`` ≈ 1000·z_t at the first step of a cosine schedule).
    """

    mask_factor = 2

    def __init__(self, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, z_t: Tensor, timesteps: Tensor, mask: Tensor, text_features: Tensor | None = None,
                text_mask: Tensor | None = None, text_keep: Tensor | None = None) -> Tensor:
        scale = (1 - self.alphas_cumprod[timesteps.cpu()]).sqrt().to(z_t)
        return scale.view(-1, 1, 1, 1, 1) * z_t


def _float64_cosine(scheduler: DDPMScheduler | DDIMScheduler) -> None:
    """Rebuild MONAI's cosine schedule in float64 (same formula), to separate maths from float32 rounding."""
    n = scheduler.num_train_timesteps
    x = torch.linspace(0, n, n + 1, dtype=torch.float64)
    cumprod = torch.cos((x / n + 8e-3) / (1 + 8e-3) * torch.pi * 0.5) ** 2
    betas = (1 - (cumprod[1:] / cumprod[:-1])).clip(0.0, 0.999)
    scheduler.betas, scheduler.alphas = betas, 1 - betas
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, dim=0)


def _toy_schedulers(num_train_timesteps: int = 50) -> tuple[DDIMScheduler, DDPMScheduler]:
    kwargs: dict[str, Any] = dict(num_train_timesteps=num_train_timesteps, schedule="cosine", clip_sample=False)
    return DDIMScheduler(**kwargs), DDPMScheduler(**kwargs)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_ddim_eta_one_mean_is_ddpm_posterior_mean(precision: str) -> None:
    """At every step, DDIM(η=1)'s mean equals μ̃(z_t, x̂_0) of DDPM and both add σ_t·n with the same n.

    MONAI stores the schedule in float32 and DDIM derives β_t as 1 − ᾱ_t/ᾱ_{t−1} whereas DDPM reads β_t: near
    t = 0 (β_t ~ 1e-3) the two differ in the last float32 digits, which leaves ~1e-5 between the means for O(1)
    latents. In float64 the two agree to rounding, showing the identity itself is exact.
    """
    ddim, ddpm = _toy_schedulers()
    dtype = torch.float32
    if precision == "float64":
        _float64_cosine(ddim)
        _float64_cosine(ddpm)
        dtype = torch.float64
    tol = 1e-5 if precision == "float32" else 1e-10
    total = ddpm.num_train_timesteps
    ddim.set_timesteps(total)
    ddpm.set_timesteps(total)
    # With num_inference_steps = T both visit T-1, ..., 0 and DDIM's previous step is t - T // T = t - 1.
    assert torch.equal(ddim.timesteps, torch.arange(total - 1, -1, -1)) and torch.equal(ddim.timesteps, ddpm.timesteps)

    oracle = GaussianOracle(ddpm.alphas_cumprod)
    ac, betas = ddpm.alphas_cumprod, ddpm.betas
    z = torch.randn(2, LATENT_CHANNELS, *LATENT_SIZE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for t in range(total - 1, -1, -1):
        eps = oracle(z, torch.tensor([t, t]), z)
        ddim_out, ddim_x0 = ddim.step(eps, t, z, eta=1.0, generator=torch.Generator().manual_seed(t))
        ddpm_out, ddpm_x0 = ddpm.step(eps, t, z, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t), dtype=dtype)
        prev = ac[t - 1] if t > 0 else torch.tensor(1.0, dtype=ac.dtype)
        sigma = ((1 - prev) / (1 - ac[t]) * betas[t]).sqrt()  # β̃_t: DDPM "fixed_small" = DDIM σ_t(η=1)
        mu = (prev.sqrt() * betas[t] / (1 - ac[t])) * ddpm_x0 + (ddpm.alphas[t].sqrt() * (1 - prev) / (1 - ac[t])) * z
        assert torch.equal(ddim_x0, ddpm_x0)
        torch.testing.assert_close(ddpm_out - sigma * noise, mu, rtol=0, atol=tol)  # DDPM: μ̃ + σ n
        torch.testing.assert_close(ddim_out - sigma * noise, mu, rtol=0, atol=tol)  # DDIM η=1: same mean and draw
        z = ddpm_out


def test_ddim_eta_one_full_path_equals_ddpm_ancestral() -> None:
    """Both schedulers draw torch.randn(shape, generator) once per step in the same order (DDIM also draws at
    t = 0, times a zero variance, after the last use), so equal seeds give the same trajectory."""
    ddim, ddpm = _toy_schedulers()
    oracle = GaussianOracle(ddpm.alphas_cumprod)
    masks = torch.zeros(2, 1, *MASK_SIZE, dtype=torch.long)
    by_ddim = LatentDiffusionSampler(oracle, ddim, fake_text_encoder, LATENT_CHANNELS)(
        masks, None, num_inference_steps=50, eta=1.0, seed=3, progress=False
    )
    by_ddpm = LatentDiffusionSampler(oracle, ddpm, fake_text_encoder, LATENT_CHANNELS)(
        masks, None, num_inference_steps=50, seed=3, progress=False
    )
    assert by_ddim.shape == (2, LATENT_CHANNELS, *LATENT_SIZE)
    torch.testing.assert_close(by_ddim, by_ddpm, rtol=0, atol=1e-4)
    # The two runs really are stochastic: another seed moves the result.
    other = LatentDiffusionSampler(oracle, ddpm, fake_text_encoder, LATENT_CHANNELS)(
        masks, None, num_inference_steps=50, seed=4, progress=False
    )
    assert not torch.allclose(other, by_ddpm, atol=1e-2)


def test_ddim_eta_zero_few_steps_is_deterministic() -> None:
    ddim, ddpm = _toy_schedulers()
    sampler = LatentDiffusionSampler(GaussianOracle(ddpm.alphas_cumprod), ddim, fake_text_encoder, LATENT_CHANNELS)
    masks = torch.zeros(1, 1, *MASK_SIZE, dtype=torch.long)
    first = sampler(masks, None, num_inference_steps=10, seed=7, progress=False)
    assert torch.isfinite(first).all()
    assert torch.equal(first, sampler(masks, None, num_inference_steps=10, seed=7, progress=False))
    # Given noise replaces the seeded draw; η = 0 then ignores the generator altogether.
    noise = torch.randn(first.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, sampler(masks, None, num_inference_steps=10, seed=None, noise=noise, progress=False))


def test_ddpm_refuses_strided_sampling() -> None:
    _, ddpm = _toy_schedulers()
    sampler = LatentDiffusionSampler(GaussianOracle(ddpm.alphas_cumprod), ddpm, fake_text_encoder, LATENT_CHANNELS)
    with pytest.raises(GuideGenInputError, match="DDPMScheduler cannot skip steps"):
        sampler(torch.zeros(1, 1, *MASK_SIZE, dtype=torch.long), None, num_inference_steps=10, progress=False)


def _tiny_sampler() -> LatentDiffusionSampler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    return LatentDiffusionSampler(tiny_denoiser(), scheduler, fake_text_encoder, LATENT_CHANNELS)


def test_guidance_scale_one_is_unguided_and_seeds() -> None:
    sampler = _tiny_sampler()
    _, _, masks, _, _ = batch_inputs()
    prompts = ["a liver tumor", "a healthy patient"]
    kwargs: dict[str, Any] = dict(num_inference_steps=3, progress=False)
    plain = sampler(masks, prompts, guidance_scale=1.0, seed=0, **kwargs)

    # The unguided reference loop: one conditional pass per step, nothing else.
    scheduler, net = sampler.scheduler, sampler.network
    feats, tmask = fake_text_encoder(prompts)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(plain.shape, generator=generator)
    scheduler.set_timesteps(3)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = net(z, torch.full((2,), int(t)), masks, feats, tmask)
            z, _ = scheduler.step(eps, int(t), z, eta=0.0, generator=generator)
    assert torch.equal(plain, z)

    guided = sampler(masks, prompts, guidance_scale=3.0, seed=0, **kwargs)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-4)
    assert torch.equal(guided, sampler(masks, prompts, guidance_scale=3.0, seed=0, **kwargs))
    assert not torch.allclose(sampler(masks, prompts, guidance_scale=3.0, seed=1, **kwargs), guided, atol=1e-3)
    # s = 0 is the unconditional model (batched null pass vs a separate one: equal up to rounding, which three DDIM
    # steps from t ~ T amplify by 1/sqrt(alpha_bar_t) through the x_0 estimate: hence the relative tolerance).
    torch.testing.assert_close(
        sampler(masks, prompts, guidance_scale=0.0, seed=0, **kwargs), sampler(masks, None, seed=0, **kwargs), rtol=1e-2, atol=1e-3
    )


def test_sampler_input_errors() -> None:
    sampler = _tiny_sampler()
    masks = torch.zeros(2, 1, *MASK_SIZE, dtype=torch.long)
    kwargs: dict[str, Any] = dict(num_inference_steps=2, progress=False)
    with pytest.raises(GuideGenInputError, match="empty prompt list"):
        sampler(masks, [], **kwargs)
    with pytest.raises(GuideGenInputError, match="1 prompts for 2 masks"):
        sampler(masks, ["one"], **kwargs)
    with pytest.raises(GuideGenInputError, match="guidance_scale must be >= 0"):
        sampler(masks, ["a", "b"], guidance_scale=-1.0, **kwargs)
    with pytest.raises(GuideGenInputError, match="not divisible by the model's mask_factor=2"):
        sampler(torch.zeros(2, 1, 15, 16, 16, dtype=torch.long), None, **kwargs)
    with pytest.raises(GuideGenInputError, match="noise has shape"):
        sampler(masks, None, noise=torch.zeros(2, LATENT_CHANNELS, 4, 4, 4), **kwargs)
