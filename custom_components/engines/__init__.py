"""Ignite-based training shared by the GuideGen bundles: trainer, stage iterations, checkpoints, DDP."""

from .checkpoints import (
    InferenceWeights,
    compact_model_file,
    convert_model_file,
    latest_checkpoint,
    model_file_from_checkpoint,
    write_model_file,
)
from .handlers import ResumeFromLatest, TrainingCheckpointSaver, TrainingProgressBar
from .distributed import (
    average_gradients,
    broadcast_parameters,
    cleanup_distributed,
    init_distributed,
    is_rank0,
    local_device,
    save_rank_weights,
)
from .gan import LOGGED_TERMS, AutoencoderGANIteration, loss_terms
from .iterations import AccumulatingIteration, LDMIteration, TCSSIteration, make_ema
from .lr_schedules import LR_SCHEDULES, build_lr_scheduler
from .trainer import GuideGenTrainer
from .tracking import GuideGenMLFlowHandler, drop_duplicate_trackers, model_requirements, provenance_tags
from .validation import LossValidation, ReconstructionValidation, ValidationStep, average_of

__all__ = [
    "latest_checkpoint",
    "compact_model_file",
    "convert_model_file",
    "model_file_from_checkpoint",
    "InferenceWeights",
    "write_model_file",
    "average_gradients",
    "broadcast_parameters",
    "cleanup_distributed",
    "init_distributed",
    "is_rank0",
    "local_device",
    "save_rank_weights",
    "AccumulatingIteration",
    "AutoencoderGANIteration",
    "LOGGED_TERMS",
    "loss_terms",
    "TCSSIteration",
    "LDMIteration",
    "make_ema",
    "LR_SCHEDULES",
    "build_lr_scheduler",
    "GuideGenTrainer",
    "ResumeFromLatest",
    "TrainingCheckpointSaver",
    "TrainingProgressBar",
    "GuideGenMLFlowHandler",
    "drop_duplicate_trackers",
    "model_requirements",
    "provenance_tags",
    "ValidationStep",
    "LossValidation",
    "ReconstructionValidation",
    "average_of",
]
