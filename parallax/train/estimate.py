"""What a run will cost, said before it starts: its time and peak memory.

Time: FLOPs over rates measured now. Two matmuls are timed for a tenth of a
second each on the run's device (so a busy machine gets a longer estimate):
one of the model's shape in the activations' dtype, for training, evaluation
and the sample, and one in bfloat16, the dtype of Muon's Newton-Schulz
iterations (on a CPU without bfloat16 matrix units these run 20-50x slower
than float32 and can take half a step). Each part reaches a fraction of its
timed rate (`EFFICIENCY`); decoding the sample one token at a time adds a
fixed cost per layer and token. Memory: weights, gradients and optimizer
state, plus what one micro-batch keeps for its backward (per layer and token,
as autograd saves it; the torch path's kept score matrices from its own plan).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kernels.torch_path.blockwise import plan
from ..models import GPT
from ..models.config import GPTConfig
from ..optim import split_params


class Efficiency(NamedTuple):
    """FLOP/s reached over the timed matmul's FLOP/s."""
    train: float  # forward + backward of a micro-batch
    eval: float  # a no-grad forward
    muon: float  # the Newton-Schulz iterations, against the bfloat16 matmul


# CPU: measured on the 2-core development machine, one thread, each part timed
# between two probes of its rate (small: train 0.50-0.63, eval 0.42-0.73, Muon
# 1.1-1.5; tiny trains at 0.15-0.20, bound by per-op overhead; see
# docs/training.md). CUDA and MPS: not measured yet, a guess; the progress
# bar's eta corrects it after the first steps.
EFFICIENCY = {"cpu": Efficiency(0.55, 0.55, 1.2), "cuda": Efficiency(0.3, 0.3, 0.5),
              "mps": Efficiency(0.3, 0.3, 0.5)}
# Decoding one token at a time: FLOP-equivalents per layer and token of fixed
# cost, and the slowdown of its matrix-vector products against the timed
# matmul (fitted to `small` and `20m` on the development CPU).
DECODE_LAYER_FLOPS = 8e7
DECODE_SLOWDOWN = 18
PROBE_SECONDS = 0.1
PROBE_ROWS = 4096
PROBE_BF16_DIM = 256  # bfloat16 may be slow: a smaller probe
NS_STEPS = 5  # Muon's Newton-Schulz iterations per matrix and step


@dataclass(frozen=True)
class Estimate:
    train_s: float  # the training steps still to run
    eval_s: float  # their evaluations and the final sample
    memory_bytes: int  # peak, weights to activations (not Python and torch themselves)
    rate: float  # FLOP/s the timed matmul in the activations' dtype reached

    @property
    def seconds(self) -> float:
        return self.train_s + self.eval_s


def forward_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Forward FLOPs of one token of a length-`seq_len` sequence (a multiply-add is 2)."""
    return projection_flops_per_token(config) + attention_flops_per_token(config, seq_len)


def projection_flops_per_token(config: GPTConfig) -> float:
    """The forward's matmuls with weights: q, k, v, o (and the probe r), SwiGLU, lm_head."""
    d, hd = config.n_embd, config.head_dim
    q, kv, f = config.n_head * hd, config.kv_heads * hd, config.resolved_mlp_hidden()
    per_layer = d * (q * (3 if config.attention == "parallax" else 2) + 2 * kv) + 3 * d * f
    return 2 * (config.n_layer * per_layer + d * config.vocab_size)


def attention_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """The forward's q.k and p.v per visible key; Parallax adds r.k and the covariance's weighted values."""
    matmuls = 4 if config.attention == "parallax" else 2
    keys = _mean_visible_keys(seq_len, config.window_size)
    return 2 * config.n_layer * matmuls * config.n_head * config.head_dim * keys


def _mean_visible_keys(T: int, window: int | None) -> float:
    if window is None or window >= T:
        return (T + 1) / 2
    return (window * (window + 1) / 2 + (T - window) * window) / T


def muon_flops(shapes) -> float:
    """FLOPs of one Muon step's Newton-Schulz iterations over matrices of these shapes."""
    total = 0.0
    for shape in shapes:
        m, n = sorted((shape[0], math.prod(shape[1:])))
        total += NS_STEPS * (4 * m * m * n + 2 * m * m * m)  # X X^T, the polynomial in it, and its product with X
    return total


def activation_bytes_per_token(config: GPTConfig, itemsize: int) -> float:
    """Bytes one token of a micro-batch keeps for the backward, score matrices aside (what autograd saves,
    counted on the model: tests/train/test_estimate.py)."""
    d, hd = config.n_embd, config.head_dim
    q, kv, f = config.n_head * hd, config.kv_heads * hd, config.resolved_mlp_hidden()
    heads = 3 * q if config.attention == "parallax" else 2 * q  # q (and the probe r) by head, the output
    # per layer: nine copies of the residual width (norms' inputs and outputs, projections' inputs), q/r/o
    # and k, v by head, SwiGLU's gate, up, silu and product; then the log-softmax and, in the backward, its gradient
    per_layer = 9 * d + heads + 2 * kv + 4 * f
    return (config.n_layer * per_layer + 2 * config.vocab_size) * itemsize


def kept_score_bytes(config: GPTConfig, batch_size: int, seq_len: int) -> int:
    """What the torch path's Parallax forward keeps per layer for its backward (see kernels.torch_path.blockwise.plan)."""
    blocks, keep = plan(batch_size, seq_len, seq_len, config.n_head, True, config.window_size, 4)
    return sum(2 * batch_size * config.n_head * len(t) * len(s) * 4 for t, s in blocks) if keep else 0


def matmul_rate(device: torch.device, dtype: torch.dtype, rows: int, inner: int, cols: int) -> float:
    """FLOP/s of a [rows, inner] @ [inner, cols] matmul on `device`, timed for about PROBE_SECONDS."""
    a = torch.ones(rows, inner, device=device, dtype=dtype)  # no random numbers: the run's RNG state stays
    b = torch.ones(inner, cols, device=device, dtype=dtype)
    sync = (lambda: None) if device.type == "cpu" else (lambda: torch.accelerator.synchronize(device))
    a @ b  # warm-up
    sync()
    start, repeats = time.perf_counter(), 0
    while repeats == 0 or time.perf_counter() - start < PROBE_SECONDS:
        a @ b
        sync()
        repeats += 1
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start)


def estimate(model: GPT, *, optimizer: str, batch_size: int, seq_len: int, grad_accum: int, steps: int, evals: int,
             eval_tokens: int, sample_tokens: int, device: torch.device, dtype: torch.dtype,
             torch_path: bool) -> Estimate:
    """The cost, on one process, of `steps` training steps with `optimizer` ("muon": Muon on the hidden
    matrices and AdamW on the rest, or "adamw"), `evals` evaluations of `eval_tokens` tokens and a sample
    of `sample_tokens`, with activations in `dtype` (parallax attention on the torch path keeps scores)."""
    config = model.config
    matrices, rest = split_params(model)
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    muon = optimizer == "muon" and bool(matrices)
    efficiency = EFFICIENCY.get(device.type, EFFICIENCY["cuda"])
    rate = matmul_rate(device, dtype, min(batch_size * seq_len, PROBE_ROWS), config.n_embd,
                       config.resolved_mlp_hidden())
    forward = forward_flops_per_token(config, seq_len)
    step = 3 * forward * batch_size * seq_len * grad_accum / (rate * efficiency.train)
    if muon:
        m, n = (min(x, PROBE_BF16_DIM) for x in sorted(matrices[-1].shape))
        bf16_rate = matmul_rate(device, torch.bfloat16, m, m, n)
        step += muon_flops(p.shape for p in matrices) / (bf16_rate * efficiency.muon)
    decode = DECODE_LAYER_FLOPS * config.n_layer + DECODE_SLOWDOWN * forward
    side = (forward * evals * eval_tokens / efficiency.eval + decode * sample_tokens) / rate
    weights = numel(matrices) + numel(rest)
    state = 4 * numel(matrices) + 8 * numel(rest) if muon else 8 * weights  # momentum; AdamW's two moments
    scores = config.n_layer * kept_score_bytes(config, batch_size, seq_len) if torch_path else 0
    itemsize = torch.finfo(dtype).bits // 8
    memory = 2 * 4 * weights + state + scores + activation_bytes_per_token(config, itemsize) * batch_size * seq_len
    return Estimate(steps * step, side, int(memory), rate)


def free_memory(device: torch.device) -> int | None:
    """Bytes a run can still allocate on `device`, where that can be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def describe_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def describe_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{max(1, round(n / 1e6))} MB"
