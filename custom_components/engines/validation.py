"""Validation steps for MONAI's :class:`~monai.engines.SupervisedEvaluator` (its ``iteration_update``).

The training loss of a diffusion stage is a noisy estimate (random timesteps, noise, prompt dropout), so two epochs'
losses differ even with the same weights. A validation step draws its randomness from a fixed seed per validation
batch instead, inside a forked RNG so that validation leaves the training random stream untouched: the validation
loss of epoch k and k+1 differ only by what the network learnt. The values are per-batch means (validation loaders
use batch size 1); :func:`average_of` averages them over the epoch (and over ranks under DDP).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.metrics import Average
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor

from custom_components.data.intensity import CT_WINDOWS, unit_to_hu, windowed_psnr

__all__ = ["ValidationStep", "LossValidation", "ReconstructionValidation", "average_of"]


class ValidationStep:
    """Callable ``(engine, batch) -> {name: value}``: :meth:`measure` in eval mode, without gradients, seeded.

    Args:
        seed: base seed; batch ``i`` of every validation epoch draws from ``seed + i``.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def measure(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's values (0-dim tensors)."""
        raise NotImplementedError

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        network = engine.network
        was_training = network.training
        network.eval()
        device = torch.device(engine.state.device)
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed + engine.state.iteration)
                values = self.measure(engine, batch)
        finally:
            network.train(was_training)
        engine.state.output = {key: value.detach().float().reshape(()) for key, value in values.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class LossValidation(ValidationStep):
    """The stage's training objective on a validation batch, as ``loss``.

    Args:
        iteration: a training iteration (:class:`~custom_components.engines.TCSSIteration`,
            :class:`~custom_components.engines.LDMIteration`) built for validation: no prompt dropout, so the loss is
            the conditional one that sampling with a prompt relies on. Only its ``compute_loss`` runs (no optimiser,
            no EMA update).
        seed: see :class:`ValidationStep`.
    """

    def __init__(self, iteration: Any, seed: int = 0) -> None:
        super().__init__(seed)
        self.iteration = iteration

    def measure(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        loss, _ = self.iteration.compute_loss(engine, batch)
        return {"loss": loss}


class ReconstructionValidation(ValidationStep):
    """The autoencoder's reconstruction of a validation CT: ``l1`` on the model's [-1, 1] scale (the full-range term
    of the training loss), ``psnr_<window>`` in each clinical window (dB) and ``mae_hu``, the numbers the
    autoencoder's inference reports, so validation and held-out evaluation read alike.

    Args:
        image_key: batch key of the (B, 1, *spatial) CT on the [-1, 1] scale.
        label_key: batch key of the mask, used when the network takes one (``num_classes > 0``).
        seed: see :class:`ValidationStep` (the reconstruction uses the posterior mean, but a network may sample).
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", seed: int = 0) -> None:
        super().__init__(seed)
        self.image_key, self.label_key = image_key, label_key

    def measure(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        device = engine.state.device
        image = convert_to_tensor(batch[self.image_key], track_meta=False).to(device).float()
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        if getattr(network, "num_classes", 0):
            mask = convert_to_tensor(batch[self.label_key], track_meta=False).to(device)
            reconstruction = network(image, mask)[0]
        else:
            reconstruction = network(image)[0]
        reconstruction = reconstruction.float()
        values = {"l1": (reconstruction - image).abs().mean()}
        reference_hu, reconstruction_hu = unit_to_hu(image), unit_to_hu(reconstruction)
        for name, window in CT_WINDOWS.items():
            psnr = sum(windowed_psnr(r, t, window) for r, t in zip(reference_hu, reconstruction_hu)) / image.shape[0]
            values[f"psnr_{name}"] = torch.tensor(psnr)
        values["mae_hu"] = (reference_hu - reconstruction_hu).abs().mean()
        return values


def average_of(key: str, device: torch.device | str = "cpu") -> Average:
    """An ignite metric: the mean of output ``key`` over the validation epoch (summed over ranks under DDP).

    Args:
        key: entry of the validation step's output.
        device: where the sums are kept; under nccl the reduction needs the CUDA device.
    """
    return Average(output_transform=lambda output: output[key].detach().to(device).reshape(()), device=device)
