"""Which implementation runs an attention call: the one place `backend` is resolved.

`parallax_attn`, `softmax_attention` and `parallax_attn_with_kvcache` (and so
the layer, GPT and the transformers models, which pass their `backend` down)
all resolve it here:

- "torch": the exact torch path, on any device.
- "triton": the Triton kernel, or a ValueError (TypeError for a dtype) saying
  why it cannot run: no triton package, tensors not on CUDA (Triton's CPU
  interpreter, TRITON_INTERPRET=1, runs them for tests), or inputs the
  kernel does not take.
- None: Triton for CUDA tensors it can run where triton is installed, except
  float32 wider than FLOAT32_MAX_HEAD_DIM (no tiling fits its registers: the
  AOT table); torch otherwise.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from .triton.resources import wide_float32

BACKENDS = (None, "torch", "triton")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def check_backend(backend) -> None:
    if backend is not None and not (isinstance(backend, str) and backend in BACKENDS):
        raise ValueError(f"backend must be one of None, 'torch', 'triton', got {backend!r}")


def _triton_cannot_run(q: torch.Tensor) -> Exception | None:
    if not TRITON_INSTALLED:
        return ValueError("backend='triton' needs the triton package; use backend='torch' or None")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got q on {q.device}; "
                          "use backend='torch' or None")
    return None


def resolve_backend(backend, q: torch.Tensor,
                    kernel_refuses: Callable[[torch.Tensor], Exception | None] | None = None) -> str:
    """"triton" or "torch" for a call on q; `kernel_refuses(q)` says why the
    op's kernel cannot take q (None when it can). Raises for an unknown
    backend and for an explicit "triton" that cannot run."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    reason = _triton_cannot_run(q) or (kernel_refuses(q) if kernel_refuses is not None else None)
    if backend == "triton":
        if reason is not None:
            raise reason
        return "triton"
    fits = reason is None and q.is_cuda and not wide_float32(q.dtype, q.shape[-1])
    return "triton" if fits else "torch"
