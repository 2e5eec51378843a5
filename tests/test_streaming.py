"""Streaming (slab-wise) encode/decode of the MaskGuidedAutoencoder: equal to the untiled pass within 1e-4 on odd
shapes, several slab sizes, with and without the mask pyramid, non-default intensity normalisation; every row of
every level computed once with bounded buffers; GroupNorm refused; the AutoencoderPipeline streams. Tiny widths
keep the file fast on CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from custom_components.errors import GuideGenInputError
from custom_components.networks import MaskGuidedAutoencoder
from custom_components.networks import streaming
from custom_components.networks.streaming import stream_decode, stream_encode

@pytest.fixture(autouse=True)
def _row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """No gathering of rows at coarse levels (which would take these small volumes whole): every stage runs slab by
    slab; test_gathering_rows_is_exact covers the gathering."""
    monkeypatch.setattr(streaming, "_MIN_VOXELS_PER_CALL", 0)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One thread: these many small convolutions only wait on each other's barriers with two (and a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY: dict[str, Any] = dict(channels=(8, 16, 32), num_res_blocks=(1, 2, 1), intensity_shift=-0.5, intensity_scale=0.25)


def random_ae(num_classes: int, **overrides: Any) -> MaskGuidedAutoencoder:
    """Random weights everywhere (norm affines included), so every path visibly reaches the output."""
    torch.manual_seed(0)
    net = MaskGuidedAutoencoder(num_classes=num_classes, **{**TINY, **overrides}).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def labels(shape: tuple[int, ...], num_classes: int, batch: int = 2, seed: int = 0) -> torch.Tensor | None:
    if not num_classes:
        return None
    return torch.randint(0, num_classes, (batch, 1, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_classes", [5, 0], ids=["mask-pyramid", "no-mask"])
@pytest.mark.parametrize("slab_rows", [1, 2, 4, 100])
def test_stream_decode_equals_untiled(num_classes: int, slab_rows: int) -> None:
    net = random_ae(num_classes)
    z = torch.randn(2, 4, 9, 5, 3, generator=torch.Generator().manual_seed(2))  # odd latent -> 36 x 20 x 12 image
    mask = labels((18, 10, 6), num_classes)  # half the image resolution: resampled
    with torch.no_grad():
        ref = net.decode(z, mask)
    out = stream_decode(net, z, mask, slab_rows=slab_rows)
    assert out.shape == ref.shape == (2, 1, 36, 20, 12)
    assert ref.std() > 0.02  # the comparison has teeth (outputs are scaled by intensity_scale 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_classes", [5, 0], ids=["mask-pyramid", "no-mask"])
@pytest.mark.parametrize("slab_rows", [1, 3, 4, 8, 100])
def test_stream_encode_equals_untiled(num_classes: int, slab_rows: int) -> None:
    net = random_ae(num_classes)
    x = torch.rand(2, 1, 36, 20, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1  # latent 9 x 5 x 3
    mask = labels((36, 20, 12), num_classes)
    with torch.no_grad():
        ref_mu, ref_sigma = net.encode(x, mask)
    z_mu, z_sigma = stream_encode(net, x, mask, slab_rows=slab_rows)
    assert z_mu.shape == ref_mu.shape == (2, 4, 9, 5, 3)
    assert ref_mu.std() > 0.05
    torch.testing.assert_close(z_mu, ref_mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(z_sigma, ref_sigma, atol=1e-4, rtol=1e-4)


def test_two_levels_and_default_intensity() -> None:
    """f = 2 (one down/upsampling), intensity (0, 1): the other branch of every optional step."""
    net = random_ae(3, channels=(8, 16), num_res_blocks=1, intensity_shift=0.0, intensity_scale=1.0)
    z = torch.randn(1, 4, 7, 3, 5)
    mask = labels((14, 6, 10), 3, batch=1)
    with torch.no_grad():
        ref = net.decode(z, mask)
        ref_mu, _ = net.encode(ref, mask)
    torch.testing.assert_close(stream_decode(net, z, mask, slab_rows=2), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(stream_encode(net, ref, mask, slab_rows=3)[0], ref_mu, atol=1e-4, rtol=0)


def _stages(stage: streaming._Stage) -> list[streaming._Stage]:
    """Every stage of a chain (sources first)."""
    found: list[streaming._Stage] = []

    def visit(s: streaming._Stage) -> None:
        for child in (getattr(s, "source", None), getattr(s, "h", None), getattr(s, "x", None)):
            if isinstance(child, streaming._Stage):
                visit(child)
        if s not in found:
            found.append(s)

    visit(stage)
    return found


def _macs(monkeypatch: pytest.MonkeyPatch, run: Any, phase_weights: set[int]) -> int:
    """Multiply-adds of every 3D convolution ``run()`` calls; convolutions whose weight is in ``phase_weights`` (the
    upsamplings' 3x3x3 post-convolutions, which streaming computes as 2x2x2 phase kernels) count 8 taps, not 27."""
    total = 0
    conv3d = torch.nn.functional.conv3d

    def counting(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal total
        out = conv3d(x, weight, *args, **kwargs)
        taps = weight.shape[1] * (8 if id(weight) in phase_weights else weight[0, 0].numel())
        total += out.numel() * taps
        return out

    torch.nn.functional.conv3d = counting
    try:
        with torch.no_grad():
            run()
    finally:
        torch.nn.functional.conv3d = conv3d
    return total


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_no_voxel_computed_twice(direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming does exactly the untiled pass's convolution work (the tiled pass recomputes its halos)."""
    net = random_ae(5)
    phase = {id(level.resample.postconv.conv.weight) for level in net.decoder.levels if level.resample is not None}
    z, x, mask = torch.randn(1, 4, 9, 5, 3), torch.rand(1, 1, 36, 20, 12), labels((36, 20, 12), 5, batch=1)
    if direction == "decode":
        untiled = _macs(monkeypatch, lambda: net.decode(z, mask), phase)
        streamed = _macs(monkeypatch, lambda: stream_decode(net, z, mask, slab_rows=1), set())
        # the phase kernels are 2x2x2: count the untiled post-convolutions with 8 taps as well
        assert streamed == untiled
    else:
        assert _macs(monkeypatch, lambda: stream_encode(net, x, mask, slab_rows=3), set()) == _macs(
            monkeypatch, lambda: net.encode(x, mask), set())


def _most_held(net: MaskGuidedAutoencoder, direction: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stream a volume of ``rows`` latent rows, one slab at a time; the most rows each buffer ever held."""
    held: dict[int, int] = {}
    append = streaming._Window.append

    def counting(self: streaming._Window, new: torch.Tensor) -> None:
        append(self, new)
        held[id(self)] = max(held.get(id(self), 0), self.buf.shape[2])

    streaming._Window.append = counting  # type: ignore[method-assign]
    size = (rows * 4, 12, 12)
    pyramid = net.mask_pyramid(labels(size, 5, batch=1), size)
    with torch.no_grad():
        if direction == "decode":
            root = streaming._decoder_stream(net, streaming._TensorRows(torch.randn(1, 4, rows, 3, 3), 1, torch.device("cpu"), torch.float32), pyramid)
        else:
            root = streaming._encoder_stream(net, streaming._TensorRows(torch.rand(1, 1, *size), 4, torch.device("cpu"), torch.float32), pyramid)
        try:
            produced = sum(rows.shape[2] for rows in root)
        finally:
            streaming._Window.append = append  # type: ignore[method-assign]
    assert produced == root.rows
    windows = [s.window for s in _stages(root) if hasattr(s, "window")]
    assert len(windows) > 10
    return [held[id(w)] for w in windows]


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_buffers_do_not_grow_with_the_volume(direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each convolution keeps only the rows later slabs still need: the same few rows per buffer for a volume of 9 and
    of 17 latent rows (decoding 1 latent row per step, encoding 4 image rows)."""
    net = random_ae(5)
    short, long = _most_held(net, direction, 9, monkeypatch), _most_held(net, direction, 17, monkeypatch)
    assert short == long
    assert max(long) <= 6, long


def test_group_norm_is_refused() -> None:
    net = MaskGuidedAutoencoder(num_classes=0, channels=(8, 16), num_res_blocks=1, norm="group", norm_num_groups=4)
    with pytest.raises(GuideGenInputError, match="norm='voxel'.*GroupNorm"):
        stream_decode(net, torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(GuideGenInputError, match="norm='voxel'"):
        stream_encode(net, torch.randn(1, 1, 4, 4, 4))


def test_errors_and_no_grad() -> None:
    net = random_ae(5)
    z = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    mask = labels((8, 8, 8), 5, batch=1)
    with pytest.raises(GuideGenInputError, match="slab_rows"):
        stream_decode(net, z, mask, slab_rows=0)
    with pytest.raises(GuideGenInputError, match="needs the label mask"):
        stream_decode(net, z)
    with pytest.raises(GuideGenInputError, match="divisible"):
        stream_encode(net, torch.randn(1, 1, 6, 8, 8), mask)
    assert not stream_decode(net, z, mask, slab_rows=2).requires_grad


def test_pipeline_streams_and_matches_untiled() -> None:
    """The AutoencoderPipeline (bundles, latent cache, text -> pair) encodes and decodes by streaming."""
    from custom_components.data.intensity import hu_to_unit, unit_to_hu
    from custom_components.pipelines import AutoencoderPipeline

    net = random_ae(5)
    pipeline = AutoencoderPipeline(net, encode_tile=5, decode_tile=2)
    ct = np.random.default_rng(0).uniform(-1000, 1000, (36, 20, 12)).astype(np.float32)
    mask = np.random.default_rng(1).integers(0, 5, (18, 10, 6))
    with torch.no_grad():
        ref_mu, _ = net.encode(hu_to_unit(torch.as_tensor(ct))[None, None], torch.as_tensor(mask)[None, None])
        ref = unit_to_hu(net.decode(ref_mu, torch.as_tensor(mask)[None, None]).clamp(-1, 1))
    latent = pipeline.encode(ct, mask)
    torch.testing.assert_close(latent, ref_mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(pipeline.decode(latent, mask), ref, atol=0.5, rtol=0)  # HU: 1e-4 of the [-1, 1] range


def test_pipeline_runs_group_norm_untiled_with_a_warning() -> None:
    from custom_components.pipelines import AutoencoderPipeline

    torch.manual_seed(0)
    net = MaskGuidedAutoencoder(num_classes=0, channels=(8, 16), num_res_blocks=1, norm="group", norm_num_groups=4).eval()
    pipeline = AutoencoderPipeline(net)
    z = torch.randn(1, 4, 3, 2, 2)
    with pytest.warns(UserWarning, match="GroupNorm.*whole volume"):
        out = pipeline.decode(z)
    with torch.no_grad():
        ref = net.decode(z)
    assert out.shape == (1, 1, 6, 4, 4)
    from custom_components.data.intensity import unit_to_hu

    torch.testing.assert_close(out, unit_to_hu(ref.clamp(-1, 1)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("least_voxels", [300, 1 << 15])
def test_gathering_rows_is_exact(least_voxels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages that gather rows until a convolution call has enough voxels (3 full-resolution rows of 12 x 12 here, or
    the default, which takes these small volumes whole) compute the same."""
    monkeypatch.setattr(streaming, "_MIN_VOXELS_PER_CALL", least_voxels)
    net = random_ae(5)
    z, mask = torch.randn(1, 4, 9, 3, 3), labels((36, 12, 12), 5, batch=1)
    with torch.no_grad():
        ref = net.decode(z, mask)
        ref_mu, _ = net.encode(ref, mask)
    torch.testing.assert_close(stream_decode(net, z, mask, slab_rows=1), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(stream_encode(net, ref, mask, slab_rows=1)[0], ref_mu, atol=1e-4, rtol=0)
