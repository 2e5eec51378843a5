"""Untrained model files for all three stages, in the exact format training writes.

Time and memory of the chain do not depend on the weights, so the benchmarks measure paper-scale inference with
randomly initialised networks at the paper's widths, and the tests exercise the chain on tiny ones, without training.
What these files generate is noise; nothing else in the product uses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from custom_components.data.class_map import ClassMap, load_class_map

__all__ = ["PAPER_ARCHITECTURES", "TINY_ARCHITECTURES", "write_untrained_models"]

# The widths of each bundle's train.yaml (the paper's configuration).
PAPER_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tcss": {"channels": [64, 128, 256, 512], "num_res_blocks": 2, "cross_attention_levels": [False, True, True, True],
             "self_attention_levels": [False, False, False, True], "num_head_channels": 32, "norm_num_groups": 32,
             "num_queries": 16, "injection_dim": 256, "injection_layers": 2, "injection_heads": 8},
    "autoencoder": {"channels": [96, 192, 384], "num_res_blocks": 2, "latent_channels": 4, "norm": "voxel", "norm_num_groups": 32},
    "ldm": {"channels": [64, 128, 256, 512], "num_res_blocks": 2, "cross_attention_levels": [False, True, True, True],
            "self_attention_levels": [False, False, False, True], "num_head_channels": 32, "norm_num_groups": 32,
            "num_queries": 16, "injection_dim": 256, "injection_layers": 2, "injection_heads": 8},
}

# Overrides of PAPER_ARCHITECTURES small enough for seconds-long smoke runs on a CPU (benchmark dry runs): a 16³ mask,
# a 32³ CT (8³ latents with 2 channels).
TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tcss": {"channels": [8, 16], "num_res_blocks": 1, "cross_attention_levels": [False, True], "self_attention_levels": [False, False],
             "num_head_channels": 8, "norm_num_groups": 4, "num_queries": 4, "injection_dim": 16, "injection_layers": 1, "injection_heads": 2},
    "autoencoder": {"channels": [8, 8, 16], "num_res_blocks": 1, "latent_channels": 2, "norm_num_groups": 4},
    "ldm": {"channels": [8, 16], "num_res_blocks": 1, "cross_attention_levels": [False, True], "self_attention_levels": [False, False],
            "num_head_channels": 8, "norm_num_groups": 4, "num_queries": 4, "injection_dim": 16, "injection_layers": 1, "injection_heads": 2},
}


def _save(network: torch.nn.Module, info: Mapping[str, Any], path: Path) -> Path:
    from custom_components.engines.checkpoints import write_model_file

    return write_model_file(path, network.state_dict(), info)  # the layout training writes (what ckpt_export reads)


def write_untrained_models(
    folder: str | os.PathLike,
    mask_size: Sequence[int] = (128, 128, 128),
    image_size: Sequence[int] = (256, 256, 256),
    architectures: Mapping[str, Mapping[str, Any]] | None = None,
    class_map: ClassMap | None = None,
    mask_spacing_mm: Sequence[float] = (3.0, 3.0, 3.0),
    text_dim: int = 384,
    num_train_timesteps: int = 1000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``tcss.pt``, ``autoencoder.pt`` and ``ldm.pt`` (randomly initialised) into ``folder``.

    Args:
        folder: destination.
        mask_size: TCSS / latent-generator mask size (paper 128³).
        image_size: CT size the autoencoder decodes to (paper 256³); latent = image / 4 per axis.
        architectures: stage -> architecture overrides (default: :data:`PAPER_ARCHITECTURES`).
        class_map: default GuideGen's 20 classes.
        mask_spacing_mm: spacing recorded for generated masks.
        text_dim: text encoder width (all-MiniLM-L6-v2: 384).
        num_train_timesteps: diffusion steps recorded for both diffusion stages.
        seed: initialisation seed.

    Returns:
        stage -> model file.
    """
    from custom_components.data.io import file_digest
    from custom_components.networks import MaskGuidedAutoencoder, build_latent_denoiser, build_text_conditioned_unet

    folder = Path(folder)
    class_map = class_map or load_class_map(None)
    n = class_map.num_classes
    arch = {stage: dict(PAPER_ARCHITECTURES[stage], **dict((architectures or {}).get(stage, {}))) for stage in PAPER_ARCHITECTURES}
    common = {"num_classes": n, "class_map_name": class_map.name, "class_names": list(class_map.class_names)}
    mask_size, image_size = [int(s) for s in mask_size], [int(s) for s in image_size]
    torch.manual_seed(seed)
    files: dict[str, Path] = {}

    tcss = build_text_conditioned_unet(in_channels=n, out_channels=n, text_dim=text_dim, **arch["tcss"])
    files["tcss"] = _save(tcss, {"stage": "tcss", **common, "architecture": arch["tcss"], "mask_size": mask_size,
                                 "num_train_timesteps": num_train_timesteps, "mask_spacing_mm": list(mask_spacing_mm),
                                 "text_encoder": "untrained chain"}, folder / "tcss.pt")
    del tcss

    autoencoder = MaskGuidedAutoencoder(num_classes=n, **arch["autoencoder"])
    spacing_ratio = [m / i for m, i in zip(mask_size, image_size)]
    files["autoencoder"] = _save(autoencoder, {"stage": "autoencoder", **common, "architecture": arch["autoencoder"], "mask_input": True,
                                               "image_size": image_size, "patch_size": image_size, "hdr": {},
                                               "image_spacing_mm": [s * r for s, r in zip(mask_spacing_mm, spacing_ratio)]},
                                 folder / "autoencoder.pt")
    factor = autoencoder.downsample_factor
    del autoencoder
    latent_spatial = [s // factor for s in image_size]
    mask_factor = mask_size[0] // latent_spatial[0]
    latent_channels = int(arch["autoencoder"]["latent_channels"])
    ldm = build_latent_denoiser(latent_channels=latent_channels, num_classes=n, text_dim=text_dim, mask_encoding="fractions",
                                mask_factor=mask_factor, mask_embed_channels=16, **arch["ldm"])
    files["ldm"] = _save(ldm, {"stage": "ldm", **common, "architecture": arch["ldm"], "mask_encoding": "fractions", "mask_embed_channels": 16,
                               "mask_factor": mask_factor, "mask_size": mask_size, "latent_shape": [latent_channels, *latent_spatial],
                               "scale_factor": 1.0, "scaled_abs_max": 4.0, "num_train_timesteps": num_train_timesteps,
                               "text_dropout": 0.1, "autoencoder_sha256": file_digest(files["autoencoder"]),
                               "mask_spacing_mm": list(mask_spacing_mm), "text_encoder": "untrained chain"}, folder / "ldm.pt")
    return files
