"""Training: data, the loop, checkpoints, schedules and the `train.py` CLI."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import BatchSampler, DataError, Dataset, load_dataset, unigram_bits
from .loop import NonFiniteLossError, TrainingInterrupted, build_optimizer, evaluate, train
from .schedule import LRSchedule, build_scheduler

__all__ = [
    "BatchSampler", "CheckpointError", "ConfigError", "DataError", "Dataset", "LRSchedule", "NonFiniteLossError",
    "TrainConfig", "TrainingInterrupted", "build_optimizer", "build_scheduler", "evaluate", "load_checkpoint",
    "load_dataset", "save_checkpoint", "train", "unigram_bits",
]
