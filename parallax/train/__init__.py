"""Training: data, the loop, checkpoints, schedules and the `train.py` CLI."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import BatchSampler, DataError, Dataset, load_dataset, unigram_bits
from .loop import NonFiniteLossError, build_optimizer, evaluate, train
from .schedule import LRSchedule, build_scheduler

__all__ = [
    "BatchSampler", "ConfigError", "DataError", "Dataset", "LRSchedule", "NonFiniteLossError", "TrainConfig",
    "build_optimizer", "build_scheduler", "evaluate", "load_checkpoint", "load_dataset", "save_checkpoint", "train",
    "unigram_bits",
]
