"""GPTConfig, named presets and parameter matching for fair softmax baselines."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from ..kernels.backend import check_backend
from ..kernels.checks import check_deterministic, check_window

ATTENTION_KINDS = ("parallax", "softmax")
# Fields that choose how attention runs, not what the model computes: a
# checkpoint fits a model whatever their values.
EXECUTION_FIELDS = ("backend", "deterministic")


@dataclass
class GPTConfig:
    """Shape of a decoder-only transformer of `ParallaxAttention` + SwiGLU blocks.

    n_kv_head=None means n_head (no grouped-query attention). mlp_hidden=None
    means the SwiGLU default, 8/3 * n_embd rounded up to a multiple of 16.
    parameter_matched=True (softmax only) widens the MLP so the model has the
    parameter count of the Parallax model of the same config; see
    `matched_mlp_hidden`. window_size, backend and deterministic go to every
    attention layer (`ParallaxAttention`, `parallax_attn`).
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    n_embd: int = 128
    block_size: int = 256
    attention: str = "parallax"
    window_size: int | None = None
    backend: str | None = None
    deterministic: bool = True
    qk_norm: bool = False
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    mlp_hidden: int | None = None
    parameter_matched: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_head", "mlp_hidden"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("qk_norm", "tie_embeddings", "parameter_matched"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim n_embd / n_head = {self.n_embd // self.n_head} must be even (RoPE)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        check_window(self.window_size)
        check_backend(self.backend)
        check_deterministic(self.deterministic)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def base_mlp_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return int(self.mlp_hidden)
        return -(-(8 * self.n_embd // 3) // 16) * 16

    def resolved_mlp_hidden(self) -> int:
        """The MLP width the model is built with (after parameter matching)."""
        if self.parameter_matched and self.attention == "softmax":
            return matched_mlp_hidden(self)
        return self.base_mlp_hidden()

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def architecture(fields: dict) -> dict:
    """A `GPTConfig.to_dict()` without EXECUTION_FIELDS: what decides the model's parameters and outputs."""
    return {k: v for k, v in fields.items() if k not in EXECUTION_FIELDS}


def count_parameters(config: GPTConfig, *, mlp_hidden: int | None = None) -> int:
    """Number of parameters of `GPT(config)`, without building it."""
    d, h, hk, hd, L = config.n_embd, config.n_head, config.kv_heads, config.head_dim, config.n_layer
    f = config.resolved_mlp_hidden() if mlp_hidden is None else mlp_hidden
    attn = d * h * hd + 2 * d * hk * hd + h * hd * d  # q, k, v, o
    if config.attention == "parallax":
        attn += d * h * hd  # r
    if config.qk_norm:
        attn += 2 * hd + (hd if config.attention == "parallax" else 0)
    block = attn + 3 * d * f + 2 * d  # SwiGLU + two RMSNorm gains
    emb = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return L * block + emb + d  # + final norm


def matched_mlp_hidden(config: GPTConfig) -> int:
    """SwiGLU width that gives a softmax model the Parallax model's parameter count.

    The Parallax layer adds the probe projection W_R (n_embd x n_head*head_dim,
    plus a head_dim RMSNorm gain with qk_norm) per layer; a SwiGLU unit costs
    3 * n_embd parameters, so the softmax MLP grows by the nearest whole number
    of units.
    """
    base = config.base_mlp_hidden()
    target = count_parameters(config.replace(attention="parallax", parameter_matched=False))
    own = count_parameters(config.replace(attention="softmax", parameter_matched=False), mlp_hidden=base)
    per_unit = 3 * config.n_embd * config.n_layer
    return base + max(0, round((target - own) / per_unit))


PRESETS: dict[str, dict] = {
    # seconds on a CPU: tests and smoke runs
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    # the CPU default of `python train.py` (~1M parameters with bytes)
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    # `small` narrowed: the smaller rungs of the CPU scaling study (benchmarks/study)
    "small-48": dict(n_layer=4, n_head=4, n_embd=48, block_size=256),
    "small-80": dict(n_layer=4, n_head=4, n_embd=80, block_size=256),
    # GPU presets, named by their non-embedding parameter count (Parallax)
    "20m": dict(n_layer=10, n_head=6, n_embd=384, block_size=1024),
    "125m": dict(n_layer=12, n_head=14, n_embd=896, block_size=1024),
}


GPU_PRESETS = ("20m", "125m")  # hours per run on a CPU


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset (a key of PRESETS), with field overrides."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[key], **overrides})
