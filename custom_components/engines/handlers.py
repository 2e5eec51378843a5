"""Checkpoint handlers that know their trainer: periodic + final saves with engine state, and resume.

A bundle config cannot name the trainer inside the trainer's own handler list (that reference would be
circular), so these handlers add ``"trainer": engine`` to their save/load dicts when they are attached.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ignite.handlers import ProgressBar
from monai.handlers import CheckpointLoader, CheckpointSaver, from_engine

from custom_components.engines.checkpoints import latest_checkpoint

__all__ = ["TrainingCheckpointSaver", "ResumeFromLatest", "TrainingProgressBar"]

logger = logging.getLogger(__name__)


class TrainingCheckpointSaver:
    """Save the full training state every ``save_interval`` epochs and at the end (or on an exception).

    Files: ``checkpoint_epoch=<k>.pt`` (the last ``n_saved`` kept) and ``checkpoint_final.pt``; each holds
    the objects of ``save_dict`` plus the trainer's own state (epoch, iteration), so a run can resume.

    Args:
        save_dir: checkpoint folder.
        save_dict: name -> object with ``state_dict`` (network, optimizer, EMA, :class:`CheckpointInfo` ...).
        save_interval: epochs between periodic checkpoints (0: only the final one).
        n_saved: periodic checkpoints to keep.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], save_interval: int = 1, n_saved: int = 2) -> None:
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.n_saved = int(n_saved)

    def attach(self, engine: Any) -> None:
        CheckpointSaver(
            save_dir=self.save_dir,
            save_dict={**self.save_dict, "trainer": engine},
            save_final=True,
            final_filename="checkpoint_final.pt",
            save_interval=self.save_interval,
            epoch_level=True,
            n_saved=self.n_saved,
        ).attach(engine)


class ResumeFromLatest:
    """Resume from the newest checkpoint in a folder when there is one (fresh start otherwise).

    Args:
        checkpoint_dir: where :class:`TrainingCheckpointSaver` writes.
        load_dict: the same objects as the saver's ``save_dict`` (the trainer is added here).
        map_location: passed to :func:`torch.load`.
        enabled: False to always start fresh.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, load_dict: Mapping[str, Any], map_location: Any = None, enabled: bool = True) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.enabled = enabled

    def attach(self, engine: Any) -> None:
        path = latest_checkpoint(self.checkpoint_dir) if self.enabled else None
        if path is None:
            logger.info("no checkpoint in %s: starting a fresh run", self.checkpoint_dir)
            return
        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=path, load_dict={**self.load_dict, "trainer": engine}, map_location=self.map_location).attach(engine)


class TrainingProgressBar:
    """A tqdm progress bar over each epoch's iterations showing the current loss (Ignite's ProgressBar).

    Args:
        persist: keep each finished epoch's bar on screen.
    """

    def __init__(self, persist: bool = False) -> None:
        self.persist = persist

    def attach(self, engine: Any) -> None:
        loss_of = from_engine(["loss"], first=True)
        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda output: {"loss": float(loss_of(output))})
