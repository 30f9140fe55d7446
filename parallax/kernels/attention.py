"""`parallax_attn` and `softmax_attention`: the functions users call.

They validate, resolve the backend and hand the inputs to the Triton kernel
(CUDA tensors) or the blockwise torch path (everything else).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .torch_path.blockwise import blockwise_attention
from .checks import check_cu_seqlens, check_deterministic, check_flag, check_qkv, check_scale, check_window, resolve_scale
from .window import spanning_window


def _validate(q, r, k, v, scale, causal, window_size, cu_seqlens, backend, deterministic) -> str:
    """Check every argument; returns the path to take, "triton" or "torch"."""
    check_qkv(q, r, k, v)
    check_scale(scale)
    check_flag("causal", causal)
    check_window(window_size)
    check_deterministic(deterministic)
    backend = resolve_backend(backend, q)
    check_cu_seqlens(cu_seqlens, q, k)
    return backend


def _torch_path(q, r, k, v, scale, causal, window_size, cu_seqlens):
    if cu_seqlens is None:
        return blockwise_attention(q, r, k, v, scale=scale, causal=causal, window_size=window_size)
    bounds = cu_seqlens.tolist()
    pieces = [
        blockwise_attention(
            q[:, a:b], None if r is None else r[:, a:b], k[:, a:b], v[:, a:b],
            scale=scale, causal=causal, window_size=window_size,
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(pieces, dim=1)


def _triton_path(q, r, k, v, scale, causal, window_size, cu_seqlens, deterministic=True):
    from .triton.op import parallax_triton  # lazy: the op's kernels need triton

    return parallax_triton(q, r, k, v, scale, causal, window_size, cu_seqlens, deterministic)


def parallax_attn(q, r, k, v, *, scale=None, causal=True, window_size=None, cu_seqlens=None, backend=None,
                  deterministic=True):
    """Parallax attention: softmax attention minus the probe covariance.

    o_i = sum_j w_ij v_j with p = softmax(scale * q.k), s2 = r.k (unscaled),
    w_ij = p_ij (1 + sbar_i - s2_ij), sbar_i = sum_j p_ij s2_ij.

    Args:
        q, r: [B, T, HQ, D] queries and probes.
        k, v: [B, S, HK, D], HQ a multiple of HK (grouped-query attention).
        scale: multiplies q.k only; None means D ** -0.5.
        causal: end-aligned causal mask, query i sees key j <= i + S - T.
        window_size: keep only the W most recent visible keys (self included).
        cu_seqlens: int32 [N + 1] offsets of N sequences packed in batch 1
            (T == S); each sequence is masked on its own.
        backend: None (Triton on CUDA, torch otherwise), "torch" or "triton";
            see `backend.py`.
        deterministic: Triton backward only. True (default): three
            launches, no atomics, bitwise reproducible. False: one fused
            launch that adds dq, dr with float32 atomics (fewer products,
            but slower on an H200 and not reproducible in dq, dr's last
            bits; see docs/kernels.md).

    Returns [B, T, HQ, D] in q's dtype; rows that see no key are 0.
    Differentiable in q, r, k and v.
    """
    if r is None:
        raise TypeError("r must be a torch.Tensor (the probe); for plain softmax attention call softmax_attention")
    path = _validate(q, r, k, v, scale, causal, window_size, cu_seqlens, backend, deterministic)
    if q.numel() == 0:  # batch, length or head_dim 0: an empty output
        return q * 0
    scale = resolve_scale(scale, q.shape[-1])
    window_size = spanning_window(window_size, k.shape[1])
    if path == "triton":
        return _triton_path(q, r, k, v, scale, causal, window_size, cu_seqlens, deterministic)
    return _torch_path(q, r, k, v, scale, causal, window_size, cu_seqlens)


def _sdpa_agrees(q, k, v, scale) -> bool:
    """Whether PyTorch SDPA computes what the other paths do. Its causal CPU
    kernel returns NaN for scale <= 0. Off CUDA it also lets a non-finite
    value reach rows that do not see it (0 * NaN) and returns 0 for some NaN
    query rows, so inputs holding one take the exact path; reading them there
    costs little next to attention (on CUDA it would wait for the device)."""
    if scale is not None and scale <= 0:
        return False
    return q.is_cuda or all(bool(torch.isfinite(x).all()) for x in (q, k, v))


def softmax_attention(q, k, v, *, scale=None, causal=True, window_size=None, cu_seqlens=None, backend=None,
                      deterministic=True):
    """Softmax attention under the conventions of `parallax_attn` (no probe).

    backend None or "torch" use PyTorch SDPA where its mask convention
    coincides (no window, no cu_seqlens, and T == S when causal), and
    otherwise the path `parallax_attn` would take (None) or the blockwise
    torch path ("torch"); "triton" always runs the Triton kernel (with a zero
    probe), whose backward `deterministic` chooses as in `parallax_attn`.
    """
    path = _validate(q, None, k, v, scale, causal, window_size, cu_seqlens, backend, deterministic)
    if q.numel() == 0:  # batch, length or head_dim 0: an empty output
        return q * 0
    T, S = q.shape[1], k.shape[1]
    window_size = spanning_window(window_size, S)
    sdpa_mask_ok = cu_seqlens is None and window_size is None and S > 0 and (not causal or T == S)
    if backend != "triton" and sdpa_mask_ok and _sdpa_agrees(q, k, v, scale):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        )
        return o.transpose(1, 2)
    scale = resolve_scale(scale, q.shape[-1])
    if path == "triton":
        return _triton_path(q, None, k, v, scale, causal, window_size, cu_seqlens, deterministic)
    return _torch_path(q, None, k, v, scale, causal, window_size, cu_seqlens)
