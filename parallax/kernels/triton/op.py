"""The Triton kernels as `torch.library` custom ops, so torch.compile traces them.

`parallax::attn_fwd` returns (o, lse, sbar, mu) and `parallax::attn_bwd` the
gradients of q, r, k, v; both have fake (meta) implementations, and autograd
links them. Only o is differentiable: lse, sbar and mu are saved state.
`deterministic` only matters to the backward
(the forward op takes it so autograd can pass it on): True runs the
three-launch backward without atomics, False the fused one with float32
atomics. Triton is imported on first call, so importing this module works
where triton is missing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import nonfinite_positions, poison_rows, rows_seeing, visible_range


@torch.library.custom_op("parallax::attn_fwd", mutates_args=())
def attn_fwd(
    q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    scale: float, causal: bool, window_size: Optional[int], cu_seqlens: Optional[torch.Tensor],
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .forward import parallax_fwd

    q, r, k, v = (x.contiguous() for x in (q, r, k, v))
    return parallax_fwd(q, r, k, v, scale, causal, window_size, cu_seqlens)


@attn_fwd.register_fake
def _attn_fwd_fake(q, r, k, v, scale, causal, window_size, cu_seqlens, deterministic=True):
    B, T, HQ, _ = q.shape
    stats = q.new_empty(B, HQ, T, dtype=torch.float32)
    return torch.empty_like(q), stats, torch.empty_like(stats), torch.empty_like(q)


@torch.library.custom_op("parallax::attn_bwd", mutates_args=())
def attn_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, sbar: torch.Tensor, mu: torch.Tensor,
    scale: float, causal: bool, window_size: Optional[int], cu_seqlens: Optional[torch.Tensor],
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .backward import parallax_bwd

    grad_out, q, r, k, v, o, mu = (x.contiguous() for x in (grad_out, q, r, k, v, o, mu))
    return parallax_bwd(grad_out, q, r, k, v, o, lse, sbar, mu, scale, causal, window_size, cu_seqlens,
                        deterministic)


@attn_bwd.register_fake
def _attn_bwd_fake(grad_out, q, r, k, v, o, lse, sbar, mu, scale, causal, window_size, cu_seqlens,
                   deterministic=True):
    return torch.empty_like(q), torch.empty_like(r), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, r, k, v, scale, causal, window_size, cu_seqlens, deterministic = inputs
    o, lse, sbar, mu = output
    ctx.mark_non_differentiable(lse, sbar, mu)
    ctx.save_for_backward(q, r, k, v, o, lse, sbar, mu, cu_seqlens)
    ctx.args = (scale, causal, window_size)
    ctx.deterministic = deterministic


def _backward(ctx, grad_out, _grad_lse, _grad_sbar, _grad_mu):
    q, r, k, v, o, lse, sbar, mu, cu_seqlens = ctx.saved_tensors
    dq, dr, dk, dv = attn_bwd(grad_out, q, r, k, v, o, lse, sbar, mu, *ctx.args, cu_seqlens, ctx.deterministic)
    return dq, dr, dk, dv, None, None, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def parallax_triton(q, r, k, v, scale: float, causal: bool, window_size: int | None, cu_seqlens,
                    deterministic: bool = True):
    """Parallax attention through the custom op; r=None gives softmax attention
    (a zero probe, at Parallax cost).

    The kernels see keys and values with non-finite entries zeroed, and the
    rows that see one are made NaN afterwards: a key a row does not see then
    cannot reach it through a zero weight (0 * NaN), and the kernels' loops
    stay free of per-element checks (a few elementwise passes over K and V
    instead, with no read back to the host)."""
    probe = torch.zeros_like(q) if r is None else r
    bad = nonfinite_positions(k, v)
    k, v = (x.masked_fill(bad[..., None], 0.0) for x in (k, v))
    out = attn_fwd(q, probe, k, v, scale, causal, window_size, cu_seqlens, deterministic)[0]
    lo, hi = visible_range(q.shape[1], k.shape[1], causal=causal, window_size=window_size, device=q.device,
                           cu_seqlens=cu_seqlens)
    return poison_rows(out, rows_seeing(bad, lo, hi))
