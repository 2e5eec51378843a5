"""Training iterations for MONAI's :class:`~monai.engines.SupervisedTrainer` (its ``iteration_update``).

:class:`AccumulatingIteration` does what every GuideGen stage needs around its loss: gradient
accumulation (with DDP's gradient sync skipped on non-final micro-steps), optional clipping, AMP, and the
EMA update. A stage subclasses it and only implements :meth:`AccumulatingIteration.compute_loss`.
The trainer's output always holds a ``loss`` entry, which MONAI's StatsHandler and the
``--tracking mlflow`` default settings read with ``from_engine(['loss'], first=True)``; that needs the
output to decollate into per-sample dicts, so each stage also returns one per-sample tensor (e.g. the
sampled timesteps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from torch.optim.swa_utils import AveragedModel

from custom_components.engines.distributed import average_gradients, broadcast_parameters
from custom_components.errors import GuideGenInputError

__all__ = ["make_ema", "AccumulatingIteration", "TCSSIteration", "LDMIteration"]


def _ema_with_warmup(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n.

    A fixed decay of 0.9999 would leave the averaged weights close to the random initialisation for the
    first tens of thousands of steps, so short runs (demo, CPU) would sample from an untrained network.
    """

    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged: torch.Tensor) -> None:
        done = float(num_averaged)
        effective = min(decay, (1.0 + done) / (10.0 + done))
        torch._foreach_lerp_(averaged, current, 1.0 - effective)

    return update


def make_ema(network: torch.nn.Module, decay: float = 0.9999) -> AveragedModel:
    """Exponential moving average of a network's weights, the weights used for inference.

    Args:
        network: the trained module (a DDP wrapper is unwrapped).
        decay: EMA decay per optimiser step, reached after a warm-up (see :func:`_ema_with_warmup`); 0 makes
            the "average" the latest weights (EMA off).
    """
    if not 0 <= decay < 1:
        raise GuideGenInputError(f"ema_decay = {decay} must be in [0, 1)")
    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    return AveragedModel(module, multi_avg_fn=_ema_with_warmup(decay), use_buffers=True)


class AccumulatingIteration:
    """Callable ``(engine, batch) -> output`` doing one micro-step of training.

    Args:
        accumulation_steps: optimiser step every this many iterations (effective batch = batch x steps).
        max_grad_norm: clip the gradient norm to this value before each step (None: no clipping).
        ema: EMA model from :func:`make_ema`, updated after each optimiser step.
        synchronized_modules: modules optimised with the network but not wrapped in DDP (e.g. the HDR window's
            k, b); under DDP their weights are broadcast from rank 0 at the first step and their gradients
            averaged before every optimiser step.
    """

    def __init__(
        self,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        ema: AveragedModel | None = None,
        synchronized_modules: Sequence[torch.nn.Module] = (),
    ) -> None:
        if accumulation_steps < 1:
            raise GuideGenInputError(f"accumulation_steps = {accumulation_steps} must be >= 1")
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm = max_grad_norm
        self.ema = ema
        self.synchronized_modules = list(synchronized_modules)
        self._broadcast_done = False

    def compute_loss(self, engine: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward pass of one batch; returns the scalar loss and per-sample outputs (batch-first tensors)."""
        raise NotImplementedError

    def after_step(self, engine: Any) -> dict[str, Any]:
        """Work after the network's update (e.g. a discriminator step); returns extra per-sample outputs."""
        return {}

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        network, optimizer = engine.network, engine.optimizer
        network.train()
        if not self._broadcast_done:
            broadcast_parameters(self.synchronized_modules)
            self._broadcast_done = True
        position = (engine.state.iteration - 1) % self.accumulation_steps
        last_micro_step = position == self.accumulation_steps - 1
        if position == 0:
            optimizer.zero_grad(set_to_none=True)
        skip_sync = not last_micro_step and isinstance(network, torch.nn.parallel.DistributedDataParallel)
        with network.no_sync() if skip_sync else contextlib.nullcontext():
            loss, outputs = self.compute_loss(engine, batch)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            scaled = loss / self.accumulation_steps
            scaler = getattr(engine, "scaler", None)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if last_micro_step:
            average_gradients(self.synchronized_modules)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(network.parameters(), self.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(network.module if hasattr(network, "module") else network)
        # MONAI's handlers (decollation, StatsHandler, MLflow) act on engine.state.output at MODEL_COMPLETED,
        # which fires inside the iteration, so the output must be in place before it.
        outputs.update(self.after_step(engine))
        engine.state.output = {"loss": loss.detach(), **outputs}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class TCSSIteration(AccumulatingIteration):
    """One TCSS training step (paper Eq. 6): x_0 -> x_t ~ q(x_t|x_0), predict x_0 logits, KL loss.

    Args:
        scheduler: a :class:`custom_components.schedulers.CategoricalDiffusionScheduler`.
        text_encoder: frozen prompt encoder returning (features, mask) for a list of prompts.
        label_key: batch key of the (B, 1, *spatial) class volume.
        text_key: batch key of the prompts.
        aux_ce_weight: weight of an auxiliary cross-entropy between the predicted and the true x_0 (the "hybrid
            loss" of D3PM, Austin et al. 2021). 0 (default) is the paper's pure Eq. 6 objective; a small weight
            speeds up learning in short runs, where the per-voxel KL is a weak signal.
        kwargs: see :class:`AccumulatingIteration`.
    """

    def __init__(
        self,
        scheduler: Any,
        text_encoder: torch.nn.Module,
        label_key: str = "label",
        text_key: str = "text",
        aux_ce_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if aux_ce_weight < 0:
            raise GuideGenInputError(f"aux_ce_weight = {aux_ce_weight} must be >= 0")
        self.aux_ce_weight = float(aux_ce_weight)
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.label_key = label_key
        self.text_key = text_key

    def compute_loss(self, engine: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        device = engine.state.device
        # Plain tensors: MetaTensor's __torch_function__ hides the outputs from DDP's gradient hooks.
        labels = convert_to_tensor(batch[self.label_key], track_meta=False).to(device).long()
        num_classes = self.scheduler.num_classes
        if labels.min() < 0 or labels.max() >= num_classes:
            raise GuideGenInputError(
                f"label values {int(labels.min())}..{int(labels.max())} fall outside the {num_classes} classes of the "
                "class map; prepare the data with the same class map as the config"
            )
        x0 = F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (labels.shape[0],), device=device)
        x_t = self.scheduler.q_sample(x0, timesteps)
        text_features, text_mask = self.text_encoder(list(batch[self.text_key]))
        with torch.autocast(device_type=device.type, enabled=bool(engine.amp)):
            logits = engine.network(x_t, timesteps, text_features, text_mask)
        loss = self.scheduler.kl_loss(x_t, x0, logits.float(), timesteps)
        if self.aux_ce_weight:
            loss = loss + self.aux_ce_weight * F.cross_entropy(logits.float(), labels[:, 0])
        return loss, {"timesteps": timesteps.detach()}


class LDMIteration(AccumulatingIteration):
    """One latent-generator training step (paper Eq. 11): ε-prediction loss ``|ε − ε_θ(z_t ⊕ mask, t, text)|²``.

    ``z_0`` is the CT's latent mean times the scale factor, taken from the batch (pre-encoded cache) or, when an
    autoencoder is given and the batch has no latent, encoded on the fly (frozen, no gradients). The prompt is
    replaced by the null prompt for a random share of samples (``text_dropout``), which trains the unconditional
    branch of classifier-free guidance.

    Args:
        scheduler: a MONAI ``DDPMScheduler`` (cosine, 1000 steps, ``clip_sample=False``) providing ``add_noise``.
        text_encoder: frozen prompt encoder returning (features, mask).
        scale_factor: latent scale factor (1 / std of the training latents).
        autoencoder: frozen :class:`~custom_components.networks.MaskGuidedAutoencoder` for on-the-fly encoding
            (batches with ``image_key`` instead of ``latent_key``); None when latents are cached.
        text_dropout: probability of dropping a sample's prompt (0 disables guidance training).
        latent_key, image_key, label_key, text_key: batch keys.
        kwargs: see :class:`AccumulatingIteration`.
    """

    def __init__(
        self,
        scheduler: Any,
        text_encoder: torch.nn.Module,
        scale_factor: float,
        autoencoder: torch.nn.Module | None = None,
        text_dropout: float = 0.1,
        latent_key: str = "latent",
        image_key: str = "image",
        label_key: str = "label",
        text_key: str = "text",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= text_dropout < 1:
            raise GuideGenInputError(f"text_dropout = {text_dropout} must be in [0, 1)")
        if not scale_factor > 0:
            raise GuideGenInputError(f"scale_factor = {scale_factor} must be > 0")
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.scale_factor = float(scale_factor)
        self.autoencoder = autoencoder
        self.text_dropout = float(text_dropout)
        self.latent_key, self.image_key, self.label_key, self.text_key = latent_key, image_key, label_key, text_key

    def _latents(self, batch: Mapping[str, Any], mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.latent_key in batch:
            return convert_to_tensor(batch[self.latent_key], track_meta=False).to(device).float()
        if self.autoencoder is None:
            raise GuideGenInputError(
                f"the batch has no '{self.latent_key}' entry and no autoencoder was given to encode '{self.image_key}'"
            )
        image = convert_to_tensor(batch[self.image_key], track_meta=False).to(device).float()
        with torch.no_grad():
            z_mu, _ = self.autoencoder.encode(image, mask if getattr(self.autoencoder, "num_classes", 0) else None)
        return z_mu.float()

    def compute_loss(self, engine: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        device = engine.state.device
        mask = convert_to_tensor(batch[self.label_key], track_meta=False).to(device).long()
        z0 = self._latents(batch, mask, device) * self.scale_factor
        noise = torch.randn_like(z0)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (z0.shape[0],), device=device)
        z_t = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
        text_features, text_mask = self.text_encoder(list(batch[self.text_key]))
        keep = torch.rand(z0.shape[0], device=device) >= self.text_dropout
        with torch.autocast(device_type=device.type, enabled=bool(engine.amp)):
            prediction = engine.network(z_t, timesteps, mask, text_features, text_mask, text_keep=keep)
        loss = F.mse_loss(prediction.float(), noise)
        return loss, {"timesteps": timesteps.detach()}
