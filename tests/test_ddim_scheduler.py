"""Our LeadingDDIMScheduler (custom_components/schedulers/ddim.py): every step lands on the next listed timestep, so
sampling with the true noise returns the clean sample (with MONAI's layout it does not), in the scheduler alone and in
the latent generator's sampling loop, which the LDM bundle builds with it; with n = T it is MONAI's DDIM."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from custom_components.schedulers import LeadingDDIMScheduler


@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_each_step_jumps_to_the_next_listed_timestep(steps: int) -> None:
    scheduler = LeadingDDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    ratio = 1000 // steps
    assert len(timesteps) == steps and timesteps == sorted(timesteps, reverse=True)
    assert timesteps[0] == (steps - 1) * ratio and timesteps[-1] == 0
    # DDIM's step goes from t to t - T // n: that must be the next entry, and the last one must reach t < 0 (clean).
    assert all(a - ratio == b for a, b in zip(timesteps, timesteps[1:]))
    assert timesteps[-1] - ratio < 0


def test_monai_layout_disagrees_with_its_step_rule_and_ours_does_not() -> None:
    monai_scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    monai_scheduler.set_timesteps(50)
    listed = monai_scheduler.timesteps.tolist()
    assert any(a - 20 != b for a, b in zip(listed, listed[1:]))  # the mismatch this class removes


def test_full_length_schedule_equals_monai_and_steps_agree() -> None:
    ours = LeadingDDIMScheduler(num_train_timesteps=50, schedule="cosine", clip_sample=False)
    theirs = DDIMScheduler(num_train_timesteps=50, schedule="cosine", clip_sample=False)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    sample, output = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 4, 4, 4)
    a, _ = ours.step(output, int(ours.timesteps[3]), sample)
    b, _ = theirs.step(output, int(theirs.timesteps[3]), sample)
    assert torch.equal(a, b)


def test_bad_step_counts_are_refused() -> None:
    scheduler = LeadingDDIMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError):
        scheduler.set_timesteps(101)


def test_first_step_avoids_the_vanishing_signal_level() -> None:
    scheduler = LeadingDDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    scheduler.set_timesteps(50)
    first = int(scheduler.timesteps[0])
    assert first == 980 and float(scheduler.alphas_cumprod[first]) > 1e-4 > float(scheduler.alphas_cumprod[999])


# ----------------------------------------------------------------------------------- sampling with our scheduler
# With the true noise as the prediction, DDIM (eta = 0) moves z_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε exactly to the same
# expression at its previous timestep, and the last step returns x_0 -- but only if every listed timestep is the one
# the previous step landed on. MONAI's own layout labels some samples with a neighbouring timestep, so the same run
# misses x_0 by far more than float rounding: these tests fail if LeadingDDIMScheduler's layout is lost.


def _sample_with_true_noise(scheduler: DDIMScheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 2, 4, 4, 4, generator=generator)
    scheduler.set_timesteps(steps)
    level = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    z = level.sqrt() * x0 + (1 - level).sqrt() * noise
    for t in scheduler.timesteps:
        z, _ = scheduler.step(noise, int(t), z)
    return z, x0


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta", "scaled_linear_beta"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 999])
def test_sampling_with_the_true_noise_returns_the_clean_sample(schedule: str, steps: int) -> None:
    scheduler = LeadingDDIMScheduler(num_train_timesteps=1000, schedule=schedule, clip_sample=False)
    z, x0 = _sample_with_true_noise(scheduler, steps)
    torch.testing.assert_close(z, x0, atol=5e-4, rtol=0)


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
@pytest.mark.parametrize("steps", [7, 50, 333])
def test_monais_layout_misses_the_clean_sample(schedule: str, steps: int) -> None:
    """The control for the test above: the same run with MONAI's timesteps does not reach x_0."""
    z, x0 = _sample_with_true_noise(DDIMScheduler(num_train_timesteps=1000, schedule=schedule, clip_sample=False), steps)
    assert float((z - x0).abs().max()) > 1e-2


def test_steps_offset_shifts_every_timestep() -> None:
    plain = LeadingDDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    shifted = LeadingDDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False, steps_offset=1)
    plain.set_timesteps(50)
    shifted.set_timesteps(50)
    assert torch.equal(shifted.timesteps, plain.timesteps + 1)
    assert shifted.timesteps.dtype == torch.long


def test_the_latent_sampler_reaches_the_clean_latent_with_our_scheduler() -> None:
    """The LDM's sampling loop (pipelines/ldm.py) driven by LeadingDDIMScheduler, with a network that predicts the
    true noise: the sampled latent is x_0 (with MONAI's layout it is not)."""
    from custom_components.pipelines.ldm import LatentDiffusionSampler

    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 3, 4, 4, 4, generator=generator)

    class TrueNoise(torch.nn.Module):
        mask_factor = 2

        def forward(self, z: torch.Tensor, t: torch.Tensor, masks: torch.Tensor, **_: object) -> torch.Tensor:
            return noise.expand_as(z)

    masks = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    results = {}
    for name, scheduler in (("ours", LeadingDDIMScheduler(1000, schedule="cosine", clip_sample=False)),
                            ("monai", DDIMScheduler(1000, schedule="cosine", clip_sample=False))):
        sampler = LatentDiffusionSampler(TrueNoise(), scheduler, text_encoder=None, latent_channels=3)
        scheduler.set_timesteps(50)
        level = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
        start = level.sqrt() * x0 + (1 - level).sqrt() * noise
        results[name] = sampler(masks, None, num_inference_steps=50, noise=start, progress=False)
    torch.testing.assert_close(results["ours"], x0, atol=5e-4, rtol=0)
    assert float((results["monai"] - x0).abs().max()) > 1e-2


def test_the_latent_generator_bundle_samples_with_our_scheduler() -> None:
    """The shipped inference config builds LeadingDDIMScheduler, so the sampler tested above is the one in use."""
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "bundles/guidegen_ldm/configs/inference.yaml").read_text())

    def targets(node: object) -> list[str]:
        if isinstance(node, dict):
            return [str(node.get("_target_", ""))] + [t for value in node.values() for t in targets(value)]
        if isinstance(node, list):
            return [t for value in node for t in targets(value)]
        return []

    schedulers = [t for t in targets(config) if "Scheduler" in t]
    assert schedulers == ["custom_components.schedulers.LeadingDDIMScheduler"], schedulers
