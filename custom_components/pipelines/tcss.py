"""Stage 1 pipeline: prompts -> anatomy masks by reverse categorical diffusion (TCSS).

Chains the pieces without owning their maths: the text encoder gives token features, the network predicts
x_0 logits, the scheduler draws x_{t-1} (paper Eq. 6 sampling: by probability for all but the last step,
most probable class at the last). Writing files is left to :func:`custom_components.runs.tcss.save_masks`.

Classifier-free guidance (beyond the paper; ``guidance_scale`` s != 1) runs the network once per step on a doubled
batch, the prompts and the null prompt, and hands the scheduler the log-space mix
``log f_u + s (log f_c - log f_u)`` of the two x_0 predictions
(:meth:`~custom_components.schedulers.CategoricalDiffusionScheduler.guided_x0_logits`). At s = 1 (the paper) the
loop is the unguided one: one pass per step on the prompts alone, the same draws and the same masks; at s = 0 (the
unconditional model, the baseline a prompt's effect is measured against) one pass per step on the null prompt alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from custom_components.pipelines.residency import return_freed_memory
from custom_components.errors import GuideGenInputError

__all__ = ["TCSSPipeline"]


class TCSSPipeline:
    """Text-conditional mask sampler.

    Args:
        network: ``network(x_t, t, text_features, text_mask) -> x_0 logits`` (e.g. TextConditionedUNet). For guidance it
            must treat an item whose ``text_mask`` row has no real token as the null prompt, as
            :class:`~custom_components.networks.KnowledgeInjection` does (all-zero contexts).
        scheduler: a :class:`custom_components.schedulers.CategoricalDiffusionScheduler`.
        text_encoder: ``text_encoder(prompts) -> (features, mask)``.
        spatial_size: mask size, e.g. (128, 128, 128).
        device: where to sample.
        trained_text_dropout: the prompt dropout the model was trained with (the model file's ``text_dropout``; files
            made before prompt dropout existed were trained with 0). With 0, guidance warns that the null prompt was
            never trained; None: unknown, no warning.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        scheduler: Any,
        text_encoder: torch.nn.Module,
        spatial_size: Sequence[int],
        device: torch.device | str = "cpu",
        trained_text_dropout: float | None = None,
    ) -> None:
        self.network = network
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.device = torch.device(device)
        self.trained_text_dropout = None if trained_text_dropout is None else float(trained_text_dropout)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        num_inference_steps: int = 50,
        seed: int | None = 0,
        progress: bool = True,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Sample one mask per prompt.

        Args:
            prompts: clinical prompts (see :mod:`custom_components.data.prompts`).
            num_inference_steps: strided reverse steps (exact jumps; 1000 = every training step).
            seed: random seed of the draw (None: not seeded).
            progress: show a progress bar over the steps.
            guidance_scale: classifier-free guidance scale s >= 0 (beyond the paper). 1: no guidance (the paper's
                sampler, one network pass per step); 0: the unconditional model; > 1: the prompt's effect amplified.
                Needs a model trained with ``text_dropout`` > 0, else the null prompt was never seen.

        Returns:
            (B, *spatial_size) long tensor of class indices, on the CPU.

        Raises:
            GuideGenInputError: no prompt, or a guidance scale that is not a finite number >= 0.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise GuideGenInputError("no prompt given: pass at least one clinical prompt")
        try:
            scale = self.scheduler.check_guidance_scale(guidance_scale)
        except ValueError as error:
            raise GuideGenInputError(str(error)) from None
        guided = scale != 1.0
        if guided and self.trained_text_dropout == 0:
            warnings.warn(
                f"guidance_scale = {scale:g} with a model trained without prompt dropout (text_dropout 0): its "
                "unconditional prediction (the null prompt) was never trained, so the guided masks mean little; train "
                "with text_dropout > 0 (train.yaml) or sample with guidance_scale 1",
                UserWarning,
                stacklevel=2,
            )
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
        self.network.eval()
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        text_features, text_mask = self.text_encoder(list(prompts))
        if scale == 0.0:
            # f_0 = f_u: the unconditional model alone, one pass per step on the null prompt (no real token)
            text_mask = torch.zeros(text_features.shape[:2], dtype=torch.bool, device=text_features.device)
            guided = False
        if guided:
            # one batched pass: the first half reads the prompts, the second half the null prompt (no real token)
            if text_mask is None:
                text_mask = torch.ones(text_features.shape[:2], dtype=torch.bool, device=text_features.device)
            text_mask = torch.cat([text_mask.bool(), torch.zeros_like(text_mask, dtype=torch.bool)])
            text_features = torch.cat([text_features, text_features])
        batch = len(prompts) * (2 if guided else 1)
        shape = (len(prompts), self.scheduler.num_classes, *self.spatial_size)
        # x_t is one-hot: kept as uint8 (the network and the scheduler read it as such), 1/4 of float32's memory
        x_t = self.scheduler.sample_prior(shape, generator=generator, device=self.device).to(torch.uint8)
        for t in tqdm(self.scheduler.timesteps, desc="TCSS sampling", unit="step", disable=not progress):
            timesteps = torch.full((batch,), int(t), device=self.device, dtype=torch.long)
            logits = self.network(torch.cat([x_t, x_t]) if guided else x_t, timesteps, text_features, text_mask)
            if guided:
                cond, uncond = logits.float().chunk(2)
                logits = self.scheduler.guided_x0_logits(cond, uncond, scale)
                del cond, uncond
            x_t = self.scheduler.step(logits.float(), int(t), x_t, generator=generator).to(torch.uint8)
            del logits
            # the step's temporaries are freed but stay resident in the heap; without this, they add to the next
            # forward pass's peak (≈ 0.15 GiB at 128³)
            return_freed_memory()
        return x_t.argmax(dim=1).cpu()
