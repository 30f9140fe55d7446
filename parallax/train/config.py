"""TrainConfig: every knob of a training run, with the defaults of `python train.py`."""
from __future__ import annotations

import dataclasses
import math
import re
import importlib.util
from dataclasses import dataclass

from ..models.config import ATTENTION_KINDS, PRESETS, preset
from .schedule import SCHEDULES

OPTIMIZERS = ("muon", "adamw")
DTYPES = ("auto", "float32", "bfloat16")
# Training defaults that depend on the model preset (a field left at None takes the preset's value).
PRESET_DEFAULTS = {
    "tiny": {"seq_len": 64},
    "small": {"seq_len": 128},
    "20m": {"seq_len": 1024},
    "125m": {"seq_len": 1024},
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_SEED = 2**63 - 1


class ConfigError(ValueError):
    """A bad setting; `flag` names the command-line flag it came from."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


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
    seq_len: int | None = None  # None: the preset's (PRESET_DEFAULTS)
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
    overwrite: bool = False  # replace a previous run's outputs in `out`
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

    def resolved(self) -> "TrainConfig":
        """A copy with the preset's defaults filled in where a field is None."""
        defaults = PRESET_DEFAULTS.get(self.model.lower(), {}) if isinstance(self.model, str) else {}
        return self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the flag of the first bad setting."""
        def need(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise ConfigError(flag, message)

        def count(value, flag: str, low: int, optional: bool = False) -> None:
            if optional and value is None:
                return
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            need(ok, flag, f"must be an integer >= {low}, got {value!r}")

        def number(value, flag: str, low: float, high: float = math.inf, *, low_open: bool = False,
                   high_open: bool = False, optional: bool = False) -> None:
            if optional and value is None:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            need(ok, flag, f"must be a finite number in {interval}, got {value!r}")

        need(isinstance(self.model, str) and self.model.lower() in PRESETS, "--model",
             f"unknown model {self.model!r}; choose from {', '.join(PRESETS)}")
        need(self.attention in ATTENTION_KINDS, "--attention",
             f"unknown attention {self.attention!r}; choose from {', '.join(ATTENTION_KINDS)}")
        need(not self.parameter_matched or self.attention == "softmax", "--parameter-matched",
             "only applies to --attention softmax (it widens the softmax model to the Parallax parameter count)")
        need(self.optimizer in OPTIMIZERS, "--optimizer",
             f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "--schedule", f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        need(self.dtype in DTYPES, "--dtype", f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        count(self.steps, "--steps", 0)
        count(self.stop_after, "--stop-after", 0, optional=True)
        count(self.batch_size, "--batch-size", 1)
        count(self.grad_accum, "--grad-accum", 1)
        seq_len = self.resolved().seq_len
        count(seq_len, "--seq-len", 1)
        block = preset(self.model).block_size
        need(seq_len <= block, "--seq-len", f"{seq_len} exceeds the block_size {block} of model {self.model!r}")
        count(self.eval_every, "--eval-every", 1)
        count(self.eval_batches, "--eval-batches", 1)
        count(self.log_every, "--log-every", 1)
        count(self.ckpt_every, "--ckpt-every", 1, optional=True)
        count(self.warmup, "--warmup", 0)
        number(self.cooldown, "--cooldown", 0, 1)
        number(self.min_lr_ratio, "--min-lr-ratio", 0, 1)
        number(self.lr, "--lr", 0, low_open=True, optional=True)
        number(self.embed_lr, "--embed-lr", 0, low_open=True)
        number(self.weight_decay, "--weight-decay", 0)
        number(self.momentum, "--momentum", 0, 1, high_open=True)
        number(self.grad_clip, "--grad-clip", 0)
        count(self.sample_tokens, "--sample-tokens", 0)
        count(self.vocab_size, "--vocab-size", 1, optional=True)
        need(self.vocab_size is None or self.vocab_size <= 65536, "--vocab-size",
             f"must be at most 65536 (uint16 tokens), got {self.vocab_size}")
        need(isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None, "--device",
             f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        count(self.threads, "--threads", 1, optional=True)
        count(self.seed, "--seed", 0)
        need(self.seed <= MAX_SEED, "--seed", f"must be at most 2**63 - 1, got {self.seed}")
        need(isinstance(self.out, str) and bool(self.out.strip()), "--out", "must be a directory path")
        need(not (self.resume and self.overwrite), "--overwrite",
             "cannot be combined with --resume (continue the run or replace it, not both)")
        need(self.export_hf is None or importlib.util.find_spec("transformers") is not None, "--export-hf",
             "needs transformers: pip install 'parallax[hf]'")
        return self
