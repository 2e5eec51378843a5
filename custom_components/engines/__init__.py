"""Ignite-based training shared by the GuideGen bundles: trainer, stage iterations, checkpoints, DDP."""

from .checkpoints import (
    STAGES,
    MODEL_INFO_KEY,
    CheckpointInfo,
    InferenceWeights,
    compact_model_file,
    convert_model_file,
    latest_checkpoint,
    load_model_weights,
    load_network,
    model_file_digest,
    read_checkpoint_info,
    read_intact_model_file,
    read_model_file,
    split_model_file,
    write_model_file,
)
from .residency import StageResidency
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
    "STAGES",
    "CheckpointInfo",
    "latest_checkpoint",
    "load_model_weights",
    "load_network",
    "compact_model_file",
    "convert_model_file",
    "InferenceWeights",
    "MODEL_INFO_KEY",
    "split_model_file",
    "write_model_file",
    "model_file_digest",
    "read_intact_model_file",
    "read_checkpoint_info",
    "read_model_file",
    "StageResidency",
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
