"""The per-iteration lr schedules: the cosine curve's ends, pickling for checkpoints, resuming, bad names."""

import io

import pytest
import torch

from custom_components.engines import LR_SCHEDULES, build_lr_scheduler


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def _lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_constant_keeps_the_lr_and_cosine_decays_to_zero():
    assert _lrs(build_lr_scheduler(_optimizer(), "constant", 10), 11) == [1e-3] * 11
    cosine = _lrs(build_lr_scheduler(_optimizer(), "cosine", 10), 11)
    assert cosine[0] == pytest.approx(1e-3)
    assert cosine[5] == pytest.approx(0.5e-3)
    assert cosine[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine[:10], cosine[1:11]))
    # past the end it stays at zero rather than climbing back up the cosine
    assert LR_SCHEDULES["cosine"](15, 10) == pytest.approx(0.0, abs=1e-12)


def test_a_resumed_scheduler_continues_the_same_curve():
    scheduler = build_lr_scheduler(_optimizer(), "cosine", 20)
    _lrs(scheduler, 7)
    buffer = io.BytesIO()
    # as the training checkpoint keeps them: the optimizer (its current lr) and the scheduler (a lambda would not pickle)
    torch.save({"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    optimizer = _optimizer()
    resumed = build_lr_scheduler(optimizer, "cosine", 20)
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert _lrs(resumed, 5) == pytest.approx(_lrs(scheduler, 5))


@pytest.mark.parametrize("schedule, steps, message", [("linear", 10, "not one of"), ("cosine", 0, ">= 1")])
def test_bad_schedule_settings_are_named(schedule, steps, message):
    with pytest.raises(ValueError, match=message):
        build_lr_scheduler(_optimizer(), schedule, steps)
