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
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.networks.schedulers.ddpm import DDPMPredictionType
from monai.utils import convert_to_tensor
from torch.optim.swa_utils import AveragedModel

from custom_components.engines.distributed import average_gradients, broadcast_parameters
from custom_components.errors import GuideGenInputError
from custom_components.losses import tumor_organ_loss, tumor_volume_loss

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

    Two options beyond the paper, both off at their paper settings (then the loss and the random draws are exactly
    the paper objective's):

    - **Prompt dropout** (``text_dropout`` p): each sample's prompt is replaced by the null prompt with probability
      p, so the same network also learns the unconditional x_0 prediction that classifier-free guidance at sampling
      needs (:meth:`~custom_components.schedulers.CategoricalDiffusionScheduler.guided_x0_logits`). The null prompt
      is a text mask without any real token, which the knowledge injection turns into all-zero contexts, exactly
      ``TextConditionedUNet``'s null prompt; it goes through the network's ordinary forward pass, so DDP sees every
      parameter used.
    - **Per-voxel class weights** (``tumor_loss_weight``, ``class_loss_weights``): the per-voxel loss at a voxel
      whose true class is c is multiplied by ``w_c`` before the mean over voxels,
      ``L = mean_v w_{x_0(v)} KL_v`` (and the same weights on the auxiliary cross-entropy), so only the voxels of
      up-weighted classes contribute more; the mean is still over all voxels (not divided by the sum of weights).
      Against the background's dominance of the voxel mean, and the tumor's few voxels.
    - **Tumor-organ loss** (``tumor_organ_loss_weight`` λ): adds ``λ · (-log share)``, the share of the predicted
      tumor probability inside the organ that holds the true tumor
      (:func:`~custom_components.losses.tumor_organ_loss`): one term per sample that only reading the prompt can
      lower at high noise levels, where Eq. 6 hardly depends on the x_0 prediction.
    - **Tumor-volume loss** (``tumor_volume_loss_weight`` μ): adds ``μ · (log(1 + V̂) − log(1 + V))²`` per sample,
      the predicted (sum of tumor probabilities) against the true number of tumor voxels
      (:func:`~custom_components.losses.tumor_volume_loss`): how much tumor to draw, "none" included, which the
      organ loss leaves open and only the prompt can tell at high noise levels.

    Args:
        scheduler: a :class:`custom_components.schedulers.CategoricalDiffusionScheduler`.
        text_encoder: frozen prompt encoder returning (features, mask) for a list of prompts.
        label_key: batch key of the (B, 1, *spatial) class volume.
        text_key: batch key of the prompts.
        aux_ce_weight: weight of an auxiliary cross-entropy between the predicted and the true x_0 (the "hybrid
            loss" of D3PM, Austin et al. 2021). 0 (default) is the paper's pure Eq. 6 objective; a small weight
            speeds up learning in short runs, where the per-voxel KL is a weak signal.
        text_dropout: probability in [0, 1) of replacing a sample's prompt by the null prompt (0: the paper, no
            unconditional branch).
        tumor_loss_weight: weight w > 0 of the loss at voxels whose true class is one of ``tumor_classes`` (1: the
            paper).
        tumor_classes: label indices of the tumor classes (the class map's ``tumor_index``); needed when
            ``tumor_loss_weight`` != 1.
        class_loss_weights: one weight >= 0 per class (N entries, not all 0), multiplied with the tumor weight;
            None: all 1 (the paper).
        tumor_organ_loss_weight: weight λ >= 0 of the tumor-organ loss (0: the paper, not computed); needs
            ``tumor_classes``.
        tumor_volume_loss_weight: weight μ >= 0 of the tumor-volume loss (0: the paper, not computed); needs
            ``tumor_classes``.
        kwargs: see :class:`AccumulatingIteration`.

    Raises:
        GuideGenInputError: a setting out of range, named by its config key.
    """

    def __init__(
        self,
        scheduler: Any,
        text_encoder: torch.nn.Module,
        label_key: str = "label",
        text_key: str = "text",
        aux_ce_weight: float = 0.0,
        text_dropout: float = 0.0,
        tumor_loss_weight: float = 1.0,
        tumor_classes: Sequence[int] = (),
        class_loss_weights: Sequence[float] | None = None,
        tumor_organ_loss_weight: float = 0.0,
        tumor_volume_loss_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if aux_ce_weight < 0:
            raise GuideGenInputError(f"aux_ce_weight = {aux_ce_weight} must be >= 0")
        self.tumor_organ_loss_weight = _tumor_weight(
            tumor_organ_loss_weight, "tumor_organ_loss_weight", paper=0, tumor_classes=tumor_classes
        )
        self.tumor_volume_loss_weight = _tumor_weight(
            tumor_volume_loss_weight, "tumor_volume_loss_weight", paper=0, tumor_classes=tumor_classes
        )
        self.tumor_classes = tuple(int(c) for c in tumor_classes)
        self.aux_ce_weight = float(aux_ce_weight)
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.label_key = label_key
        self.text_key = text_key
        self.text_dropout = _probability(text_dropout, "text_dropout")
        self.class_weights = _voxel_class_weights(
            scheduler.num_classes, tumor_loss_weight, tumor_classes, class_loss_weights
        )

    def voxel_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Per-voxel loss weights ``w_{x_0}`` of class volume ``labels`` ((B, *spatial) long); None when all are 1."""
        if self.class_weights is None:
            return None
        return self.class_weights.to(labels.device)[labels]

    def drop_prompts(self, text_mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Replace each sample's prompt by the null prompt with probability ``text_dropout`` (global torch RNG).

        Args:
            text_mask: (B, L) bool, True on real tokens.
            batch: B.

        Returns:
            the text mask with the rows of the dropped samples all False (the input itself when nothing can drop,
            and no random number is drawn then).
        """
        if not self.text_dropout:
            return text_mask
        keep = torch.rand(batch, device=text_mask.device) >= self.text_dropout
        return text_mask.bool() & keep[:, None]

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
        if self.text_dropout:
            if text_mask is None:
                text_mask = torch.ones(text_features.shape[:2], dtype=torch.bool, device=text_features.device)
            text_mask = self.drop_prompts(text_mask, labels.shape[0])
        with torch.autocast(device_type=device.type, enabled=bool(engine.amp)):
            logits = engine.network(x_t, timesteps, text_features, text_mask)
        weights = self.voxel_weights(labels[:, 0])
        if weights is None:  # the paper's loss, computed as before
            loss = self.scheduler.kl_loss(x_t, x0, logits.float(), timesteps)
            if self.aux_ce_weight:
                loss = loss + self.aux_ce_weight * F.cross_entropy(logits.float(), labels[:, 0])
        else:
            loss = (weights * self.scheduler.kl_loss(x_t, x0, logits.float(), timesteps, reduction="none")).mean()
            if self.aux_ce_weight:
                ce = F.cross_entropy(logits.float(), labels[:, 0], reduction="none")
                loss = loss + self.aux_ce_weight * (weights * ce).mean()
        if self.tumor_organ_loss_weight:
            loss = loss + self.tumor_organ_loss_weight * tumor_organ_loss(logits, labels[:, 0], self.tumor_classes)
        if self.tumor_volume_loss_weight:
            loss = loss + self.tumor_volume_loss_weight * tumor_volume_loss(logits, labels[:, 0], self.tumor_classes)
        return loss, {"timesteps": timesteps.detach()}


def _probability(value: float, key: str) -> float:
    """``value`` as a float in [0, 1), else an error naming the config ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise GuideGenInputError(f"{key} = {value!r} must be a number in [0, 1) (0: the paper, no prompt dropout)")
    return float(value)


def _tumor_weight(value: float, key: str, paper: int, tumor_classes: Sequence[int]) -> float:
    """A tumor loss weight as a float: finite, > 0 where the paper's setting is 1 (a factor), >= 0 where it is 0 (an
    added term); any other value than the paper's needs a tumor class. Else an error naming the config ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and (value > 0 if paper else value >= 0)
    ):
        raise GuideGenInputError(
            f"{key} = {value!r} must be a finite number {'>' if paper else '>='} 0 ({paper}: the paper)"
        )
    if value != paper and not tumor_classes:
        raise GuideGenInputError(
            f"{key} = {value} needs a tumor class, but the class map names none (its 'tumor_class'); set {key} to {paper}"
        )
    return float(value)


def _voxel_class_weights(
    num_classes: int,
    tumor_loss_weight: float,
    tumor_classes: Sequence[int],
    class_loss_weights: Sequence[float] | None,
) -> torch.Tensor | None:
    """The (N,) per-class loss weights of :class:`TCSSIteration`, or None when every weight is 1 (the paper)."""
    tumor_loss_weight = _tumor_weight(tumor_loss_weight, "tumor_loss_weight", paper=1, tumor_classes=tumor_classes)
    tumor_classes = [int(c) for c in tumor_classes]
    bad = [c for c in tumor_classes if not 0 <= c < num_classes]
    if bad:
        raise GuideGenInputError(f"tumor_classes {bad} are not class indices of the {num_classes} classes")
    weights = torch.ones(num_classes, dtype=torch.float64)
    if class_loss_weights is not None:
        values = list(class_loss_weights)
        if len(values) != num_classes or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values
        ) or not any(values):
            raise GuideGenInputError(
                f"class_loss_weights must list {num_classes} finite numbers >= 0 (one per class of the class map, not "
                f"all 0), or be null (all 1: the paper); got {values!r}"
            )
        weights = torch.tensor(values, dtype=torch.float64)
    weights[tumor_classes] *= float(tumor_loss_weight)
    if bool((weights == 1).all()):
        return None
    return weights.float()


class LDMIteration(AccumulatingIteration):
    """One latent-generator training step (paper Eq. 11): ``|y − f_θ(z_t ⊕ mask, t, text)|²``.

    The target ``y`` follows the scheduler's ``prediction_type``: ``epsilon`` is the paper's noise ``ε``;
    ``v_prediction`` is the velocity ``v = √ᾱ_t ε − √(1 − ᾱ_t) z_0`` (Salimans & Ho 2022), which near ``t = T``
    asks the network for ``z_0`` itself instead of an ε whose error the sampler divides by ``√ᾱ_t ≈ 0.03``;
    ``sample`` is ``z_0``.

    ``z_0`` is the CT's latent mean times the scale factor, taken from the batch (pre-encoded cache) or, when an
    autoencoder is given and the batch has no latent, encoded on the fly (frozen, no gradients). The prompt is
    replaced by the null prompt for a random share of samples (``text_dropout``), which trains the unconditional
    branch of classifier-free guidance.

    Args:
        scheduler: a MONAI ``DDPMScheduler`` (cosine, 1000 steps, ``clip_sample=False``) providing ``add_noise``,
            ``get_velocity`` and the ``prediction_type`` the network is trained for.
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
        self.prediction_type = str(getattr(scheduler, "prediction_type", DDPMPredictionType.EPSILON))
        known = tuple(str(kind) for kind in DDPMPredictionType)
        if self.prediction_type not in known:
            raise GuideGenInputError(
                f"scheduler prediction_type {self.prediction_type!r} is not one of {known}; set the "
                "latent generator's prediction_type key to one of them"
            )
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
        loss = F.mse_loss(prediction.float(), self._target(z0, noise, timesteps))
        return loss, {"timesteps": timesteps.detach()}

    def _target(self, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict under the scheduler's ``prediction_type``."""
        if self.prediction_type == DDPMPredictionType.V_PREDICTION:
            return self.scheduler.get_velocity(z0, noise, timesteps)
        if self.prediction_type == DDPMPredictionType.SAMPLE:
            return z0
        return noise
