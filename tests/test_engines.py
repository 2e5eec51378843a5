"""The shared trainer pieces: gradient accumulation, EMA, checkpoint info, latest-checkpoint lookup."""

from __future__ import annotations

import os
import time

import pytest
import torch

from custom_components.engines import AccumulatingIteration, GuideGenTrainer, latest_checkpoint, make_ema
from custom_components.networks import CheckpointInfo
from custom_components.errors import GuideGenInputError


class _MSEIteration(AccumulatingIteration):
    def compute_loss(self, engine, batch):
        prediction = engine.network(batch["x"].to(engine.state.device))
        return torch.nn.functional.mse_loss(prediction, batch["y"]), {"sample": batch["x"][:, 0]}


def _batches():
    torch.manual_seed(0)
    return [{"x": torch.randn(2, 3), "y": torch.randn(2, 1)} for _ in range(4)]


def _train(accumulation_steps: int, ema_decay: float = 0.0):
    torch.manual_seed(1)
    network = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    steps = []
    original_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), original_step(*a, **k))[1]
    ema = make_ema(network, ema_decay)
    iteration = _MSEIteration(accumulation_steps=accumulation_steps, ema=ema)
    trainer = GuideGenTrainer("cpu", 1, _batches(), network, optimizer, iteration)
    trainer.run()
    return network, len(steps), ema, trainer


def test_accumulation_equals_one_step_on_the_mean_gradient():
    network, steps, _, trainer = _train(accumulation_steps=4)
    assert steps == 1
    torch.manual_seed(1)
    reference = torch.nn.Linear(3, 1)
    loss = sum(torch.nn.functional.mse_loss(reference(b["x"]), b["y"]) for b in _batches()) / 4
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for got, expected in zip(network.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected)
    assert isinstance(trainer.state.output, list) and "loss" in trainer.state.output[0]  # decollated for handlers


def test_no_accumulation_steps_every_iteration():
    _, steps, _, _ = _train(accumulation_steps=1)
    assert steps == 4


def test_ema_follows_the_weights():
    network, _, ema, _ = _train(accumulation_steps=1, ema_decay=0.0)
    for averaged, current in zip(ema.module.parameters(), network.parameters()):
        torch.testing.assert_close(averaged, current)  # decay 0: the latest weights
    network, _, ema, _ = _train(accumulation_steps=1, ema_decay=0.9)
    assert any(not torch.allclose(a, c) for a, c in zip(ema.module.parameters(), network.parameters()))
    with pytest.raises(GuideGenInputError, match="ema_decay"):
        make_ema(network, 1.0)


def test_bad_accumulation_steps():
    with pytest.raises(GuideGenInputError, match="accumulation_steps = 0"):
        _MSEIteration(accumulation_steps=0)


def test_checkpoint_info_checks_stage_and_classes():
    info = CheckpointInfo("tcss", 20, "guidegen_default")
    info.load_state_dict(CheckpointInfo("tcss", 20, "guidegen_default", {"mask_size": [8, 8, 8]}).state_dict())
    assert info.loaded["mask_size"] == [8, 8, 8]
    with pytest.raises(GuideGenInputError, match="belongs to the 'autoencoder' stage but it is being loaded into the 'tcss'"):
        info.load_state_dict(CheckpointInfo("autoencoder", 20).state_dict())
    with pytest.raises(GuideGenInputError, match="trained with 25 classes"):
        info.load_state_dict(CheckpointInfo("tcss", 25, "other").state_dict())
    with pytest.raises(GuideGenInputError, match="unknown stage"):
        CheckpointInfo("vae", 20)


def test_latest_checkpoint_is_the_newest_file(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for index, name in enumerate(("checkpoint_epoch=2.pt", "checkpoint_final.pt", "checkpoint_epoch=3.pt")):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(time.time_ns(), 1_000_000_000 * (index + 1)))
    (tmp_path / "model.pt").write_bytes(b"x")  # inference weights are not a training checkpoint
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=3.pt")


class _ZeroText(torch.nn.Module):
    def forward(self, prompts):
        return torch.zeros(len(prompts), 2, 4), torch.ones(len(prompts), 2, dtype=torch.bool)


class _UniformLogits(torch.nn.Module):
    """Predicts equal logits for every class whatever x_t is (a zero 1x1 convolution)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(num_classes, num_classes, 1)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x, t, text_features, text_mask):
        return self.conv(x)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_tcss_iteration_loss_and_auxiliary_cross_entropy(weight):
    import math

    from custom_components.engines import TCSSIteration
    from custom_components.schedulers import CategoricalDiffusionScheduler

    num_classes = 3
    scheduler = CategoricalDiffusionScheduler(num_train_timesteps=10, num_classes=num_classes)
    network = _UniformLogits(num_classes)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    batches = [{"label": labels, "text": ["a prompt"]}]
    losses = {}
    for w in (0.0, weight):
        torch.manual_seed(3)
        iteration = TCSSIteration(scheduler, _ZeroText(), aux_ce_weight=w)
        trainer = GuideGenTrainer("cpu", 1, batches, network, optimizer, iteration)
        trainer.run()
        losses[w] = float(trainer.state.output[0]["loss"])
    assert losses[0.0] > 0
    assert losses[weight] - losses[0.0] == pytest.approx(weight * math.log(num_classes), rel=1e-5)
    with pytest.raises(GuideGenInputError, match="labels? values? .*outside the 3 classes|aux_ce_weight"):
        TCSSIteration(scheduler, _ZeroText(), aux_ce_weight=-1)


def test_ema_warms_up_so_short_runs_do_not_sample_the_initialisation():
    torch.manual_seed(1)
    initial = [p.detach().clone() for p in torch.nn.Linear(3, 1).parameters()]
    network, _, ema, _ = _train(accumulation_steps=1, ema_decay=0.9999)
    to_final = sum((a - c).abs().sum() for a, c in zip(ema.module.parameters(), network.parameters()))
    to_initial = sum((a - i).abs().sum() for a, i in zip(ema.module.parameters(), initial))
    assert to_final < 0.5 * to_initial


class _RecordingDenoiser(torch.nn.Module):
    """Predicts zero noise and records what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, z_t, timesteps, mask, text_features, text_mask, text_keep=None):
        self.calls.append({"z_t": z_t.detach().clone(), "t": timesteps.clone(), "keep": text_keep.clone()})
        return z_t * self.weight


def test_ldm_iteration_scales_cached_latents_and_encodes_images_on_the_fly():
    from monai.networks.schedulers import DDPMScheduler

    from custom_components.engines import LDMIteration
    from custom_components.networks import MaskGuidedAutoencoder

    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=10, schedule="cosine", clip_sample=False)
    autoencoder = MaskGuidedAutoencoder(num_classes=3, channels=(4, 8), num_res_blocks=1, latent_channels=2, norm_num_groups=2).eval()
    image = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    mask = torch.randint(0, 3, (1, 1, 8, 8, 8))
    with torch.no_grad():
        z_mu, _ = autoencoder.encode(image, mask)
    outputs = {}
    for name, batch, encoder in (
        ("cached", {"latent": z_mu, "label": mask, "text": ["p"]}, None),
        ("on_the_fly", {"image": image, "label": mask, "text": ["p"]}, autoencoder),
    ):
        network = _RecordingDenoiser()
        optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
        torch.manual_seed(5)
        iteration = LDMIteration(scheduler, _ZeroText(), scale_factor=2.0, autoencoder=encoder, text_dropout=0.0)
        trainer = GuideGenTrainer("cpu", 1, [batch], network, optimizer, iteration)
        trainer.run()
        call = network.calls[0]
        # z_t = sqrt(abar) * (scale * z0) + sqrt(1 - abar) * noise; with zero prediction the loss is E[noise^2]
        outputs[name] = (call["z_t"], call["t"], float(trainer.state.output[0]["loss"]))
        assert bool(call["keep"].all())  # text_dropout 0 keeps every prompt
    assert torch.allclose(outputs["cached"][0], outputs["on_the_fly"][0], atol=1e-6)
    assert torch.equal(outputs["cached"][1], outputs["on_the_fly"][1])
    with pytest.raises(GuideGenInputError, match="no 'latent' entry"):
        iteration = LDMIteration(scheduler, _ZeroText(), scale_factor=1.0)
        GuideGenTrainer("cpu", 1, [{"image": image, "label": mask, "text": ["p"]}], _RecordingDenoiser(),
                        torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=0.0), iteration).run()
    with pytest.raises(GuideGenInputError, match="text_dropout"):
        LDMIteration(scheduler, _ZeroText(), scale_factor=1.0, text_dropout=1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ldm_iteration_trains_towards_the_scheduler_prediction_type(prediction_type):
    from monai.networks.schedulers import DDPMScheduler

    from custom_components.engines import LDMIteration

    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=10, schedule="cosine", clip_sample=False, prediction_type=prediction_type)
    z0 = torch.randn(1, 2, 4, 4, 4) + 3.0  # an offset keeps the three targets far apart
    batch = {"latent": z0, "label": torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), "text": ["p"]}
    network = _RecordingDenoiser()
    iteration = LDMIteration(scheduler, _ZeroText(), scale_factor=1.0, text_dropout=0.0)
    trainer = GuideGenTrainer("cpu", 1, [batch], network, torch.optim.SGD(network.parameters(), lr=0.0), iteration)
    trainer.run()
    z_t, t = network.calls[0]["z_t"], network.calls[0]["t"]
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    noise = (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()
    target = {"epsilon": noise, "sample": z0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * z0}[prediction_type]
    # the network predicts zero, so the loss is the mean square of the target it is trained towards
    assert float(trainer.state.output[0]["loss"]) == pytest.approx(float((target**2).mean()), rel=1e-4)


def test_ldm_iteration_refuses_an_unknown_prediction_type():
    from custom_components.engines import LDMIteration

    class _Scheduler:
        prediction_type = "x_prev"
        num_train_timesteps = 10

    with pytest.raises(GuideGenInputError, match="prediction_type 'x_prev'"):
        LDMIteration(_Scheduler(), _ZeroText(), scale_factor=1.0)
