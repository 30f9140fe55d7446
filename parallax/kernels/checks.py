"""Input validation shared by every attention entry point.

Each check raises ValueError (wrong value or shape) or TypeError (wrong type or
dtype) with a message that names the argument and says what was expected.
"""
from __future__ import annotations

import math

import torch


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_qkv(q, r, k, v) -> None:
    """q, r: [B, T, HQ, D]; k, v: [B, S, HK, D]; r may be None (softmax attention)."""
    layout_q = "[batch, seq, heads, head_dim]"
    check_tensor("q", q, 4, layout_q)
    if r is not None:
        check_tensor("r", r, 4, layout_q)
        if r.shape != q.shape:
            raise ValueError(f"r must have the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    check_tensor("k", k, 4, "[batch, seq_k, kv_heads, head_dim]")
    check_tensor("v", v, 4, "[batch, seq_k, kv_heads, head_dim]")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have the batch size of q ({q.shape[0]}), got {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the head_dim of q ({q.shape[3]}), got {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]}) for grouped-query attention"
        )
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    if r is not None:
        check_same("q", q, "r", r)


def check_same(ref_name: str, ref: torch.Tensor, name: str, x: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def check_window(window_size) -> None:
    if window_size is None:
        return
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be None or an int >= 1, got {window_size!r}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1 (the query itself counts), got {window_size}")


def check_scale(scale) -> None:
    """None or a finite number; zero and negative scales are valid (they flatten or invert the softmax)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None or a number, got {scale!r}")
    try:
        finite = math.isfinite(scale)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def resolve_scale(scale, head_dim: int) -> float:
    """A checked `scale` as a float; None means head_dim ** -0.5 (1 for head_dim 0: nothing to scale)."""
    if scale is not None:
        return float(scale)
    return head_dim ** -0.5 if head_dim else 1.0


def check_flag(name: str, value) -> None:
    """A bool argument: a string such as 'no' would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_deterministic(deterministic) -> None:
    check_flag("deterministic", deterministic)


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, k: torch.Tensor) -> None:
    """Packed variable-length batch: batch 1, cu_seqlens int32 [N+1] from 0 to T."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be an int32 tensor of shape [num_seqs + 1], got dtype {cu_seqlens.dtype} "
            f"and shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on the device of q ({q.device}), got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs q packed into batch 1, got batch {q.shape[0]}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"cu_seqlens needs k with the sequence length of q ({q.shape[1]}), got {k.shape[1]}")
    if cu_seqlens.is_cuda or torch.compiler.is_compiling():
        # Reading the values would wait for the device (and break a traced graph).
        assert_cu_seqlens_async(cu_seqlens, q.shape[1])
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[1]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the total length {q.shape[1]}, got {bounds[0]} ... {bounds[-1]}"
        )
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")


def assert_cu_seqlens_async(cu_seqlens: torch.Tensor, total: int) -> None:
    """The value checks of `check_cu_seqlens` on the device, without waiting
    for it: a device-side assert on CUDA (fatal to the process, as an index
    out of range), a RuntimeError on CPU."""
    ends_ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total)
    torch._assert_async(ends_ok, f"cu_seqlens must start at 0 and end at the total length {total}")
    torch._assert_async((cu_seqlens[1:] >= cu_seqlens[:-1]).all(), "cu_seqlens must be non-decreasing")
