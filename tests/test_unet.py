"""CrossAttentionUNet3D and TextConditionedUNet: shapes, conditioning, attention layout, errors, checkpointing,
learning, batch independence. Tiny configurations (widths 8/16/32, 16³ volumes) keep the file fast on CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from monai.networks.blocks import SABlock, SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import SpatialTransformer

from custom_components.networks.knowledge_injection import KnowledgeInjection
from custom_components.networks.unet import CrossAttentionUNet3D, TextConditionedUNet, VoxelCrossAttention

TINY: dict[str, Any] = dict(
    channels=(8, 16, 32),
    num_res_blocks=1,
    cross_attention_levels=(False, True, True),
    self_attention_levels=(False, False, True),
    num_head_channels=8,
    norm_num_groups=4,
)


def tiny_unet(in_channels: int = 3, out_channels: int = 2, **overrides: Any) -> CrossAttentionUNet3D:
    torch.manual_seed(0)
    return CrossAttentionUNet3D(in_channels, out_channels, **{**TINY, **overrides})


def randomize_zero_init(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give random values to the zero-initialised weights (output convs/projections, norm biases).

    Freshly built, the output convolution and every cross-attention projection are zero, which hides whether
    the context or the input reaches the output at all.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def contexts_for(net: CrossAttentionUNet3D, batch: int = 2, tokens: int = 5, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [None if d is None else torch.randn(batch, tokens, d, generator=gen) for d in net.context_dims]


def inputs(net: CrossAttentionUNet3D, batch: int = 2, spatial: tuple[int, ...] = (16, 16, 16), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, *spatial, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t, contexts_for(net, batch, seed=seed)


@pytest.mark.parametrize(
    "overrides, spatial",
    [
        (dict(channels=(8, 16), cross_attention_levels=(False, True), self_attention_levels=(False, True)), (16,) * 3),
        ({}, (16, 16, 16)),
        ({}, (16, 16, 24)),
        (dict(num_res_blocks=2), (8, 16, 12)),
    ],
    ids=["2-levels", "3-levels", "non-cubic", "2-res-blocks"],
)
def test_output_shape(overrides: dict[str, Any], spatial: tuple[int, int, int]) -> None:
    net = tiny_unet(**overrides)
    x, t, ctx = inputs(net, spatial=spatial)
    out = net(x, t, ctx)
    assert out.shape == (2, net.out_channels, *spatial)
    assert torch.isfinite(out).all()


def test_timesteps_float_and_scalar() -> None:
    net = randomize_zero_init(tiny_unet()).eval()
    x, t, ctx = inputs(net)
    same_t = torch.full((2,), 7)
    by_long = net(x, same_t, ctx)
    torch.testing.assert_close(net(x, same_t.float(), ctx), by_long)
    torch.testing.assert_close(net(x, torch.tensor(7), ctx), by_long)  # 0-d: broadcast to the batch
    assert not torch.allclose(net(x, same_t + 100, ctx), by_long)  # the time embedding matters


def test_context_dims_default_and_custom() -> None:
    assert tiny_unet().context_dims == (None, 16, 32)  # level 0 does not cross-attend
    net = tiny_unet(context_dims=(5, 6, 7), cross_attention_levels=(True, True, True))
    assert net.context_dims == (5, 6, 7)
    x, t, _ = inputs(net)
    ctx = [torch.randn(2, 3, d) for d in (5, 6, 7)]
    assert net(x, t, ctx).shape == (2, 2, 16, 16, 16)


def test_output_depends_on_context_only_at_cross_attention_levels() -> None:
    net = randomize_zero_init(tiny_unet()).eval()
    x, t, ctx = inputs(net)
    with torch.no_grad():
        base = net(x, t, ctx)
        for level in range(3):
            changed = list(ctx)
            if ctx[level] is None:  # a level without cross-attention takes no context at all
                assert not net.cross_attention_levels[level]
                changed[level] = torch.randn(2, 5, 8)
            else:
                changed[level] = ctx[level] + torch.randn_like(ctx[level])
            moved = (net(x, t, changed) - base).abs().max().item()
            if net.cross_attention_levels[level]:
                assert moved > 1e-4, f"context of level {level} has no effect"
            else:
                assert moved == 0.0, f"level {level} has no cross-attention but its context changed the output"


def test_context_effect_after_one_optimiser_step() -> None:
    """Fresh, the zero-initialised projections make cross-attention an identity; one step makes it conditional."""
    net = tiny_unet()
    x, t, ctx = inputs(net)
    other = contexts_for(net, seed=5)
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx), net(x, t, other))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):  # step 1 moves the output conv off zero, step 2 the attention projections behind it
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x, t, ctx), torch.randn(2, 2, 16, 16, 16)).backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(net(x, t, ctx), net(x, t, other))


def test_fresh_cross_attention_is_identity_and_zero_context_adds_bias() -> None:
    block = VoxelCrossAttention(channels=16, context_dim=12, num_head_channels=8, norm_num_groups=4)
    x = torch.randn(2, 16, 4, 6, 8)
    ctx = torch.randn(2, 7, 12)
    assert torch.equal(block(x, ctx), x)  # zero-initialised output projection
    randomize_zero_init(block)
    out = block(x, torch.zeros(2, 7, 12))  # the "null prompt": zero keys/values -> only the output bias remains
    torch.testing.assert_close(out, x + block.out_proj.bias.view(1, -1, 1, 1, 1))
    assert not torch.allclose(block(x, ctx), out)


def test_attention_layout_is_linear_in_voxels() -> None:
    """Self-attention (quadratic in voxels) only where flagged and in the middle block; no SpatialTransformer."""
    net = tiny_unet(
        channels=(8, 16, 32, 32),
        cross_attention_levels=(False, True, True, True),
        self_attention_levels=(False, False, False, True),
    )
    assert not any(isinstance(m, SpatialTransformer) for m in net.modules())
    levels = list(net.encoder) + list(reversed(net.decoder))  # decoder[i] serves level n - 1 - i
    for i, level_module in enumerate(levels):
        level = i % net.num_levels
        n_self = sum(isinstance(m, SpatialAttentionBlock) for m in level_module.modules())
        n_sa = sum(isinstance(m, SABlock) for m in level_module.modules())
        n_cross = sum(isinstance(m, VoxelCrossAttention) for m in level_module.modules())
        n_units = len(level_module.units)
        assert n_self == n_sa == (n_units if net.self_attention_levels[level] else 0), f"level {level}"
        assert n_cross == (n_units if net.cross_attention_levels[level] else 0), f"level {level}"
    assert sum(isinstance(m, SpatialAttentionBlock) for m in net.middle.modules()) == 1
    assert sum(isinstance(m, VoxelCrossAttention) for m in net.middle.modules()) == 1
    # Attention runs through scaled_dot_product_attention, never an explicit N x N matrix.
    assert all(m.attn.use_flash_attention for m in net.modules() if isinstance(m, SpatialAttentionBlock))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=(8, 16, 30)), "divisible by norm_num_groups"),
        (dict(norm_num_groups=3), "divisible by norm_num_groups"),
        (dict(cross_attention_levels=(False, True)), "cross_attention_levels has 2 entries"),
        (dict(self_attention_levels=(False, False, True, True)), "self_attention_levels has 4 entries"),
        (dict(context_dims=(8, 16)), "context_dims has 2 entries"),
        (dict(num_head_channels=12), "num_head_channels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_unet(**kwargs)


def test_input_errors() -> None:
    net = tiny_unet()
    x, t, ctx = inputs(net)
    with pytest.raises(ValueError, match=r"x has 4 channels.*in_channels=3"):
        net(torch.randn(2, 4, 16, 16, 16), t, ctx)
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16, 18\).*divisible by 4"):
        net(torch.randn(2, 3, 16, 16, 18), t, ctx)
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        net(torch.randn(2, 3, 16, 16), t, ctx)
    with pytest.raises(ValueError, match="contexts is None"):
        net(x, t, None)
    with pytest.raises(ValueError, match="expected a sequence of 3 contexts.*got 2"):
        net(x, t, ctx[:2])
    with pytest.raises(ValueError, match="got a single tensor"):
        net(x, t, ctx[1])
    with pytest.raises(ValueError, match=r"contexts\[1\] must have shape \(2, tokens, 16\), got \(2, 5, 15\)"):
        net(x, t, [ctx[0], torch.randn(2, 5, 15), ctx[2]])
    with pytest.raises(ValueError, match=r"contexts\[2\] must have shape \(2, tokens, 32\), got \(1, 5, 32\)"):
        net(x, t, [ctx[0], ctx[1], ctx[2][:1]])
    with pytest.raises(ValueError, match="timesteps must have shape"):
        net(x, t[:1], ctx)


def test_no_cross_attention_runs_without_contexts() -> None:
    net = tiny_unet(cross_attention_levels=(False, False, False))
    x, t, _ = inputs(net)
    assert not net.uses_context
    assert net(x, t).shape == (2, 2, 16, 16, 16)


def test_gradient_checkpointing_matches_plain_forward() -> None:
    plain = randomize_zero_init(tiny_unet()).train()
    ckpt = tiny_unet(use_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs(plain)
    target = torch.randn(2, 2, 16, 16, 16)
    results = []
    for net in (plain, ckpt):
        ctx_leaf = [None if c is None else c.clone().requires_grad_() for c in ctx]
        out = net(x, t, ctx_leaf)
        torch.nn.functional.mse_loss(out, target).backward()
        grads = {n: p.grad for n, p in net.named_parameters()}
        results.append((out.detach(), grads, [None if c is None else c.grad for c in ctx_leaf]))
    (out_a, grads_a, cg_a), (out_b, grads_b, cg_b) = results
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=0, msg=name)
    for level in (1, 2):  # level 0 has no cross-attention, so its context gets no gradient
        torch.testing.assert_close(cg_b[level], cg_a[level], atol=1e-6, rtol=0)


def test_checkpointed_forward_keeps_no_concatenation_upsampling_or_head_copies() -> None:
    """What a checkpointed training forward keeps for the backward pass at full resolution: the input, the input
    convolution's and the units' outputs (``channels[0]`` maps each), nothing wider and nothing else.

    A decoder unit's concatenation (``channels[0] + skip`` channels), the upsampled map below it (``channels[1]``)
    or the output head's normalised and activated copies would each add a full-size map (issue 19: paper-size training
    memory); the gradients are unchanged (test above).
    """
    net = randomize_zero_init(tiny_unet(num_res_blocks=2, use_checkpointing=True)).train()
    x, t, ctx = inputs(net, batch=1)
    full = x.shape[2:]
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 5 and tensor.shape[2:] == full:
            kept[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x, t, ctx)
    channels = sorted(int(tensor.shape[1]) for tensor in kept.values())
    # x; conv_in and the 2 encoder units (the units' skips); the 3 decoder units' inputs after the first, and the
    # last unit's output (the head's input)
    assert channels == [net.in_channels] + [TINY["channels"][0]] * 6, channels


def test_few_adam_steps_reduce_loss() -> None:
    net = tiny_unet().train()
    x, t, ctx = inputs(net, spatial=(8, 8, 8))
    target = x[:, :2].clone()  # a learnable map (as in x_0 prediction), unlike a random target
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x, t, ctx), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_batch_independence() -> None:
    net = randomize_zero_init(tiny_unet(dropout=0.2)).eval()  # eval: dropout off, so also deterministic
    x, t, ctx = inputs(net)
    with torch.no_grad():
        base = net(x, t, ctx)
        x2, t2, ctx2 = x.clone(), t.clone(), [None if c is None else c.clone() for c in ctx]
        x2[1] = torch.randn_like(x2[1])
        t2[1] = t2[1] + 17
        for c in ctx2:
            if c is not None:
                c[1] = torch.randn_like(c[1])
        other = net(x2, t2, ctx2)
        torch.testing.assert_close(other[0], base[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(other[1], base[1])
        torch.testing.assert_close(net(x, t, ctx), base)


# ---------------------------------------------------------------------------------------------------------------
# TextConditionedUNet


TEXT_DIM = 12


def tiny_text_unet() -> TextConditionedUNet:
    unet = tiny_unet()
    injector = KnowledgeInjection(TEXT_DIM, context_dims=unet.context_dims, num_queries=4, hidden_dim=16, num_heads=2)
    return TextConditionedUNet(unet, injector)


def test_text_conditioned_unet_with_text() -> None:
    net = tiny_text_unet()
    randomize_zero_init(net.unet)
    x, t, _ = inputs(net.unet)
    text = torch.randn(2, 6, TEXT_DIM)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = net(x, t, text, mask)
    assert out.shape == (2, 2, 16, 16, 16)
    out.square().mean().backward()
    assert net.injector.queries.grad is not None and net.injector.queries.grad.abs().sum() > 0
    expected = net.unet(x, t, net.injector(text, mask))
    torch.testing.assert_close(out.detach(), expected.detach())


def test_every_injector_parameter_gets_a_gradient() -> None:
    """Level 0 has no cross-attention, so the injector makes no context (and no parameters) for it: every
    parameter gets a gradient, as DistributedDataParallel requires."""
    net = tiny_text_unet().train()
    randomize_zero_init(net.unet)
    x, t, _ = inputs(net.unet)
    text = torch.randn(2, 6, TEXT_DIM)
    out = net(x, t, text)
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    assert "0" not in net.injector.context_projs and net.injector(text, None)[0] is None


def test_text_conditioned_unet_null_text_uses_zero_contexts() -> None:
    net = tiny_text_unet()
    randomize_zero_init(net.unet)
    net.eval()
    x, t, _ = inputs(net.unet)
    nulls = net.null_contexts(2)
    assert nulls[0] is None and [tuple(c.shape) for c in nulls[1:]] == [(2, 4, 16), (2, 4, 32)]
    assert all(not c.any() for c in nulls[1:])
    with torch.no_grad():
        out = net(x, t, None)
        torch.testing.assert_close(out, net.unet(x, t, nulls))
        # The token count is irrelevant for zero contexts.
        one_token = [None if d is None else torch.zeros(2, 1, d) for d in net.context_dims]
        torch.testing.assert_close(out, net.unet(x, t, one_token))
        assert not torch.allclose(out, net(x, t, torch.randn(2, 6, TEXT_DIM)))
    with pytest.raises(ValueError, match="text_mask was given without text_features"):
        net(x, t, None, torch.ones(2, 6, dtype=torch.bool))


def test_text_conditioned_unet_rejects_mismatched_parts() -> None:
    unet = tiny_unet()
    with pytest.raises(ValueError, match="context_dims=unet.context_dims"):
        TextConditionedUNet(unet, KnowledgeInjection(TEXT_DIM, context_dims=(8, 16, 16)))
    with pytest.raises(TypeError, match="CrossAttentionUNet3D"):
        not_a_unet: Any = torch.nn.Identity()
        TextConditionedUNet(not_a_unet, KnowledgeInjection(TEXT_DIM, context_dims=(8,)))
    net = TextConditionedUNet(unet, KnowledgeInjection(TEXT_DIM, context_dims=unet.context_dims))
    x, t, _ = inputs(unet)
    with pytest.raises(ValueError, match="batch size 3"):
        net(x, t, torch.randn(3, 6, TEXT_DIM))

