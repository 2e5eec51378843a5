"""Ignite-based training shared by the GuideGen bundles: trainer, stage iterations, checkpoints, DDP."""

from .checkpoints import STAGES, CheckpointInfo, latest_checkpoint, load_model_weights, read_checkpoint_info, read_model_file
from .handlers import ResumeFromLatest, TrainingCheckpointSaver, TrainingProgressBar
from .distributed import cleanup_distributed, init_distributed, is_rank0, local_device, save_rank_weights
from .iterations import AccumulatingIteration, TCSSIteration, make_ema
from .trainer import GuideGenTrainer

__all__ = [
    "STAGES",
    "CheckpointInfo",
    "latest_checkpoint",
    "load_model_weights",
    "read_checkpoint_info",
    "read_model_file",
    "cleanup_distributed",
    "init_distributed",
    "is_rank0",
    "local_device",
    "save_rank_weights",
    "AccumulatingIteration",
    "TCSSIteration",
    "make_ema",
    "GuideGenTrainer",
    "ResumeFromLatest",
    "TrainingCheckpointSaver",
    "TrainingProgressBar",
]
