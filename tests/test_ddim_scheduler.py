"""LeadingDDIMScheduler: every step lands on the next listed timestep; with n = T it is MONAI's DDIM."""

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
