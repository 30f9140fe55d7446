"""The float32 (or float64) oracle: plain, readable Parallax attention.

Every kernel in parallax is tested against `parallax_reference`. It materialises
the full [T, S] score matrix, so keep it to test-sized inputs.
"""
from __future__ import annotations

import torch

from .checks import check_flag, check_qkv, check_scale, check_window, resolve_scale
from .window import spanning_window


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


def visible_range(T: int, S: int, *, causal: bool, window_size: int | None, device=None, cu_seqlens=None):
    """The row form of `visible_keys` for end-aligned queries: (lo, hi), int64
    [T] each; query i sees exactly the keys lo[i] <= j < hi[i] (none when lo[i] >= hi[i]).
    With cu_seqlens (packed sequences, T == S), each token's range stays within its sequence."""
    if cu_seqlens is None:
        query_pos = end_aligned_positions(T, S, device)[0][:, 0]
        first, end = torch.zeros_like(query_pos), torch.full_like(query_pos, S)
    else:
        query_pos = torch.arange(T, device=device)
        bounds = cu_seqlens.long()
        sequence = torch.searchsorted(bounds[1:], query_pos, right=True).clamp(max=len(bounds) - 2)
        first, end = bounds[sequence], bounds[sequence + 1]
    hi = torch.minimum(query_pos + 1, end) if causal else end
    lo = torch.maximum(query_pos - window_size + 1, first) if window_size is not None else first
    return lo, torch.maximum(lo, hi)


def nonfinite_positions(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bool [B, S, HK]: key positions whose key or value holds NaN or +-inf."""
    return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def rows_seeing(bad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Bool [B, T, HK]: whether query row t sees a key position marked in
    `bad` [B, S, HK], given `visible_range`'s lo, hi (prefix counts: O(S + T))."""
    counts = torch.nn.functional.pad(bad.long().cumsum(1), (0, 0, 1, 0))  # [B, S + 1, HK]
    return counts[:, hi] > counts[:, lo]


def poison_rows(out: torch.Tensor, bad_rows: torch.Tensor) -> torch.Tensor:
    """`out` [B, T, HQ, D] with NaN in every row of a query that sees a
    non-finite key or value (`bad_rows` [B, T, HK], GQA groups share it).

    The paths compute on keys and values with non-finite entries zeroed, so
    a position a row does not see cannot reach it through a zero weight
    (0 * NaN = NaN); this restores NaN to the rows that do see one. As a
    `masked_fill`, those rows pass no gradient back. Reads nothing back
    from the device (decoding steps run in CUDA graphs)."""
    group = out.shape[2] // max(1, bad_rows.shape[2])
    return out.masked_fill(bad_rows.repeat_interleave(group, dim=2)[..., None], float("nan"))


def parallax_reference(q, r, k, v, *, scale=None, causal=True, window_size=None):
    """o = mu - Cov_p(<r, k>, v): softmax attention minus the probe covariance.

    q, r: [B, T, HQ, D]; k, v: [B, S, HK, D] with HQ a multiple of HK. `scale`
    (default D ** -0.5) multiplies q.k only, never r.k. Computes in float64 when
    q is float64, else float32, and returns q's dtype. A row that sees no key
    returns 0, a row that sees a non-finite key or value NaN; positions a row
    does not see never reach it. See `visible_keys` for the mask.
    """
    if r is None:
        raise TypeError("r must be a torch.Tensor (the probe)")
    check_qkv(q, r, k, v)
    check_scale(scale)
    check_flag("causal", causal)
    check_window(window_size)
    B, T, HQ, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    scale = resolve_scale(scale, D)
    window_size = spanning_window(window_size, S)
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    visible = visible_keys(*end_aligned_positions(T, S, q.device), causal=causal, window_size=window_size)
    bad = nonfinite_positions(k, v)
    bad_rows = (visible[None, :, :, None] & bad[:, None]).any(2)
    q, r, k, v = (x.to(compute) for x in (q, r, k, v))
    k = k.nan_to_num(0.0, 0.0, 0.0).repeat_interleave(HQ // HK, dim=2)
    v = v.nan_to_num(0.0, 0.0, 0.0).repeat_interleave(HQ // HK, dim=2)

    s1 = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s2 = torch.einsum("bthd,bshd->bhts", r, k)
    # Rows with no visible key get finite logits so softmax (and its gradient)
    # stays NaN-free; their weights are zeroed just after.
    has_key = visible.any(dim=-1, keepdim=True)
    s1 = s1.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s1, dim=-1).masked_fill(~visible, 0.0)
    s2 = s2.masked_fill(~visible, 0.0)
    sbar = (p * s2).sum(dim=-1, keepdim=True)
    w = p * (1.0 + sbar - s2)
    o = torch.einsum("bhts,bshd->bthd", w, v)
    return poison_rows(o, bad_rows).to(out_dtype)
