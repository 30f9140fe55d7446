"""TrainConfig: every knob of a training run, with the defaults of `python train.py`."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from ..models.config import ATTENTION_KINDS, PRESETS, preset
from .schedule import SCHEDULES

OPTIMIZERS = ("muon", "adamw")
DTYPES = ("auto", "float32", "bfloat16")


class ConfigError(ValueError):
    """A bad setting; `flag` names the command-line flag it came from."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass
class TrainConfig:
    # model
    model: str = "small"
    attention: str = "parallax"
    parameter_matched: bool = False
    # data
    data: str | None = None  # None: the Python standard library's sources
    cache_dir: str | None = None  # None: $PARALLAX_CACHE or ~/.cache/parallax
    vocab_size: int | None = None  # .bin shards only; None: max token + 1, rounded up to 64
    # optimisation
    optimizer: str = "muon"
    lr: float | None = None  # hidden matrices; None: 0.03 with Muon, 3e-3 with AdamW
    embed_lr: float = 3e-3  # AdamW lr of embeddings, lm_head and 1-D gains (both optimizers)
    weight_decay: float = 0.0  # hidden matrices only
    momentum: float = 0.95  # Muon
    grad_clip: float = 1.0  # 0 disables
    schedule: str = "wsd"
    warmup: int = 30
    cooldown: float = 0.3  # wsd: fraction of steps in the final linear decay
    min_lr_ratio: float = 0.0
    # batches and length of the run (batch_size is per process)
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    steps: int = 600
    stop_after: int | None = None
    # evaluation and logging
    eval_every: int = 150
    eval_batches: int = 16  # eval uses eval_batches * batch_size fixed val windows
    log_every: int = 25  # progress lines when stderr is not a terminal
    ckpt_every: int | None = None  # None: eval_every
    sample_tokens: int = 300
    progress: bool = True
    # system
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; None: torch's default
    dtype: str = "auto"
    compile: bool = False
    fsdp: bool = False  # torchrun: shard parameters and optimizer state with FSDP2 instead of DDP
    seed: int = 0
    out: str = "runs/default"
    resume: bool = False
    export_hf: str | None = None  # write a transformers model directory here at the end (needs parallax[hf])

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def matrix_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.03 if self.optimizer == "muon" else 3e-3

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the flag of the first bad setting."""
        def need(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise ConfigError(flag, message)

        need(self.model.lower() in PRESETS, "--model", f"unknown model {self.model!r}; choose from {', '.join(PRESETS)}")
        need(self.attention in ATTENTION_KINDS, "--attention",
             f"unknown attention {self.attention!r}; choose from {', '.join(ATTENTION_KINDS)}")
        need(self.optimizer in OPTIMIZERS, "--optimizer",
             f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "--schedule", f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        need(self.dtype in DTYPES, "--dtype", f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        need(self.steps >= 0, "--steps", f"must be >= 0, got {self.steps}")
        need(self.stop_after is None or self.stop_after >= 0, "--stop-after", f"must be >= 0, got {self.stop_after}")
        need(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, "--grad-accum", f"must be >= 1, got {self.grad_accum}")
        need(self.seq_len >= 1, "--seq-len", f"must be >= 1, got {self.seq_len}")
        block = preset(self.model).block_size
        need(self.seq_len <= block, "--seq-len", f"{self.seq_len} exceeds the block_size {block} of model {self.model!r}")
        need(self.eval_every >= 1, "--eval-every", f"must be >= 1, got {self.eval_every}")
        need(self.eval_batches >= 1, "--eval-batches", f"must be >= 1, got {self.eval_batches}")
        need(self.log_every >= 1, "--log-every", f"must be >= 1, got {self.log_every}")
        need(self.ckpt_every is None or self.ckpt_every >= 1, "--ckpt-every", f"must be >= 1, got {self.ckpt_every}")
        need(self.warmup >= 0, "--warmup", f"must be >= 0, got {self.warmup}")
        need(0.0 <= self.cooldown <= 1.0, "--cooldown", f"must be in [0, 1], got {self.cooldown}")
        need(0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(self.lr is None or self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        need(self.embed_lr > 0, "--embed-lr", f"must be > 0, got {self.embed_lr}")
        need(self.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {self.weight_decay}")
        need(0 <= self.momentum < 1, "--momentum", f"must be in [0, 1), got {self.momentum}")
        need(self.grad_clip >= 0, "--grad-clip", f"must be >= 0, got {self.grad_clip}")
        need(self.sample_tokens >= 0, "--sample-tokens", f"must be >= 0, got {self.sample_tokens}")
        need(self.vocab_size is None or 1 <= self.vocab_size <= 65536, "--vocab-size",
             f"must be in [1, 65536], got {self.vocab_size}")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "--device",
             f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        need(self.threads is None or self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        need(bool(self.out), "--out", "must be a directory path")
        need(self.export_hf is None or importlib.util.find_spec("transformers") is not None, "--export-hf",
             "needs transformers: pip install 'parallax[hf]'")
        return self
