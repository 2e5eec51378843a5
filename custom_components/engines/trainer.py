"""The Ignite trainer shared by the three GuideGen bundles."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer

from custom_components.engines.tracking import drop_duplicate_trackers

__all__ = ["GuideGenTrainer"]


class GuideGenTrainer(SupervisedTrainer):
    """MONAI's :class:`~monai.engines.SupervisedTrainer` driven by a stage-specific iteration.

    The stage's iteration (see :mod:`custom_components.engines.iterations`) computes its own loss (a
    diffusion KL or noise loss, or a GAN objective), so no ``loss_function`` is taken here. Everything else --
    handlers, events, DistributedSampler epochs, AMP scaler, ``--tracking mlflow`` -- is MONAI's, except that an
    MLflow handler ``--tracking mlflow`` appends is dropped when the bundle's own
    :class:`~custom_components.engines.GuideGenMLFlowHandler` logs to the same place (it would log every loss twice;
    see :func:`~custom_components.engines.drop_duplicate_trackers`).

    Args:
        device: training device.
        max_epochs: epochs to run (a resumed run continues up to this count).
        train_data_loader: batches of dicts.
        network: the trained network (possibly DDP-wrapped).
        optimizer: its optimiser.
        iteration: callable ``(engine, batch) -> dict`` with a ``loss`` entry.
        epoch_length: iterations per epoch (default: the loader's length).
        train_handlers: MONAI/Ignite handlers to attach.
        amp: mixed precision (CUDA only; off on CPU, where bf16 autocast is far slower than fp32).
        kwargs: forwarded to :class:`~monai.engines.SupervisedTrainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        iteration: Callable[[Any, Any], dict],
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=None,  # type: ignore[arg-type]  # the iteration owns the loss
            epoch_length=epoch_length,
            iteration_update=iteration,
            train_handlers=drop_duplicate_trackers(train_handlers),
            amp=amp,
            **kwargs,
        )
