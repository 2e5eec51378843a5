"""Batched sampling (issue 19): the U-Net's slab-wise decision is made per sample, not on the batch's total size."""

from __future__ import annotations

import pytest
import torch

from custom_components.networks.unet import CrossAttentionUNet3D


def _network() -> CrossAttentionUNet3D:
    return CrossAttentionUNet3D(2, 2, channels=(8, 8), cross_attention_levels=(False, False),
                                self_attention_levels=(False, False), norm_num_groups=4, num_head_channels=4).eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_a_batch_of_small_volumes_keeps_the_plain_pass(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    network = _network()
    one_sample_mib = 8 * 8**3 * 4 / 2**20
    # above one sample's top-level map, below the batch's: the batch must not switch to the slower slab-wise pass
    network.inference_slab_min_mib = 2 * one_sample_mib
    calls: list[int] = []
    monkeypatch.setattr(network, "_forward_in_slabs", lambda x, *args: calls.append(x.shape[0]) or torch.zeros(1))
    with torch.no_grad():
        out = network(torch.randn(batch, 2, 8, 8, 8), torch.ones(batch, dtype=torch.long))
    assert calls == [] and out.shape == (batch, 2, 8, 8, 8)
    network.inference_slab_min_mib = one_sample_mib  # one sample's map reaches the threshold: slab-wise at any batch
    with torch.no_grad():
        network(torch.randn(batch, 2, 8, 8, 8), torch.ones(batch, dtype=torch.long))
    assert calls == [batch]


def test_batched_samples_equal_the_samples_run_alone() -> None:
    """Batching changes the cost, not the result: each sample's output is the one it gets alone."""
    torch.manual_seed(0)
    network = _network()
    x, t = torch.randn(3, 2, 8, 8, 8), torch.tensor([5, 50, 500])
    with torch.no_grad():
        together = network(x, t)
        alone = torch.cat([network(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
