"""MaskGuidedAutoencoder, VoxelNorm and tiled encode/decode: shapes, the mask pyramid, errors, mask influence,
receptive radii, exact tiling, checkpointing and gradients. Tiny configurations (widths 8/16/32, one residual block,
16³-32³ volumes) keep the file fast on CPU."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from custom_components.errors import GuideGenInputError
from custom_components.networks import MaskGuidedAutoencoder, VoxelNorm, tiled_decode, tiled_encode

NUM_CLASSES = 5
TINY: dict[str, Any] = dict(channels=(8, 16, 32), num_res_blocks=1, norm_num_groups=4, num_classes=NUM_CLASSES)


def tiny_ae(**overrides: Any) -> MaskGuidedAutoencoder:
    torch.manual_seed(0)
    return MaskGuidedAutoencoder(**{**TINY, **overrides})


def randomize(net: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm affines included), so that every input path visibly reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net


def labels(shape: tuple[int, ...], batch: int = 1, seed: int = 0, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (batch, 1, *shape), generator=gen)


def image(shape: tuple[int, ...], batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, *shape, generator=gen)


def fusion_convs(net: MaskGuidedAutoencoder) -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    """(name, module, scale relative to full resolution) of every convolution that receives the one-hot mask."""
    found = [("encoder.conv_in", net.encoder.conv_in, 1)]
    for i, level in enumerate(net.encoder.levels):
        if level.fuse is not None:
            found.append((f"encoder.levels.{i}.fuse", level.fuse, 2**i))
    n = len(net.decoder.levels)
    for i, level in enumerate(net.decoder.levels):
        if level.fuse is not None:
            found.append((f"decoder.levels.{i}.fuse", level.fuse, 2 ** (n - 1 - i)))
    return found


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "overrides, spatial",
    [
        ({}, (16, 16, 16)),
        ({}, (16, 32, 24)),
        (dict(channels=(8, 16), num_res_blocks=(1, 2)), (8, 12, 10)),
        (dict(num_classes=0, latent_channels=3), (16, 16, 32)),
        (dict(norm="group", in_channels=2, out_channels=3), (16, 16, 16)),
    ],
    ids=["cubic", "non-cubic", "2-levels", "no-mask", "group-norm"],
)
def test_output_shapes(overrides: dict[str, Any], spatial: tuple[int, int, int]) -> None:
    net = tiny_ae(**overrides)
    f = net.downsample_factor
    assert f == 2 ** (len(net.channels) - 1)
    x = torch.randn(2, net.in_channels, *spatial)
    mask = labels(spatial, batch=2) if net.num_classes else None
    recon, z_mu, z_sigma = net(x, mask)
    latent = (2, net.latent_channels, *(s // f for s in spatial))
    assert net.latent_size(spatial) == latent[2:]
    assert z_mu.shape == z_sigma.shape == latent
    assert recon.shape == (2, net.out_channels, *spatial)
    assert (z_sigma > 0).all() and torch.isfinite(recon).all()
    assert net.decode(z_mu, mask).shape == recon.shape
    assert net.reconstruct(x, mask).shape == recon.shape


def test_paper_configuration() -> None:
    net = MaskGuidedAutoencoder()
    assert net.downsample_factor == 4 and net.latent_size((256, 256, 256)) == (64, 64, 64)
    assert net.num_classes == 20 and net.norm == "voxel"
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    # Counted by hand in the docstrings' rule (conv_in, fusions, 2 per block, down/up-sampling convs, out convs).
    assert net.encoder_receptive_radius == 43
    assert net.decoder_receptive_radius == 12


def test_no_mask_mode_has_no_fusion() -> None:
    net = tiny_ae(num_classes=0)
    assert all(level.fuse is None for level in [*net.encoder.levels, *net.decoder.levels])
    assert net.encoder.conv_in.conv.in_channels == 1
    assert net.mask_pyramid(None, (16, 16, 16)) is None
    recon, _, _ = net(image((16, 16, 16)))
    assert recon.shape == (1, 1, 16, 16, 16)


# ---------------------------------------------------------------------------------------------- mask pyramid


@pytest.mark.parametrize("mask_scale", [1.0, 0.5], ids=["full-res-mask", "half-res-mask"])
def test_mask_pyramid_reaches_every_level(mask_scale: float) -> None:
    net = tiny_ae()
    spatial = (16, 32, 24)
    mask = labels(tuple(int(s * mask_scale) for s in spatial), batch=2)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0].detach()))
        for name, module, _ in fusion_convs(net)
    ]
    try:
        net(image(spatial, batch=2), mask)
    finally:
        for h in hooks:
            h.remove()
    # 1 (conv_in) + 2 encoder fusions + 3 decoder fusions for 3 levels.
    assert len(captured) == 6
    for name, _, scale in fusion_convs(net):
        level_size = tuple(s // scale for s in spatial)
        onehot = captured[name][:, -NUM_CLASSES:]
        assert onehot.shape == (2, NUM_CLASSES, *level_size), name
        expected = F.interpolate(mask.float(), size=level_size, mode="nearest").long()
        torch.testing.assert_close(onehot, F.one_hot(expected[:, 0], NUM_CLASSES).movedim(-1, 1).float(), msg=name)
    pyramid = net.mask_pyramid(mask, spatial)
    assert pyramid is not None and [p.shape[2:] for p in pyramid] == [(16, 32, 24), (8, 16, 12), (4, 8, 6)]


def test_mask_dtypes_are_accepted() -> None:
    net = tiny_ae().eval()
    x, mask = image((16, 16, 16)), labels((16, 16, 16))
    with torch.no_grad():
        ref = net.reconstruct(x, mask)
        for other in (mask.float(), mask.to(torch.uint8), mask.int()):
            torch.testing.assert_close(net.reconstruct(x, other), ref)
        binary = tiny_ae(num_classes=2).eval()
        binary.reconstruct(x, mask > 2)


def test_mask_changes_the_output() -> None:
    net = randomize(tiny_ae()).eval()
    x = image((16, 16, 16))
    with torch.no_grad():
        a = net.reconstruct(x, labels((16, 16, 16), seed=1))
        b = net.reconstruct(x, labels((16, 16, 16), seed=2))
        z = torch.randn(1, 4, 4, 4, 4)
        da = net.decode(z, labels((16, 16, 16), seed=1))
        db = net.decode(z, labels((16, 16, 16), seed=2))
    assert (a - b).abs().max() > 1e-2
    assert (da - db).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, call, match",
    [
        (dict(num_classes=0), lambda n: n(image((16,) * 3), labels((16,) * 3)), "num_classes=0"),
        ({}, lambda n: n(image((16,) * 3)), "needs the label mask"),
        ({}, lambda n: n.decode(torch.randn(1, 4, 4, 4, 4)), "needs the label mask"),
        ({}, lambda n: n(image((16,) * 3), labels((16,) * 3, num_classes=7)), "max 6.*trained with"),
        ({}, lambda n: n(image((16,) * 3), labels((16,) * 3) - 1), r"\[0, 5\)"),
        ({}, lambda n: n(image((16,) * 3), labels((16,) * 3).float() + 0.5), "non-integer"),
        ({}, lambda n: n(image((18, 16, 16)), labels((16,) * 3)), r"\(18, 16, 16\).*f=4.*pad"),
        ({}, lambda n: n.latent_size((16, 16, 10)), "f=4"),
        ({}, lambda n: n(image((16,) * 3, batch=2), labels((16,) * 3)), "batch size 1"),
        ({}, lambda n: n(image((16,) * 3), labels((16,) * 3)[:, 0]), r"\(B, 1, H, W, D\)"),
        ({}, lambda n: n(torch.randn(1, 2, 16, 16, 16), labels((16,) * 3)), "in_channels=1"),
        ({}, lambda n: n.decode(torch.randn(1, 3, 4, 4, 4), labels((16,) * 3)), "latent_channels=4"),
    ],
    ids=[
        "mask-without-classes", "missing-mask", "missing-mask-decode", "class-too-large", "negative-class",
        "fractional-mask", "indivisible-image", "indivisible-latent-size", "batch-mismatch", "mask-ndim",
        "image-channels", "latent-channels",
    ],
)  # fmt: skip
def test_input_errors(overrides: dict[str, Any], call: Any, match: str) -> None:
    net = tiny_ae(**overrides)
    with pytest.raises(GuideGenInputError, match=match):
        call(net)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(norm="group", channels=(8, 12, 16), norm_num_groups=8), "divisible by norm_num_groups"),
        (dict(norm="batch"), "norm must be one of"),
        (dict(num_res_blocks=(1, 2)), "one int >= 1 per level"),
        (dict(num_classes=-1), "num_classes"),
        (dict(channels=()), "non-empty"),
    ],
    ids=["group-indivisible", "bad-norm", "res-blocks-length", "negative-classes", "no-levels"],
)
def test_config_errors(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(GuideGenInputError, match=match):
        tiny_ae(**overrides)


def test_voxel_norm_ignores_group_divisibility() -> None:
    net = tiny_ae(channels=(8, 12, 16), norm_num_groups=32)
    assert any(isinstance(m, VoxelNorm) for m in net.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())


# ---------------------------------------------------------------------------------------------- VoxelNorm


def test_voxel_norm_is_a_per_voxel_layer_norm() -> None:
    norm = VoxelNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 4, 3) * 3 + 1
    ref = F.layer_norm(x.permute(0, 2, 3, 4, 1), (6,), norm.weight, norm.bias, 1e-5).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(norm(x), ref)
    # No spatial statistics: a crop is normalised exactly like the same region of the whole volume.
    torch.testing.assert_close(norm(x[:, :, 1:3, :2]), norm(x)[:, :, 1:3, :2])


# ---------------------------------------------------------------------------------------------- receptive radii


def test_receptive_radii_bound_the_real_dependency() -> None:
    """Perturb one input voxel and check that nothing moves beyond the advertised radius (and that it is tight)."""
    net = randomize(tiny_ae()).double().eval()
    f, n = net.downsample_factor, 28
    mask = labels((n * f, 8, 8))
    with torch.no_grad():
        z = torch.randn(1, 4, n, 2, 2, dtype=torch.float64)
        bumped = z.clone()
        bumped[:, :, n // 2] += 1
        changed = (net.decode(z, mask) - net.decode(bumped, mask)).abs().amax(dim=(0, 1, 3, 4)) > 0
        latent_offsets = changed.nonzero().flatten() // f - n // 2
        assert latent_offsets.abs().max() <= net.decoder_receptive_radius
        assert latent_offsets.abs().max() >= net.decoder_receptive_radius - 1

        x = torch.randn(1, 1, n * f, 8, 8, dtype=torch.float64)
        z_mu = net.encode(x, mask)[0]
        farthest = 0
        for p in range(n * f // 2, n * f // 2 + f):  # every position of the bumped voxel inside a latent voxel
            bumped_x = x.clone()
            bumped_x[:, :, p] += 1
            changed = (z_mu - net.encode(bumped_x, mask)[0]).abs().amax(dim=(0, 1, 3, 4)) > 0
            # Image distance from the bumped voxel to the region each changed latent voxel covers.
            j = changed.nonzero().flatten()
            farthest = max(farthest, int(torch.maximum(j * f - p, p - ((j + 1) * f - 1)).clamp(min=0).max()))
        assert net.encoder_receptive_radius - 2 <= farthest <= net.encoder_receptive_radius


# ---------------------------------------------------------------------------------------------- tiling


def test_tiled_decode_is_exact() -> None:
    net = randomize(tiny_ae()).eval()
    f, radius = net.downsample_factor, net.decoder_receptive_radius
    # The first axis is longer than tile + radius, so the outer tiles' inputs really are crops of the latent; the
    # tiles are uneven on the other axes (3 -> 2 + 1).
    z = torch.randn(2, 4, 16, 3, 3)
    assert 16 > 4 + radius
    mask = labels((16 * f // 2, 3 * f // 2, 3 * f // 2), batch=2)  # half the image resolution: resampled
    with torch.no_grad():
        ref = net.decode(z, mask)
    out = tiled_decode(net, z, mask, tile_size=(4, 2, 3))
    assert out.shape == ref.shape == (2, 1, 64, 12, 12)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # The test has teeth: no halo for the fine levels leaves seams.
    assert (tiled_decode(net, z, mask, tile_size=(4, 2, 3), halo=0) - ref).abs().max() > 1e-3


def test_two_pass_decoding_needs_a_smaller_halo_for_the_fine_levels() -> None:
    net = tiny_ae()
    assert net.decoder_tail_receptive_radius < net.decoder_receptive_radius
    assert net.decoder_head_receptive_radius <= net.decoder_receptive_radius
    paper = MaskGuidedAutoencoder(num_classes=20, channels=(96, 192, 384), num_res_blocks=2)
    assert (paper.decoder_receptive_radius, paper.decoder_tail_receptive_radius) == (12, 6)


def test_tiled_encode_is_exact() -> None:
    net = randomize(tiny_ae()).eval()
    # The encoder radius (29 image voxels) rounds up to a halo of 32: the first and last tiles along the first axis
    # see crops; 18 rounds down to 16, and the last axis is uneven (12 -> 8 + 4).
    x = image((64, 16, 12))
    mask = labels((32, 8, 6))  # half resolution
    with torch.no_grad():
        ref_mu, ref_sigma = net.encode(x, mask)
    z_mu, z_sigma = tiled_encode(net, x, mask, tile_size=(18, 8, 8))
    torch.testing.assert_close(z_mu, ref_mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(z_sigma, ref_sigma, atol=1e-4, rtol=1e-4)
    assert (tiled_encode(net, x, mask, tile_size=(16, 8, 8), halo=4)[0] - ref_mu).abs().max() > 1e-3


def test_tiled_without_mask() -> None:
    net = randomize(tiny_ae(num_classes=0)).eval()
    z = torch.randn(1, 4, 10, 2, 2)
    with torch.no_grad():
        ref = net.decode(z)
        ref_mu, _ = net.encode(ref)
    torch.testing.assert_close(tiled_decode(net, z, tile_size=4), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(tiled_encode(net, ref, tile_size=16)[0], ref_mu, atol=1e-4, rtol=0)


def test_tiling_errors() -> None:
    net = tiny_ae()
    x, mask = image((16, 16, 16)), labels((16, 16, 16))
    with pytest.raises(GuideGenInputError, match="smaller than the downsampling factor f=4"):
        tiled_encode(net, x, mask, tile_size=3)
    with pytest.raises(GuideGenInputError, match="tile_size"):
        tiled_decode(net, torch.randn(1, 4, 4, 4, 4), mask, tile_size=(4, 4))
    with pytest.raises(GuideGenInputError, match="halo"):
        tiled_decode(net, torch.randn(1, 4, 4, 4, 4), mask, halo=-1)
    with pytest.raises(GuideGenInputError, match="needs the label mask"):
        tiled_decode(net, torch.randn(1, 4, 4, 4, 4))


def test_group_norm_tiling_warns() -> None:
    net = tiny_ae(norm="group").eval()
    z, mask = torch.randn(1, 4, 4, 2, 2), labels((16, 8, 8))
    with pytest.warns(UserWarning, match="GroupNorm statistics"):
        out = tiled_decode(net, z, mask, tile_size=2)
    assert out.shape == (1, 1, 16, 8, 8)
    with pytest.warns(UserWarning, match="norm='voxel'"):
        tiled_encode(net, out, mask, tile_size=8)
    # A single tile is the untiled pass: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiled_decode(net, z, mask, tile_size=4)


def test_tiling_runs_without_grad() -> None:
    net = tiny_ae()
    z = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    assert not tiled_decode(net, z, labels((8, 8, 8)), tile_size=1).requires_grad


# ---------------------------------------------------------------------------------------------- training


def _loss_and_grads(net: MaskGuidedAutoencoder, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    net.zero_grad()
    torch.manual_seed(3)  # same reparameterisation noise in both runs
    recon, z_mu, z_sigma = net(x, mask)
    loss = (recon - x).abs().mean() + 1e-3 * (z_mu.pow(2) + z_sigma.pow(2)).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_gradients() -> None:
    net = randomize(tiny_ae(), scale=0.1)
    x, mask = image((16, 16, 16)), labels((16, 16, 16))
    plain = _loss_and_grads(net, x, mask)
    net.use_checkpointing = True
    checkpointed = _loss_and_grads(net, x, mask)
    assert plain.keys() == checkpointed.keys() == {n for n, _ in net.named_parameters()}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_checkpointed_training_keeps_no_upsampled_fused_or_head_copies() -> None:
    """What a checkpointed forward keeps for the backward pass at full resolution (issue 19: paper-size training
    memory): the image with its one-hot mask (``conv_in``'s input) and the inputs of the residual blocks and the output
    head that follow another block (``channels[0]`` maps), nothing else. The decoder's upsampled map, the fusion's
    concatenated input and output (each the width of the level below, or more) and the head's normalised and
    activated copies are recomputed in the backward pass; the gradients are unchanged (test above).
    """
    net = randomize(tiny_ae(num_res_blocks=2), scale=0.1)
    net.use_checkpointing = True
    x, mask = image((16, 16, 16)), labels((16, 16, 16))
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:  # float maps only: the uint8 class indices cost little
        if tensor.ndim == 5 and tensor.shape[2:] == x.shape[2:] and tensor.is_floating_point():
            kept[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x, mask)
    channels = sorted(int(tensor.shape[1]) for tensor in kept.values())
    width = TINY["channels"][0]
    # encoder: conv_in's input (image + one-hot), its output and the first block's (the blocks' inputs);
    # decoder: the first block's output (the second block's input) and the second's (the head's input)
    assert channels == [1 + NUM_CLASSES] + [width] * 4, channels


def test_gradients_reach_the_fusion_convs() -> None:
    net = tiny_ae()
    grads = _loss_and_grads(net, image((16, 16, 16)), labels((16, 16, 16)))
    fused = [name for name in grads if ".fuse." in name and name.endswith("weight")]
    assert len(fused) == 5  # 2 encoder + 3 decoder levels
    for name in fused:
        assert grads[name].abs().sum() > 0, name
    assert grads["encoder.conv_in.conv.weight"][:, 1:].abs().sum() > 0  # the one-hot channels of conv_in


# ---------------------------------------------------------------------------------------------- intensity normalisation


def test_intensity_normalisation_is_an_affine_map_around_the_networks() -> None:
    """With (shift, scale) the encoder sees (x - shift) / scale and the output is mapped back: the same weights
    give exactly the plain network's latent of the normalised image, and its output rescaled."""
    plain = randomize(tiny_ae()).eval()
    normalised = randomize(tiny_ae(intensity_shift=-0.5, intensity_scale=0.25)).eval()
    x, mask = image((16, 16, 16)), labels((16, 16, 16))
    with torch.no_grad():
        mu, _ = normalised.encode(x, mask)
        mu_ref, _ = plain.encode((x + 0.5) / 0.25, mask)
        torch.testing.assert_close(mu, mu_ref)
        torch.testing.assert_close(normalised.decode(mu, mask), plain.decode(mu, mask) * 0.25 - 0.5)
        assert (normalised.reconstruct(x, mask) - plain.reconstruct(x, mask)).abs().max() > 1e-2


def test_intensity_normalisation_keeps_tiling_exact() -> None:
    net = randomize(tiny_ae(intensity_shift=-0.5, intensity_scale=0.25)).eval()
    z, mask = torch.randn(1, 4, 12, 3, 3), labels((48, 12, 12))
    x = image((48, 16, 12))
    with torch.no_grad():
        ref = net.decode(z, mask)
        ref_mu, _ = net.encode(x, labels((48, 16, 12)))
    torch.testing.assert_close(tiled_decode(net, z, mask, tile_size=(4, 2, 3)), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(tiled_encode(net, x, labels((48, 16, 12)), tile_size=(18, 8, 8))[0], ref_mu, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shift, scale", [(0.0, 0.0), (0.0, -1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_intensity_normalisation_errors(shift: float, scale: float) -> None:
    with pytest.raises(GuideGenInputError, match="intensity_scale"):
        tiny_ae(intensity_shift=shift, intensity_scale=scale)
