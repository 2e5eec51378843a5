"""Checkpointed residual blocks recompute their norm + SiLU pairs (issue 19: paper-size training memory).

Under gradient checkpointing the training peak sits in the backward pass, while one block's forward is recomputed
and keeps what its own backward needs. Plainly that is, per norm, the norm's input, the normalised map (SiLU's
input) and the activated map (the convolution's input); with ``norm_silu``'s nested checkpoint the normalised map is
not kept. These tests pin that, for the U-Net's and the autoencoder's blocks, and that nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from custom_components.networks import MaskGuidedAutoencoder
from custom_components.networks import autoencoder as autoencoder_module
from custom_components.networks import unet as unet_module
from custom_components.networks.layers import norm_silu


def _unet(use_checkpointing: bool) -> unet_module.CrossAttentionUNet3D:
    torch.manual_seed(0)
    return unet_module.CrossAttentionUNet3D(3, 2, channels=(8, 16), num_res_blocks=1, cross_attention_levels=(False, True),
                                            self_attention_levels=(False, False), num_head_channels=8, norm_num_groups=4,
                                            use_checkpointing=use_checkpointing)


def _autoencoder(use_checkpointing: bool) -> MaskGuidedAutoencoder:
    torch.manual_seed(0)
    return MaskGuidedAutoencoder(num_classes=3, channels=(8, 16), num_res_blocks=1, latent_channels=2,
                                 use_checkpointing=use_checkpointing)


@pytest.mark.parametrize(("build", "block_type"), [(_unet, unet_module._ResBlock), (_autoencoder, autoencoder_module._ResBlock)])
def test_use_checkpointing_reaches_every_block_and_stays_settable(build, block_type) -> None:
    for flag in (True, False):
        net = build(flag)
        blocks = [m for m in net.modules() if isinstance(m, block_type)]
        assert blocks and all(b.recompute_norms is flag for b in blocks)
        net.use_checkpointing = not flag
        assert net.use_checkpointing is (not flag) and all(b.recompute_norms is (not flag) for b in blocks)


def _block_call(block: torch.nn.Module) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    channels = block.norm1.weight.shape[0]
    x = torch.randn(1, channels, 6, 6, 6, generator=gen, requires_grad=True)
    if isinstance(block, unet_module._ResBlock):
        emb = torch.randn(1, block.time_emb_proj.in_features, generator=gen)
        return x, lambda: block(x, emb)
    return x, lambda: block(x)


@pytest.mark.parametrize("block", [unet_module._ResBlock(8, 4, 16, 4), autoencoder_module._ResBlock(8, 4, "voxel", 1, 1e-6)],
                         ids=["unet", "autoencoder"])
def test_recomputed_norms_keep_no_normalised_map_and_give_the_same_gradients(block: torch.nn.Module) -> None:
    with torch.no_grad():  # non-trivial affine parameters
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, call = _block_call(block.train())
    normalised: list[torch.Tensor] = []  # held, so no later tensor can reuse their storage
    hooks = [n.register_forward_hook(lambda m, a, out: normalised.append(out)) for n in (block.norm1, block.norm2)]
    results = {}
    for recompute in (False, True):
        block.recompute_norms = recompute
        normalised.clear()
        saved: set[int] = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = call()
        kept = [n for n in normalised if n.untyped_storage().data_ptr() in saved]
        grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
        results[recompute] = (len(kept), out.detach(), grads)
    for hook in hooks:
        hook.remove()
    assert results[False][0] == 2  # plainly, SiLU keeps both normalised maps (so this test can fail)
    assert results[True][0] == 0
    torch.testing.assert_close(results[True][1], results[False][1], atol=0, rtol=0)
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_norm_silu_without_recompute_or_gradients_is_the_plain_pair() -> None:
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 3, 3, 3)
    expected = torch.nn.functional.silu(norm(x))
    torch.testing.assert_close(norm_silu(norm, x), expected, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(norm_silu(norm, x, recompute=True), expected, atol=0, rtol=0)
