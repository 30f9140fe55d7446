"""The float32 (or float64) oracle: plain, readable Parallax attention.

Every kernel in parallax is tested against `parallax_reference`. It materialises
the full [T, S] score matrix, so keep it to test-sized inputs.
"""
from __future__ import annotations

import torch

from .checks import check_qkv, check_scale, check_window


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, *, causal: bool,
                 window_size: int | None) -> torch.Tensor:
    """Whether a query may attend to a key, from broadcastable integer tensors of
    query positions (in key coordinates) and key positions.

    Causal keeps keys at or before the query; a window of W keeps the W most
    recent of those (the query's own key included). With T queries end-aligned
    with S keys (FlashAttention's convention, `end_aligned_positions`), query i
    sits at key position i + S - T. T=3, S=5 (x = visible):

        causal              causal, W=2
        x x x . .           . x x . .
        x x x x .           . . x x .
        x x x x x           . . . x x

    Without `causal`, the window only bounds keys from below (FlashAttention's
    window_size=(W - 1, -1)).
    """
    visible = torch.ones(torch.broadcast_shapes(query_pos.shape, key_pos.shape), dtype=torch.bool,
                         device=query_pos.device)
    if causal:
        visible &= key_pos <= query_pos
    if window_size is not None:
        visible &= key_pos > query_pos - window_size
    return visible


def end_aligned_positions(T: int, S: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of T queries end-aligned with S keys, [T, 1], and of the keys, [1, S]."""
    return torch.arange(T, device=device)[:, None] + (S - T), torch.arange(S, device=device)[None, :]


def parallax_reference(q, r, k, v, *, scale=None, causal=True, window_size=None):
    """o = mu - Cov_p(<r, k>, v): softmax attention minus the probe covariance.

    q, r: [B, T, HQ, D]; k, v: [B, S, HK, D] with HQ a multiple of HK. `scale`
    (default D ** -0.5) multiplies q.k only, never r.k. Computes in float64 when
    q is float64, else float32, and returns q's dtype. A row that sees no key
    returns 0. See `visible_keys` for the mask.
    """
    check_qkv(q, r, k, v)
    check_scale(scale)
    check_window(window_size)
    B, T, HQ, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, r, k, v = (x.to(compute) for x in (q, r, k, v))
    k = k.repeat_interleave(HQ // HK, dim=2)
    v = v.repeat_interleave(HQ // HK, dim=2)

    s1 = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s2 = torch.einsum("bthd,bshd->bhts", r, k)
    visible = visible_keys(*end_aligned_positions(T, S, q.device), causal=causal, window_size=window_size)
    # Rows with no visible key get finite logits so softmax (and its gradient)
    # stays NaN-free; their weights are zeroed just after.
    has_key = visible.any(dim=-1, keepdim=True)
    s1 = s1.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s1, dim=-1).masked_fill(~visible, 0.0)
    s2 = s2.masked_fill(~visible, 0.0)
    sbar = (p * s2).sum(dim=-1, keepdim=True)
    w = p * (1.0 + sbar - s2)
    o = torch.einsum("bhts,bshd->bthd", w, v)
    return o.to(out_dtype)
