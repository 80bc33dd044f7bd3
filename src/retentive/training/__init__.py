"""A model-agnostic trainer (AdamW, warm-up + cosine, AMP, DDP, EMA, atomic checkpoints, exact resume)."""

from .checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    load_weights,
    prepare_run_dir,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .distributed import DistInfo, init_distributed
from .ema import ModelEMA
from .optim import build_optimizer, build_scheduler, warmup_cosine
from .trainer import TrainConfig, Trainer, TrainResult, enable_activation_checkpointing, seed_everything

__all__ = [
    "CheckpointError",
    "DistInfo",
    "ModelEMA",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_dirs",
    "enable_activation_checkpointing",
    "init_distributed",
    "load_weights",
    "prepare_run_dir",
    "resolve_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "verify_checkpoint",
    "warmup_cosine",
]
