"""TrainConfig: every flag of `python train.py`, each declared once.

A field is declared with `flag(default, group, help, *checks)`: the dataclass
field, its validation (`TrainConfig.validate`) and its command-line flag
(`build_parser`: --field-name, typed by the annotation; a bool that defaults
to on also gets --no-x) all come from that one declaration. The help of a
field whose default is None says what None means; any other default is
appended to the help by the parser. A check takes the value and the whole
config and returns what is wrong, or None; a None value of an optional field
is not checked. A check that relates two fields sits on the later one.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..kernels.backend import check_backend
from ..kernels.checks import check_deterministic
from ..models.config import ATTENTION_KINDS, PRESETS, preset
from .schedule import SCHEDULES

PROG = "train.py"
OPTIMIZERS = ("muon", "adamw")
DTYPES = ("auto", "float32", "bfloat16")
# Training defaults that depend on the model preset (a field left at None takes the preset's value).
PRESET_DEFAULTS = {
    "tiny": {"seq_len": 64},
    "small": {"seq_len": 128},
    "small-48": {"seq_len": 128},
    "small-80": {"seq_len": 128},
    "20m": {"seq_len": 1024},
    "125m": {"seq_len": 1024},
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
RUNS = Path("runs")  # where runs go without --out
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024  # OpenMP aborts the process when it cannot start them all
MAX_BATCH_SIZE = 2**24  # sequences per micro-batch: far past any memory (larger ones overflowed before a check)
# Learning rates (and lr x weight decay) up to this keep every update factor within float32 (3.4e38; AdamW's
# first step is 10 x lr); beyond it the optimizer step itself fails instead of the loss turning NaN.
MAX_RATE = 1e30

Check = Callable[[object, "TrainConfig"], "str | None"]


class ConfigError(ValueError):
    """A bad setting; `flag` names the command-line flag it came from."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


# ---------------------------------------------------------------- checks

def count(low: int) -> Check:
    def check(value, cfg):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            return f"must be an integer >= {low}, got {value!r}"
    return check


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Check:
    def check(value, cfg):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            return f"must be a finite number in {interval}, got {value!r}"
    return check


def one_of(choices, what: str) -> Check:
    def check(value, cfg):
        if value not in choices:
            return f"unknown {what} {value!r}; choose from {', '.join(choices)}"
    return check


def at_most(high: int, shown: str) -> Check:
    def check(value, cfg):
        if value > high:
            return f"must be at most {shown}, got {value}"
    return check


def library(check_fn) -> Check:
    """The library's own check of an argument it shares with train.py (one message everywhere)."""
    def check(value, cfg):
        try:
            check_fn(value)
        except (TypeError, ValueError) as e:
            return str(e)
    return check


def is_known_model(value, cfg):
    if not (isinstance(value, str) and value.lower() in PRESETS):
        return f"unknown model {value!r}; choose from {', '.join(PRESETS)}"


def matches_attention(value, cfg):
    if value and cfg.attention != "softmax":
        return "only applies to --attention softmax (it widens the softmax model to the Parallax parameter count)"


def names_data(value, cfg):
    if not (isinstance(value, str) and value.strip()) or "\0" in value:
        return f"must be a path, got {value!r} (leave --data out for the standard library's sources)"


def exists(value, cfg):
    try:
        found = Path(value).exists()
    except OSError as e:  # a name too long, say
        return f"cannot use {value}: {e.strerror}"
    if not found:
        return f"{value} does not exist"


def fits_block(value, cfg):
    block = preset(cfg.model).block_size
    if value > block:
        return f"{value} exceeds the block_size {block} of model {cfg.model!r}"


def is_device(value, cfg):
    if not (isinstance(value, str) and DEVICE_PATTERN.fullmatch(value)):
        return f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps"


def is_path(value, cfg):
    if not (isinstance(value, str) and value.strip()) or "\0" in value:
        return "must be a directory path"


def decay_fits(value, cfg):
    if cfg.matrix_lr * value > MAX_RATE:
        return f"times the lr ({cfg.matrix_lr:g}) must be at most {MAX_RATE:g}, got {value:g}"


def not_with_resume(value, cfg):
    if value and cfg.resume:
        return "cannot be combined with --resume (continue the run or replace it, not both)"


def transformers_installed(value, cfg):
    if importlib.util.find_spec("transformers") is None:
        return "needs transformers: pip install 'parallax[hf]'"


def flag(default, group: str, help: str, *checks: Check, aliases: tuple[str, ...] = (), metavar: str | None = None):
    """A TrainConfig field and everything its command-line flag needs."""
    return dataclasses.field(default=default, metadata=dict(group=group, help=help, checks=checks, aliases=aliases,
                                                            metavar=metavar))


# ---------------------------------------------------------------- the flags

@dataclass
class TrainConfig:
    model: str = flag("small", "model", f"preset: {', '.join(PRESETS)}", is_known_model)
    attention: str = flag("parallax", "model", " or ".join(ATTENTION_KINDS), one_of(ATTENTION_KINDS, "attention"))
    parameter_matched: bool = flag(False, "model", "widen a softmax model's MLP to the Parallax model's parameter "
                                   "count", matches_attention)
    data: str | None = flag(None, "data", "text file, directory of text files, or directory of uint16 train/val .bin "
                            "shards (default: the Python standard library's sources, no download)", names_data, exists)
    cache_dir: str | None = flag(None, "data", "where text corpora are cached (default: $PARALLAX_CACHE or "
                                 "~/.cache/parallax)", is_path)
    vocab_size: int | None = flag(None, "data", ".bin shards: vocabulary size (default: max token + 1, rounded up "
                                  "to 64)", count(1), at_most(65536, "65536 (uint16 tokens)"))
    optimizer: str = flag("muon", "optimisation", f"{' or '.join(OPTIMIZERS)} (Muon: hidden matrices; AdamW: "
                          "embeddings, lm_head, gains)", one_of(OPTIMIZERS, "optimizer"))
    lr: float | None = flag(None, "optimisation", "lr of hidden matrices (default: 0.03 Muon, 3e-3 AdamW)",
                            number(0, MAX_RATE, low_open=True))
    embed_lr: float = flag(3e-3, "optimisation", "AdamW lr of embeddings, lm_head and gains",
                           number(0, MAX_RATE, low_open=True), aliases=("--adamw-lr",))
    weight_decay: float = flag(0.0, "optimisation", "decoupled weight decay of hidden matrices", number(0, MAX_RATE),
                               decay_fits)
    momentum: float = flag(0.95, "optimisation", "Muon momentum", number(0, 1, high_open=True))
    grad_clip: float = flag(1.0, "optimisation", "max gradient norm (0: off)", number(0))
    schedule: str = flag("wsd", "optimisation", f"{', '.join(SCHEDULES)} (all with linear warmup)",
                         one_of(SCHEDULES, "schedule"))
    warmup: int = flag(30, "optimisation", "warmup steps", count(0))
    cooldown: float = flag(0.3, "optimisation", "wsd: fraction of steps in the final decay", number(0, 1))
    min_lr_ratio: float = flag(0.0, "optimisation", "final lr / peak lr", number(0, 1))
    batch_size: int = flag(32, "run", "sequences per step per process", count(1), at_most(MAX_BATCH_SIZE, "2**24"))
    seq_len: int | None = flag(None, "run", "tokens per sequence, at most the model's block_size (default: the "
                               "preset's, " + ", ".join(f"{m} {v['seq_len']}" for m, v in PRESET_DEFAULTS.items())
                               + ")", count(1), fits_block)
    grad_accum: int = flag(1, "run", "micro-batches per step", count(1))
    steps: int = flag(600, "run", "optimizer steps of the schedule", count(0))
    stop_after: int | None = flag(None, "run", "stop at this step of the schedule, checkpoint and exit (continue with "
                                  "--resume; default: run all --steps)", count(0))
    eval_every: int = flag(150, "run", "steps between val evaluations", count(1))
    eval_batches: int = flag(16, "run", "val batches per evaluation", count(1))
    ckpt_every: int | None = flag(None, "run", "steps between checkpoints (default: --eval-every)", count(1))
    log_every: int = flag(25, "run", "steps between progress lines off a terminal", count(1))
    sample_tokens: int = flag(300, "run", "tokens of the final text sample", count(0))
    progress: bool = flag(True, "run", "show the progress bar")
    device: str = flag("auto", "system", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps", is_device)
    threads: int | None = flag(None, "system", "torch CPU threads (default: torch's choice)", count(1),
                               at_most(MAX_THREADS, str(MAX_THREADS)))
    dtype: str = flag("auto", "system", f"{', '.join(DTYPES)} (auto: bf16 autocast on GPU, fp32 on CPU)",
                      one_of(DTYPES, "dtype"))
    backend: str | None = flag(None, "system", "attention backend: torch or triton (default: Triton on CUDA, torch "
                               "elsewhere)", library(check_backend))
    deterministic: bool = flag(True, "system", "bitwise reproducible Triton backward (--no-deterministic: the fused "
                               "one, float32 atomics)", library(check_deterministic))
    compile: bool = flag(False, "system", "torch.compile the model")
    fsdp: bool = flag(False, "system", "under torchrun, shard the model with FSDP2 instead of replicating it (DDP)")
    seed: int = flag(0, "system", "seed of the data order, the init and the sample", count(0),
                     at_most(MAX_SEED, "2**63 - 1"))
    out: str | None = flag(None, "system", "output directory: log.jsonl, loss.png, sample.txt, checkpoint.pt "
                           "(default: runs/MODEL-ATTENTION, e.g. runs/small-parallax, numbered -2, -3, ... past names "
                           "that hold a run; --resume and --overwrite take the newest)", is_path)
    resume: bool = flag(False, "system", "continue the run in --out from its checkpoint")
    overwrite: bool = flag(False, "system", "replace the outputs of a previous run in --out", not_with_resume)
    export_hf: str | None = flag(None, "system", "after training, write the final checkpoint as a transformers model "
                                 "into this new or empty directory (AutoModelForCausalLM; see docs/hf.md; default: "
                                 "no export)",
                                 is_path, transformers_installed, metavar="DIR")

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
        """A copy with the preset's defaults filled in where a field is None, and --out (see `default_out`)."""
        defaults = PRESET_DEFAULTS.get(self.model.lower(), {}) if isinstance(self.model, str) else {}
        cfg = self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})
        return cfg if cfg.out is not None else cfg.replace(out=default_out(cfg))

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the flag of the first bad setting (in declaration order)."""
        resolved = self.resolved()
        for field in dataclasses.fields(self):
            value = getattr(resolved, field.name)
            if value is None and type(None) in typing.get_args(FIELD_TYPES[field.name]):
                continue
            for check in field.metadata["checks"]:
                problem = check(value, resolved)
                if problem is not None:
                    raise ConfigError(flag_name(field.name), problem)
        return self


FIELD_TYPES = typing.get_type_hints(TrainConfig)


def default_out(cfg: TrainConfig) -> str:
    """runs/MODEL-ATTENTION[-matched], then -2, -3, ...: a fresh run takes the
    first of these names that is free (missing or an empty directory), so runs
    of the same preset never collide; --resume and --overwrite take the one
    before it, the newest run. Every rank of a torchrun job computes the same
    name: no rank writes to --out before all have joined the process group."""
    base = f"{str(cfg.model).lower()}-{cfg.attention}{'-matched' if cfg.parameter_matched else ''}"
    newest = None
    for path in (RUNS / (base if n == 1 else f"{base}-{n}") for n in itertools.count(1)):
        if not _holds_files(path):
            return str(path if newest is None or not (cfg.resume or cfg.overwrite) else newest)
        newest = path


def _holds_files(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


# ---------------------------------------------------------------- the command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block, the flag first
        if message.startswith("argument "):
            message = message[len("argument "):]
            flag, _, rest = message.partition(": ")
            message = f"{flag.split('/')[0]}: {rest}"
        elif message.startswith("unrecognized arguments: "):
            message = f"{message[len('unrecognized arguments: '):]}: unknown flag (see --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """train.py's argparse parser, one flag per TrainConfig field."""
    parser = _Parser(prog=PROG, description="Train a small GPT (Parallax or softmax attention) with Muon. "
                     "See docs/training.md.")
    groups = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        hint = FIELD_TYPES[field.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # int | None -> int
        options = dict(dest=field.name, default=field.default, metavar=meta["metavar"])
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction if field.default else "store_true")
            del options["metavar"]
        elif kind is not str:
            options.update(type=kind)
        action = groups[meta["group"]].add_argument(flag_name(field.name), *meta["aliases"], **options)
        action.help = help_text(field)  # set afterwards: BooleanOptionalAction would append its own default
    return parser


def help_text(field: dataclasses.Field) -> str:
    """A flag's help: its declared help, and its default unless that is None (the help then says what None means)."""
    text = field.metadata["help"]
    if field.default is not None:
        shown = ("on" if field.default else "off") if isinstance(field.default, bool) else field.default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def parse_config(argv=None) -> TrainConfig:
    """TrainConfig from train.py's command line, validated; argparse exits 2 on a malformed flag."""
    return TrainConfig(**vars(build_parser().parse_args(argv))).validate()
