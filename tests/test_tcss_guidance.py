"""TCSS text control beyond the paper (issue 15): classifier-free guidance of the categorical sampler, prompt dropout
in training, per-voxel class weights of the loss (tumor weight, per-class weights) and the tumor-organ loss.

Each option at its paper setting must leave the sampler / loss exactly as before; each option switched on must
change what it claims to change and nothing else.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers_bundles import TINY_TEXT_UNET
from helpers_tiny_text import make_tiny_text_encoder_dir

from custom_components.engines import TCSSIteration
from custom_components.errors import GuideGenInputError
from custom_components.losses import tumor_host_regions, tumor_organ_loss, tumor_volume_loss
from custom_components.networks import TextEncoder, build_text_conditioned_unet
from custom_components.pipelines import TCSSPipeline
from custom_components.schedulers import CategoricalDiffusionScheduler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles/guidegen_tcss/configs"
NUM_CLASSES = 4
TUMOR = 3
SIZE = (8, 8, 8)
PROMPTS = [
    "The patient is a 63-year-old white male. In this imaging, the patient's condition is described as hepatocellular "
    "carcinoma, with a tumor in the liver, measuring 30 mm, stage ii.",
    "The patient is a 40-year-old female. In this imaging, the patient's condition is described as no abnormality.",
]


# ------------------------------------------------------------------------------------------------ fixtures / helpers


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> TextEncoder:
    return TextEncoder(make_tiny_text_encoder_dir(tmp_path_factory.mktemp("tiny_text")))


@pytest.fixture(scope="module")
def network(text_encoder):
    """A tiny TextConditionedUNet whose cross-attention is not zero (a new one ignores the text: W_o starts at 0)."""
    torch.manual_seed(0)
    net = build_text_conditioned_unet(NUM_CLASSES, NUM_CLASSES, text_encoder.hidden_size, **TINY_TEXT_UNET).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return net


class _Recording(torch.nn.Module):
    """Wraps a network and records the batch size and text mask of every call."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def forward(self, x, t, text_features, text_mask):
        self.calls.append((x.shape[0], None if text_mask is None else text_mask.clone()))
        return self.inner(x, t, text_features, text_mask)


def _scheduler() -> CategoricalDiffusionScheduler:
    return CategoricalDiffusionScheduler(num_train_timesteps=50, num_classes=NUM_CLASSES)


def _old_sampler(network, scheduler, text_encoder, prompts, steps: int, seed: int) -> torch.Tensor:
    """The unguided TCSSPipeline loop as it was before guidance existed (the paper's sampler)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    features, mask = text_encoder(list(prompts))
    x_t = scheduler.sample_prior((len(prompts), NUM_CLASSES, *SIZE), generator=generator).to(torch.uint8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            timesteps = torch.full((len(prompts),), int(t), dtype=torch.long)
            logits = network(x_t, timesteps, features, mask)
            x_t = scheduler.step(logits.float(), int(t), x_t, generator=generator).to(torch.uint8)
    return x_t.argmax(dim=1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(dim=1)


# ------------------------------------------------------------------------------------------------ guidance: the formula


def test_guided_logits_interpolate_and_extrapolate_in_log_space():
    scheduler = _scheduler()
    generator = torch.Generator().manual_seed(0)
    cond = 3 * torch.randn(2, NUM_CLASSES, 5, 5, 5, generator=generator)
    uncond = 3 * torch.randn(2, NUM_CLASSES, 5, 5, 5, generator=generator)
    log_c, log_u = cond.log_softmax(1), uncond.log_softmax(1)
    probs = {s: scheduler.guided_x0_logits(cond, uncond, s).exp() for s in (0.0, 0.5, 1.0, 2.0, 4.0)}
    for s, p in probs.items():
        torch.testing.assert_close(p.sum(1), torch.ones_like(p[:, 0]))  # a distribution for every s
        expected = torch.softmax(log_u + s * (log_c - log_u), dim=1)
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs[0.0], log_u.exp(), atol=1e-6, rtol=1e-5)  # s = 0: the unconditional model
    torch.testing.assert_close(probs[1.0], log_c.exp(), atol=1e-6, rtol=1e-5)  # s = 1: the conditional model
    # logits are shift-invariant per voxel: an offset on either input changes nothing
    shifted = scheduler.guided_x0_logits(cond + 7.0, uncond - 3.0, 2.0).exp()
    torch.testing.assert_close(shifted, probs[2.0], atol=1e-6, rtol=1e-5)

    # towards the conditional: the mean log-ratio log f_c - log f_u under f_s grows with s, and so does the mass on
    # the class the prompt favours most over the null prompt
    ratio = log_c - log_u
    favoured = ratio.argmax(dim=1, keepdim=True)
    scales = sorted(probs)
    mean_ratio = [(probs[s] * ratio).sum(1) for s in scales]
    mass = [probs[s].gather(1, favoured) for s in scales]
    for lower, higher in zip(scales, scales[1:]):
        i, j = scales.index(lower), scales.index(higher)
        assert (mean_ratio[j] >= mean_ratio[i] - 1e-5).all()
        assert (mass[j] >= mass[i] - 1e-6).all()
    assert (mass[-1] > mass[2] + 1e-3).float().mean() > 0.9  # s = 4 strictly beyond the conditional
    # between 0 and 1 the mix is closer to f_c than f_u is
    assert (_kl(probs[0.5], log_c.exp()) < _kl(log_u.exp(), log_c.exp())).all()


@pytest.mark.parametrize("bad", [-0.5, -1, float("nan"), float("inf"), "2", True, None, [2.0]])
def test_bad_guidance_scales_are_refused_naming_the_key(bad):
    scheduler = _scheduler()
    x = torch.zeros(1, NUM_CLASSES, 2, 2, 2)
    with pytest.raises(ValueError, match="guidance_scale"):
        scheduler.guided_x0_logits(x, x, bad)


def test_guidance_scale_accepts_numbers_of_any_kind():
    import numpy as np

    check = CategoricalDiffusionScheduler.check_guidance_scale
    assert check(0) == 0.0 and check(3) == 3.0 and check(np.float32(2.5)) == 2.5 and check(torch.tensor(1.5)) == 1.5


# ------------------------------------------------------------------------------------------------ guidance: the sampler


def test_scale_one_is_the_unguided_sampler_bit_for_bit_with_one_pass_per_step(network, text_encoder):
    reference = _old_sampler(network, _scheduler(), text_encoder, PROMPTS, steps=6, seed=3)
    recording = _Recording(network)
    pipeline = TCSSPipeline(recording, _scheduler(), text_encoder, SIZE)
    default = pipeline(PROMPTS, num_inference_steps=6, seed=3, progress=False)
    assert len(recording.calls) == 6 and all(batch == len(PROMPTS) for batch, _ in recording.calls)
    explicit = pipeline(PROMPTS, num_inference_steps=6, seed=3, progress=False, guidance_scale=1.0)
    assert torch.equal(default, reference) and torch.equal(explicit, reference)
    assert len(recording.calls) == 12 and all(mask.any(dim=1).all() for _, mask in recording.calls)


def test_guidance_batches_both_passes_into_one_call_and_changes_the_masks(network, text_encoder):
    recording = _Recording(network)
    pipeline = TCSSPipeline(recording, _scheduler(), text_encoder, SIZE)
    plain = pipeline(PROMPTS, num_inference_steps=6, seed=3, progress=False)
    recording.calls.clear()
    guided = pipeline(PROMPTS, num_inference_steps=6, seed=3, progress=False, guidance_scale=4.0)
    assert guided.shape == plain.shape and guided.dtype == plain.dtype
    assert not torch.equal(guided, plain)
    assert len(recording.calls) == 6  # one network call per step
    b = len(PROMPTS)
    for batch, mask in recording.calls:
        assert batch == 2 * b
        assert mask[:b].any(dim=1).all() and not mask[b:].any()  # prompts, then the null prompt
    # the same seed gives the same guided masks
    assert torch.equal(guided, pipeline(PROMPTS, num_inference_steps=6, seed=3, progress=False, guidance_scale=4.0))


def test_scale_zero_is_the_unconditional_model_in_one_null_prompt_pass_per_step(network, text_encoder):
    recording = _Recording(network)
    pipeline = TCSSPipeline(recording, _scheduler(), text_encoder, SIZE)
    unconditional = pipeline(PROMPTS, num_inference_steps=6, seed=3, progress=False, guidance_scale=0.0)
    assert len(recording.calls) == 6
    assert all(batch == len(PROMPTS) and not mask.any() for batch, mask in recording.calls)
    # what the doubled-batch loop gives at s = 0 (f_s = f_u), and the prompts no longer matter
    scheduler = _scheduler()
    doubled = TCSSPipeline(network, scheduler, text_encoder, SIZE)
    scheduler.check_guidance_scale = lambda scale: 1e-30  # any s != 1 takes the doubled path; 1e-30 rounds to f_u
    torch.testing.assert_close(unconditional, doubled(PROMPTS, num_inference_steps=6, seed=3, progress=False, guidance_scale=0.0))
    other_prompts = pipeline(PROMPTS[::-1], num_inference_steps=6, seed=3, progress=False, guidance_scale=0.0)
    assert torch.equal(unconditional, other_prompts)


def test_the_null_half_is_the_networks_unconditional_pass(network, text_encoder):
    """One step of the guided sampler equals the formula applied to network(prompt) and network(None)."""
    scheduler = _scheduler()
    scheduler.set_timesteps(5)
    features, mask = text_encoder(PROMPTS)
    x_t = scheduler.sample_prior((2, NUM_CLASSES, *SIZE), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    t = torch.full((2,), int(scheduler.timesteps[1]), dtype=torch.long)
    with torch.no_grad():
        cond = network(x_t, t, features, mask)
        uncond = network(x_t, t, None)
        both = network(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([features, features]),
                       torch.cat([mask, torch.zeros_like(mask)]))
    torch.testing.assert_close(both[:2], cond, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[2:], uncond, atol=1e-4, rtol=1e-4)
    assert (cond - uncond).abs().max() > 1e-3  # the test network does read the text
    guided = scheduler.guided_x0_logits(both[:2], both[2:], 3.0)
    expected = torch.log_softmax(uncond.log_softmax(1) + 3.0 * (cond.log_softmax(1) - uncond.log_softmax(1)), 1)
    torch.testing.assert_close(guided, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "3"])
def test_the_pipeline_refuses_a_bad_scale_before_any_work(network, text_encoder, bad):
    recording = _Recording(network)
    pipeline = TCSSPipeline(recording, _scheduler(), text_encoder, SIZE)
    with pytest.raises(GuideGenInputError, match="guidance_scale"):
        pipeline(PROMPTS, num_inference_steps=3, progress=False, guidance_scale=bad)
    assert recording.calls == []


# ------------------------------------------------------------------------------------------------ training: dropout


class _MaskRecorder(torch.nn.Module):
    """Equal logits for every class (a zero 1x1 convolution); records the text mask it was given."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(num_classes, num_classes, 1)
        self.text_masks: list[torch.Tensor] = []

    def forward(self, x, t, text_features, text_mask):
        self.text_masks.append(text_mask.clone())
        return self.conv(x)


class _ConstantText(torch.nn.Module):
    """Three real tokens and one padding token per prompt."""

    def forward(self, prompts):
        mask = torch.tensor([[True, True, True, False]]).expand(len(prompts), -1).clone()
        return torch.ones(len(prompts), 4, 5), mask


def _engine(network: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu")), network=network, amp=False)


def _labels(batch: int, size: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch, 1, size, size, size), generator=torch.Generator().manual_seed(seed))


def _dropped(iteration: TCSSIteration, batch: int, seed: int) -> torch.Tensor:
    network = _MaskRecorder()
    torch.manual_seed(seed)
    iteration.compute_loss(_engine(network), {"label": _labels(batch), "text": ["p"] * batch})
    (mask,) = network.text_masks
    kept = mask.any(dim=1)
    # a dropped sample has no real token left; a kept one is untouched
    assert torch.equal(mask[kept], _ConstantText()(["p"] * int(kept.sum()))[1])
    return ~kept


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.6])
def test_text_dropout_drops_prompts_at_the_requested_rate(rate):
    iteration = TCSSIteration(_scheduler(), _ConstantText(), text_dropout=rate)
    batch = 4000
    dropped = _dropped(iteration, batch, seed=5)
    sigma = math.sqrt(rate * (1 - rate) / batch)
    assert abs(dropped.float().mean().item() - rate) < 4 * sigma
    assert torch.equal(dropped, _dropped(iteration, batch, seed=5))  # seeded: the same samples again
    assert not torch.equal(dropped, _dropped(iteration, batch, seed=6))


def test_no_dropout_keeps_every_prompt_and_the_random_stream():
    iteration = TCSSIteration(_scheduler(), _ConstantText(), text_dropout=0.0)
    assert not _dropped(iteration, 500, seed=5).any()
    assert not _dropped(TCSSIteration(_scheduler(), _ConstantText()), 500, seed=5).any()  # the default is the paper


def test_a_dropped_sample_gets_the_networks_unconditional_prediction(network, text_encoder):
    """Dropout goes through the ordinary forward pass (DDP-safe) and gives exactly TextConditionedUNet's null pass."""
    features, mask = text_encoder(PROMPTS)
    x = F.one_hot(_labels(2, size=8, seed=1)[:, 0], NUM_CLASSES).movedim(-1, 1).float()
    t = torch.tensor([10, 30])
    dropped = mask.clone()
    dropped[1] = False
    with torch.no_grad():
        mixed = network(x, t, features, dropped)
        torch.testing.assert_close(mixed[:1], network(x[:1], t[:1], features[:1], mask[:1]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mixed[1:], network(x[1:], t[1:], None), atol=1e-4, rtol=1e-4)
    # every parameter still gets a finite gradient when the whole batch is dropped (as DDP requires)
    network.zero_grad()
    network(x, t, features, torch.zeros_like(mask)).square().mean().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    network.zero_grad()


# ------------------------------------------------------------------------------------------------ training: weights


def _paper_loss(scheduler, network, labels, aux_ce_weight: float, seed: int) -> torch.Tensor:
    """The TCSS loss as computed before the weights existed: mean KL of Eq. 6 (+ aux cross-entropy)."""
    torch.manual_seed(seed)
    x0 = F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (labels.shape[0],))
    x_t = scheduler.q_sample(x0, timesteps)
    logits = network(x_t, timesteps, None, None)
    loss = scheduler.kl_loss(x_t, x0, logits.float(), timesteps)
    if aux_ce_weight:
        loss = loss + aux_ce_weight * F.cross_entropy(logits.float(), labels[:, 0])
    return loss


class _RandomLogits(torch.nn.Module):
    """Logits that depend on x_t (a random 1x1 convolution), so the per-voxel losses differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv = torch.nn.Conv3d(NUM_CLASSES, NUM_CLASSES, 1)
        with torch.no_grad():
            self.conv.weight.mul_(8)

    def forward(self, x, t, text_features, text_mask):
        return self.conv(x)


def _loss(iteration: TCSSIteration, network, labels, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loss, _ = iteration.compute_loss(_engine(network), {"label": labels, "text": ["p"] * labels.shape[0]})
    return loss.detach()


@pytest.mark.parametrize("aux", [0.0, 0.3])
def test_tumor_weight_one_is_the_paper_loss_exactly(aux):
    scheduler, network, labels = _scheduler(), _RandomLogits(), _labels(2, size=6)
    assert (labels == TUMOR).any()
    with torch.no_grad():
        expected = _paper_loss(scheduler, network, labels, aux, seed=2)
        for kwargs in ({}, {"tumor_loss_weight": 1.0, "tumor_classes": [TUMOR]},
                       {"tumor_loss_weight": 1, "tumor_classes": [TUMOR], "class_loss_weights": [1.0] * NUM_CLASSES}):
            iteration = TCSSIteration(scheduler, _ConstantText(), aux_ce_weight=aux, **kwargs)
            assert iteration.voxel_weights(labels[:, 0]) is None
            assert torch.equal(_loss(iteration, network, labels, seed=2), expected)


@pytest.mark.parametrize("aux", [0.0, 0.3])
def test_tumor_weight_raises_only_the_tumor_voxels_contribution(aux):
    scheduler, network, labels = _scheduler(), _RandomLogits(), _labels(2, size=6)
    tumor = labels[:, 0] == TUMOR
    weight = 5.0
    iteration = TCSSIteration(scheduler, _ConstantText(), aux_ce_weight=aux, tumor_loss_weight=weight,
                              tumor_classes=[TUMOR])
    voxel_weights = iteration.voxel_weights(labels[:, 0])
    assert torch.equal(voxel_weights, torch.where(tumor, weight, 1.0))
    plain = TCSSIteration(scheduler, _ConstantText(), aux_ce_weight=aux)

    # per-voxel terms of the paper's loss, with the same random draws as the iterations'
    with torch.no_grad():
        torch.manual_seed(2)
        x0 = F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (2,))
        x_t = scheduler.q_sample(x0, timesteps)
        logits = network(x_t, timesteps, None, None)
        per_voxel = scheduler.kl_loss(x_t, x0, logits, timesteps, reduction="none")
        per_voxel = per_voxel + aux * F.cross_entropy(logits, labels[:, 0], reduction="none")
        tumor_part = (per_voxel * tumor).sum() / per_voxel.numel()
        weighted, unweighted = _loss(iteration, network, labels, 2), _loss(plain, network, labels, 2)
    assert tumor_part > 0
    assert float(weighted - unweighted) == pytest.approx(float((weight - 1) * tumor_part), rel=1e-5)
    # without tumor voxels nothing changes
    healthy = labels.clamp_max(TUMOR - 1)
    with torch.no_grad():
        assert torch.allclose(_loss(iteration, network, healthy, 2), _loss(plain, network, healthy, 2), rtol=1e-6, atol=0)


def test_class_weights_scale_each_class_and_combine_with_the_tumor_weight():
    scheduler, network, labels = _scheduler(), _RandomLogits(), _labels(2, size=6)
    class_weights = [0.2, 1.0, 3.0, 2.0]
    iteration = TCSSIteration(scheduler, _ConstantText(), class_loss_weights=class_weights, tumor_loss_weight=4.0,
                              tumor_classes=[TUMOR])
    expected_weights = torch.tensor([0.2, 1.0, 3.0, 8.0])[labels[:, 0]]
    torch.testing.assert_close(iteration.voxel_weights(labels[:, 0]), expected_weights)
    with torch.no_grad():
        torch.manual_seed(2)
        x0 = F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (2,))
        x_t = scheduler.q_sample(x0, timesteps)
        per_voxel = scheduler.kl_loss(x_t, x0, network(x_t, timesteps, None, None), timesteps, reduction="none")
        torch.testing.assert_close(_loss(iteration, network, labels, 2), (expected_weights * per_voxel).mean())


# ------------------------------------------------------------------------------------------------ tumor-organ loss


def _two_organs_with_tumors() -> torch.Tensor:
    """(3, 6, 6, 6): organ 1 in the front half, organ 2 in the back half, background on the outer ring.

    Sample 0: a tumor in organ 1, one voxel away from organ 2 (it touches organ 1 most).
    Sample 1: no tumor. Sample 2: a tumor surrounded by background only.
    """
    labels = torch.zeros(3, 6, 6, 6, dtype=torch.long)
    labels[:, 1:3, 1:5, 1:5] = 1
    labels[:, 3:5, 1:5, 1:5] = 2
    labels[0, 1, 2, 2] = TUMOR
    labels[2] = 0
    labels[2, 3, 3, 3] = TUMOR
    return labels


def test_the_host_region_is_the_organ_touching_the_tumor_most_plus_the_tumor():
    labels = _two_organs_with_tumors()
    regions, valid = tumor_host_regions(labels, [TUMOR])
    assert valid.tolist() == [True, False, False]
    assert torch.equal(regions[0], (labels[0] == 1) | (labels[0] == TUMOR))
    assert not regions[1:].any()
    # the tumor moved to organ 2's side: the host follows it
    moved = labels.clone()
    moved[0, 1, 2, 2] = 1
    moved[0, 4, 2, 2] = TUMOR
    regions, valid = tumor_host_regions(moved, [TUMOR])
    assert valid[0] and torch.equal(regions[0], (moved[0] == 2) | (moved[0] == TUMOR))
    with pytest.raises(GuideGenInputError, match="tumor_organ_loss_weight"):
        tumor_host_regions(labels, [])


def test_tumor_organ_loss_is_minus_log_the_share_inside_the_host_organ():
    labels = _two_organs_with_tumors()
    region = (labels[0] == 1) | (labels[0] == TUMOR)
    # the same logits everywhere: the tumor probability is uniform, its share inside is the region's share of voxels
    uniform = torch.zeros(3, NUM_CLASSES, 6, 6, 6)
    expected = math.log(region.numel() / int(region.sum()))
    assert float(tumor_organ_loss(uniform, labels, [TUMOR])) == pytest.approx(expected, rel=1e-6)
    # whatever the amount of tumor drawn, only where it lies counts
    assert float(tumor_organ_loss(uniform + 4.0 * F.one_hot(torch.tensor(TUMOR), NUM_CLASSES)[None, :, None, None, None],
                                  labels, [TUMOR])) == pytest.approx(expected, rel=1e-6)
    # all tumor probability inside the host organ: no loss; all in the other organ: a large one
    inside = uniform.clone()
    inside[0, TUMOR] = torch.where(region, 0.0, -60.0)
    assert float(tumor_organ_loss(inside, labels, [TUMOR])) == pytest.approx(0.0, abs=1e-6)
    wrong = uniform.clone()
    wrong[0, TUMOR] = torch.where(labels[0] == 2, 0.0, -20.0)
    assert float(tumor_organ_loss(wrong, labels, [TUMOR])) > 15
    # its gradient raises the tumor logits inside the organ and lowers them outside
    logits = uniform.clone().requires_grad_(True)
    tumor_organ_loss(logits, labels, [TUMOR]).backward()
    grad = logits.grad[0, TUMOR]
    assert (grad[region] < 0).all() and (grad[~region] > 0).all()
    assert not logits.grad[1:].any()  # samples without a usable tumor add nothing
    # a batch without any tumor: zero, still differentiable
    healthy = torch.zeros(3, NUM_CLASSES, 6, 6, 6, requires_grad=True)
    zero = tumor_organ_loss(healthy, labels[1:2].expand(3, -1, -1, -1), [TUMOR])
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def _check_added_term(key: str, term_fn, weight: float) -> None:
    """``TCSSIteration`` with ``key`` = ``weight`` adds exactly ``weight · term_fn(logits, labels, tumor classes)``
    to the loss (the logits of the same draws), and with ``key`` = 0 computes the plain loss."""
    scheduler, network, labels = _scheduler(), _RandomLogits(), _two_organs_with_tumors()[:, None]
    plain = TCSSIteration(scheduler, _ConstantText(), aux_ce_weight=0.1)
    off = TCSSIteration(scheduler, _ConstantText(), aux_ce_weight=0.1, tumor_classes=[TUMOR], **{key: 0.0})
    on = TCSSIteration(scheduler, _ConstantText(), aux_ce_weight=0.1, tumor_classes=[TUMOR], **{key: weight})
    with torch.no_grad():
        torch.manual_seed(2)
        x0 = F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (3,))
        logits = network(scheduler.q_sample(x0, timesteps), timesteps, None, None)
        term = term_fn(logits, labels[:, 0], [TUMOR])
        assert term > 0
        assert torch.equal(_loss(off, network, labels, 2), _loss(plain, network, labels, 2))
        difference = _loss(on, network, labels, 2) - _loss(plain, network, labels, 2)
    assert float(difference) == pytest.approx(weight * float(term), rel=1e-5)


def test_tumor_organ_weight_adds_exactly_its_term_and_zero_is_the_paper_loss():
    _check_added_term("tumor_organ_loss_weight", tumor_organ_loss, 0.7)


def test_tumor_volume_loss_is_the_squared_log_error_of_the_expected_tumor_voxels():
    labels = _two_organs_with_tumors()  # one tumor voxel in samples 0 and 2, none in sample 1
    voxels = labels[0].numel()
    # the same logits everywhere: each voxel holds 1/N of tumor probability, so V̂ = voxels / N in every sample
    uniform = torch.zeros(3, NUM_CLASSES, 6, 6, 6)
    predicted = voxels / NUM_CLASSES
    expected = (2 * (math.log1p(predicted) - math.log1p(1.0)) ** 2 + math.log1p(predicted) ** 2) / 3
    assert float(tumor_volume_loss(uniform, labels, [TUMOR])) == pytest.approx(expected, rel=1e-5)
    # a prediction with exactly the true tumor voxels costs nothing, wherever they lie (the organ loss scores that)
    exact = torch.full((3, NUM_CLASSES, 6, 6, 6), -60.0)
    exact[:, 0] = 0.0
    exact[0, TUMOR, 0, 0, 0] = exact[2, TUMOR, 5, 5, 5] = 60.0
    assert float(tumor_volume_loss(exact, labels, [TUMOR])) == pytest.approx(0.0, abs=1e-6)
    # its gradient lowers the tumor logits where too much tumor is predicted: everywhere, healthy sample included
    logits = uniform.clone().requires_grad_(True)
    tumor_volume_loss(logits, labels, [TUMOR]).backward()
    assert (logits.grad[:, TUMOR] > 0).all()
    # too little tumor: it raises them, and a sample without a tumor asks for none
    scarce = torch.zeros(3, NUM_CLASSES, 6, 6, 6)
    scarce[:, TUMOR] = -30.0
    scarce.requires_grad_(True)
    tumor_volume_loss(scarce, labels, [TUMOR]).backward()
    assert (scarce.grad[[0, 2], TUMOR] < 0).all() and (scarce.grad[1, TUMOR] >= 0).all()
    with pytest.raises(GuideGenInputError, match="tumor_volume_loss_weight"):
        tumor_volume_loss(uniform, labels, [])
    with pytest.raises(GuideGenInputError, match="must be"):
        tumor_volume_loss(uniform[:, :, :5], labels, [TUMOR])


def test_tumor_volume_weight_adds_exactly_its_term_and_zero_is_the_paper_loss():
    _check_added_term("tumor_volume_loss_weight", tumor_volume_loss, 0.4)


# ------------------------------------------------------------------------------------------------ training: bad values


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"text_dropout": -0.1}, "text_dropout"),
        ({"text_dropout": 1.0}, "text_dropout"),
        ({"text_dropout": 1.5}, "text_dropout"),
        ({"text_dropout": float("nan")}, "text_dropout"),
        ({"text_dropout": True}, "text_dropout"),
        ({"text_dropout": "0.1"}, "text_dropout"),
        ({"tumor_loss_weight": 0.0, "tumor_classes": [TUMOR]}, "tumor_loss_weight"),
        ({"tumor_loss_weight": -2.0, "tumor_classes": [TUMOR]}, "tumor_loss_weight"),
        ({"tumor_loss_weight": float("inf"), "tumor_classes": [TUMOR]}, "tumor_loss_weight"),
        ({"tumor_loss_weight": 3.0}, "tumor_loss_weight"),  # no tumor class to weight
        ({"tumor_classes": [NUM_CLASSES]}, "tumor_classes"),
        ({"class_loss_weights": [1.0, 1.0]}, "class_loss_weights"),
        ({"class_loss_weights": [1.0, -1.0, 1.0, 1.0]}, "class_loss_weights"),
        ({"class_loss_weights": [0.0] * NUM_CLASSES}, "class_loss_weights"),
        ({"class_loss_weights": [1.0, float("nan"), 1.0, 1.0]}, "class_loss_weights"),
        ({"tumor_organ_loss_weight": -1.0, "tumor_classes": [TUMOR]}, "tumor_organ_loss_weight"),
        ({"tumor_organ_loss_weight": float("nan"), "tumor_classes": [TUMOR]}, "tumor_organ_loss_weight"),
        ({"tumor_organ_loss_weight": True, "tumor_classes": [TUMOR]}, "tumor_organ_loss_weight"),
        ({"tumor_organ_loss_weight": 1.0}, "tumor_organ_loss_weight"),  # no tumor class to locate
        ({"tumor_volume_loss_weight": -0.5, "tumor_classes": [TUMOR]}, "tumor_volume_loss_weight"),
        ({"tumor_volume_loss_weight": float("inf"), "tumor_classes": [TUMOR]}, "tumor_volume_loss_weight"),
        ({"tumor_volume_loss_weight": 1.0}, "tumor_volume_loss_weight"),  # no tumor class to count
    ],
)
def test_bad_training_values_raise_errors_naming_the_key(kwargs, key):
    with pytest.raises(GuideGenInputError, match=key):
        TCSSIteration(_scheduler(), _ConstantText(), **kwargs)


# ------------------------------------------------------------------------------------------------ configs


def test_configs_declare_and_wire_the_keys_at_their_settings():
    train = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    assert train["text_dropout"] == 0.1 and train["tumor_loss_weight"] == 1.0 and train["class_loss_weights"] is None
    iteration = train["train"]["iteration"]
    assert train["tumor_organ_loss_weight"] == 0.0 and train["tumor_volume_loss_weight"] == 0.0
    for key in ("text_dropout", "tumor_loss_weight", "class_loss_weights", "tumor_organ_loss_weight",
                "tumor_volume_loss_weight"):
        assert iteration[key] == f"@{key}"
        params = next(h for h in train["train"]["handlers"] if h["_target_"].endswith("MLFlowHandler"))["experiment_param"]
        assert params[key] == f"@{key}"
    inference = yaml.safe_load((CONFIGS / "inference.yaml").read_text())
    assert inference["guidance_scale"] == 1.0
    assert "guidance_scale=@guidance_scale" in inference["run"][0]


def test_the_config_finds_the_tumor_class_of_the_class_map():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml")])
    for path, expected in ((None, [19]), (ROOT / "custom_components/data/resources/class_map_body.json", [19])):
        parser["class_map"] = f"$custom_components.data.class_map.load_class_map({str(path) if path else None!r})"
        assert parser.get_parsed_content("train#iteration#tumor_classes", lazy=False) == expected


def test_the_new_keys_are_accepted_as_overrides():
    from monai.bundle import ConfigWorkflow

    for configs, overrides in (
        (["train.yaml", "train_cpu.yaml"], {"datalist": "d.json", "text_dropout": 0.2, "tumor_loss_weight": 3.0,
                                            "class_loss_weights": [1.0] * 20, "tumor_organ_loss_weight": 0.5,
                                            "tumor_volume_loss_weight": 0.5}),
        (["inference.yaml"], {"model_path": "m.pt", "guidance_scale": 2.0}),
    ):
        ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], logging_file=False, workflow_type=None,
                       **overrides).initialize()


def test_guidance_warns_for_a_model_trained_without_prompt_dropout(network, text_encoder):
    import warnings

    def sample(trained_text_dropout, scale):
        pipeline = TCSSPipeline(network, _scheduler(), text_encoder, SIZE, trained_text_dropout=trained_text_dropout)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipeline(PROMPTS[:1], num_inference_steps=2, progress=False, guidance_scale=scale)
        return [str(w.message) for w in caught if "prompt dropout" in str(w.message)]

    (message,) = sample(0.0, 2.0)
    assert "guidance_scale = 2" in message and "text_dropout" in message
    assert sample(0.0, 1.0) == [] and sample(0.1, 2.0) == [] and sample(None, 2.0) == []


def test_the_model_file_records_the_prompt_dropout_for_inference():
    train = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    assert train["checkpoint_info"]["extra"]["text_dropout"] == "@text_dropout"
    inference = yaml.safe_load((CONFIGS / "inference.yaml").read_text())
    # files without the entry predate prompt dropout: trained with 0
    assert inference["pipeline"]["trained_text_dropout"] == "$@model_info.get('text_dropout', 0.0)"
