"""Slab-wise inference of the diffusion U-Net (custom_components.networks.slabs) equals the plain forward pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from monai.networks.blocks import Upsample
from torch import nn

from custom_components.networks import unet as unet_module
from custom_components.networks.layers import same_conv3d
from custom_components.networks.slabs import (
    LazyRows,
    conv_in_slabs,
    conv_rows,
    group_norm_scale_shift,
    materialize,
    upsample_conv_rows,
)
from custom_components.networks.unet import CrossAttentionUNet3D


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (the U-Net zero-initialises its output and attention projections)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


SLAB_FUNCTIONS = ("resblock_in_slabs", "cross_attention_in_slabs", "conv_in_slabs", "norm_silu_conv_in_slabs",
                  "conv_rows", "upsample_conv_rows")


@pytest.fixture
def slab_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of each slab-wise function by the U-Net (counted where unet.py looks them up)."""
    calls = dict.fromkeys(SLAB_FUNCTIONS, 0)

    def counted(name: str) -> Any:
        original = getattr(unet_module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in SLAB_FUNCTIONS:
        monkeypatch.setattr(unet_module, name, counted(name))
    return calls


def _units(network: CrossAttentionUNet3D) -> list[nn.Module]:
    """The U-Net's residual units (each a residual block, then optional self- and cross-attention)."""
    return [u for part in (network.encoder, network.decoder) for level in part for u in level.units] + list(network.middle)


LAYOUTS: list[dict[str, Any]] = [
    # the paper's layout in small: attention-free top level, cross-attention below, self-attention at the bottom
    {"channels": (8, 16, 16), "cross_attention_levels": (False, True, True), "self_attention_levels": (False, False, True)},
    # cross-attention at the top level too, and context sizes other than the widths
    {"channels": (8, 16), "cross_attention_levels": (True, True), "self_attention_levels": (False, True), "context_dims": (6, 10)},
    # no attention anywhere but the middle block, two residual blocks per level
    {"channels": (8, 8), "cross_attention_levels": (False, False), "self_attention_levels": (False, False), "num_res_blocks": 2},
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("slab_rows", [1, 3, 64])
def test_slab_inference_equals_the_plain_forward(layout: dict[str, Any], slab_rows: int, slab_calls: dict[str, int]) -> None:
    kwargs = {"num_res_blocks": 1, "norm_num_groups": 4, "num_head_channels": 4, **layout}
    # inference_slab_min_mib=0: these small inputs (far below the default 64 MiB) take the slab path
    network = _randomize(CrossAttentionUNet3D(5, 3, inference_slab_rows=slab_rows, inference_slab_min_mib=0, **kwargs))
    levels = len(kwargs["channels"])
    x = torch.randn(2, 5, 12 * 2 ** (levels - 2), 8, 4 * 2 ** (levels - 1))  # uneven axes; odd row counts below
    t = torch.tensor([3, 700])
    contexts = [None if d is None else torch.randn(2, 4, d) for d in network.context_dims]
    with torch.no_grad():
        slabs = network(x, t, contexts)
    # every residual block (encoder, middle, decoder units) ran slab-wise, and the head and input convolution did
    assert slab_calls["resblock_in_slabs"] == len(_units(network)) and slab_calls["norm_silu_conv_in_slabs"] == 1
    assert slab_calls["conv_rows"] == 1 and slab_calls["upsample_conv_rows"] == levels - 1
    assert slab_calls["cross_attention_in_slabs"] == sum(u.cross_attn is not None for u in _units(network))
    before = dict(slab_calls)
    network.inference_slab_rows = None
    with torch.no_grad():
        plain = network(x, t, contexts)
    assert slab_calls == before  # the reference really is the plain pass
    assert slabs.shape == plain.shape
    assert plain.abs().max() > 0.1  # the comparison is not between two zero tensors
    torch.testing.assert_close(slabs, plain, atol=2e-5, rtol=1e-4)


def test_training_uses_the_plain_forward_with_gradients() -> None:
    network = _randomize(CrossAttentionUNet3D(2, 2, channels=(8, 8), cross_attention_levels=(False, False),
                                              self_attention_levels=(False, False), norm_num_groups=4, num_head_channels=4))
    x = torch.randn(1, 2, 8, 8, 8)
    out = network(x, torch.tensor([5]))
    out.square().mean().backward()
    assert all(p.grad is not None for p in network.parameters())


def test_bad_slab_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="inference_slab_rows"):
        CrossAttentionUNet3D(2, 2, channels=(8, 8), norm_num_groups=4, num_head_channels=4, inference_slab_rows=0)


@pytest.mark.parametrize("num_groups", [1, 2, 6])
def test_group_norm_statistics_over_concatenated_parts(num_groups: int) -> None:
    norm = _randomize(nn.GroupNorm(num_groups, 6, eps=1e-6))
    a, b = torch.randn(2, 4, 5, 3, 4) * 3 + 1, torch.randn(2, 2, 5, 3, 4)
    lazy_b = LazyRows(tuple(b.shape), lambda lo, hi: b[:, :, lo:hi])
    scale, shift = group_norm_scale_shift(norm, [a, lazy_b], slab_rows=2)
    x = torch.cat([a, b], 1)
    torch.testing.assert_close(x * scale + shift, norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("slab_rows", [1, 2, 5])
def test_conv_in_slabs_equals_the_convolution(stride: int, slab_rows: int) -> None:
    conv = _randomize(nn.Conv3d(3, 4, 3, stride=stride, padding=1))
    x = torch.randn(1, 3, 9, 6, 5)
    bias = torch.randn(1, 4)
    extra = torch.randn(1, 4, *conv(x).shape[2:])
    out = conv_in_slabs(conv, lambda lo, hi: x[:, :, lo:hi], x.shape[2], slab_rows, channel_bias=bias,
                        residual=lambda lo, hi: extra[:, :, lo:hi])
    torch.testing.assert_close(out, conv(x) + bias[..., None, None, None] + extra, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slab_rows", [1, 2, 4, 7])
def test_conv_in_slabs_may_overwrite_its_own_input(slab_rows: int) -> None:
    conv = _randomize(nn.Conv3d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 7, 5, 6)
    expected = conv(torch.tanh(x)).detach()
    buffer = x.clone()
    out = conv_in_slabs(conv, lambda lo, hi: torch.tanh(buffer[:, :, lo:hi]), 7, slab_rows, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 4])
def test_lazy_upsampling_equals_monais_upsample(rows: int) -> None:
    upsample = _randomize(Upsample(spatial_dims=3, in_channels=3, out_channels=3, scale_factor=2.0, mode="nontrainable",
                                   interp_mode="nearest", align_corners=None, post_conv=same_conv3d(3, 5, 3)))
    low = torch.randn(2, 3, rows, 4, 3)
    lazy = upsample_conv_rows(upsample, low)
    expected = upsample(low).detach()
    assert lazy.shape == tuple(expected.shape)
    torch.testing.assert_close(materialize(lazy, 3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lazy.compute(1, 4), expected[:, :, 1:4], atol=1e-5, rtol=1e-5)


def test_lazy_convolution_rows() -> None:
    conv = _randomize(same_conv3d(2, 3, 3))
    x = torch.randn(1, 2, 6, 4, 4)
    lazy = conv_rows(conv, x)
    torch.testing.assert_close(lazy.compute(2, 5), conv(x)[:, :, 2:5].detach(), atol=1e-5, rtol=1e-5)


def test_one_hot_input_may_be_uint8() -> None:
    network = _randomize(CrossAttentionUNet3D(4, 2, channels=(8, 8), cross_attention_levels=(False, False),
                                              self_attention_levels=(False, False), norm_num_groups=4, num_head_channels=4,
                                              inference_slab_min_mib=0))
    labels = torch.randint(0, 4, (1, 1, 8, 8, 8))
    one_hot = torch.zeros(1, 4, 8, 8, 8).scatter_(1, labels, 1.0)
    t = torch.tensor([10])
    with torch.no_grad():
        expected = network(one_hot, t)
        assert torch.equal(network(one_hot.to(torch.uint8), t), expected)
        network.inference_slab_rows = None
        torch.testing.assert_close(network(one_hot.to(torch.uint8), t), expected, atol=2e-5, rtol=1e-4)


def test_small_volumes_take_the_plain_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    network = CrossAttentionUNet3D(2, 2, channels=(8, 8), cross_attention_levels=(False, False),
                                   self_attention_levels=(False, False), norm_num_groups=4, num_head_channels=4).eval()
    calls: list[int] = []
    monkeypatch.setattr(network, "_forward_in_slabs", lambda *args: calls.append(1) or torch.zeros(1))
    with torch.no_grad():
        network(torch.randn(1, 2, 8, 8, 8), torch.tensor([1]))
        assert calls == []  # 8 channels x 8^3 voxels: far below the default 64 MiB
        network.inference_slab_min_mib = 0
        network(torch.randn(1, 2, 8, 8, 8), torch.tensor([1]))
        assert calls == [1]


def test_the_memory_threshold_decides_the_path(slab_calls: dict[str, int]) -> None:
    """At the default 64 MiB an 8³ input takes the plain pass; lowered to that input's own top-level feature map
    (batch x channels[0] x voxels x 4 bytes) it takes the slab path, with the same result."""
    network = _randomize(CrossAttentionUNet3D(2, 2, channels=(8, 8), cross_attention_levels=(False, True),
                                              self_attention_levels=(False, False), norm_num_groups=4, num_head_channels=4))
    x, t, contexts = torch.randn(1, 2, 8, 8, 8), torch.tensor([1]), [None, torch.randn(1, 3, 8)]
    top_level_mib = 1 * 8 * 8**3 * 4 / 2**20
    with torch.no_grad():
        plain = network(x, t, contexts)
        assert network.inference_slab_min_mib == 64.0 and sum(slab_calls.values()) == 0
        network.inference_slab_min_mib = top_level_mib * 1.001
        network(x, t, contexts)
        assert sum(slab_calls.values()) == 0  # just above this input: still plain
        network.inference_slab_min_mib = top_level_mib
        slabs = network(x, t, contexts)
    assert slab_calls["resblock_in_slabs"] == len(_units(network)) > 0
    assert slab_calls["cross_attention_in_slabs"] == sum(u.cross_attn is not None for u in _units(network)) > 0
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(slabs, plain, atol=2e-5, rtol=1e-4)
