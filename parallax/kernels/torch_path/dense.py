"""Dense Parallax attention on one block of query rows: batched matmuls in a
heads-major layout, the closed-form backward of docs/parallax-math.md.

Layout: queries are [N, G, R, D] and keys [N, K, D] with N = batch * KV heads
and G query heads per KV head, so grouped-query attention multiplies the G * R
query rows of a group against its keys in one matmul, keys never repeated.

Matrix products dominate, then passes over [R, K] tensors (and, on CPU, the
first touch of fresh memory), so a block's forward makes three [R, K]
tensors, two of which it keeps, p and the Parallax weights
w = p (1 + sbar - s2), the second made in place of s2.

    s1 = (scale q) k^T + mask bias (0 / -inf),  p = softmax(s1)
    s2 = r k^T,  P2 = p s2,  sbar = rowsum(P2),  w = p (1 + sbar) - P2,  o = w v

The backward rewrites docs/parallax-math.md's ds1 through w, since
p (g - E)(1 + sbar - s2) = (g - E) w:

    g = dO v^T,  E = rowsum(p g),  D = <dO, o>
    ds1 = (g - E) w + (E - D) p,   ds2 = -p (g - E)
    dq = scale ds1 k,  dr = ds2 k,  dk = ds1^T (scale q) + ds2^T r,  dv = w^T dO

six matrix products (nine with the forward's three) and two new [R, K]
tensors, g and ds1. With `r=None` (softmax attention) w is p and D = E.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference import visible_keys


def heads_view(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, HQ, D] seen as [B, HK, G, T, D], a view."""
    return x.unflatten(2, (kv_heads, x.shape[2] // kv_heads)).permute(0, 2, 3, 1, 4)


def to_heads(x: torch.Tensor, kv_heads: int, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """[B, T, HQ, D] -> a new contiguous [B * HK, G, T, D] in `dtype`, times `scale`."""
    B, T, H, D = x.shape
    # copy_ then mul_, not mul(..., out=out): torch.compile gives an out= result
    # the strides of its input, and the view below then fails for batch > 1.
    out = torch.empty(B, kv_heads, H // kv_heads, T, D, dtype=dtype, device=x.device)
    out.copy_(heads_view(x, kv_heads))
    if scale is not None:
        out.mul_(scale)
    return out.view(B * kv_heads, H // kv_heads, T, D)


class MaskBand(NamedTuple):
    """Additive mask of a block on a band of its keys: `bias` [R, len(cols)] is
    0 where the row sees the key and -inf elsewhere; `cols` indexes the block's keys."""

    bias: torch.Tensor
    cols: slice


def mask_bias(rows: range, keys: range, shift: int, causal: bool, window_size: int | None,
              dtype: torch.dtype, device) -> list[MaskBand]:
    """The mask of query rows `rows` (row i at key position i + shift) against
    `keys`, as bands; every key outside them is seen by every row.

    Only the causal diagonal and the window's lower edge cut through a block,
    a band of len(rows) - 1 keys each, so the bias is [R, about R], not [R, K].
    """
    edges = []
    if causal:
        edges.append((rows.start + shift + 1, rows.stop + shift))
    if window_size is not None:
        edges.append((rows.start + shift - window_size + 1, rows.stop + shift - window_size))
    bands = []
    for lo, hi in sorted((max(lo, keys.start), min(hi, keys.stop)) for lo, hi in edges):
        if hi <= lo:
            continue
        if bands and lo <= bands[-1][1]:
            bands[-1] = (bands[-1][0], max(hi, bands[-1][1]))
        else:
            bands.append((lo, hi))
    query_pos = torch.arange(rows.start, rows.stop, device=device)[:, None] + shift
    out = []
    for lo, hi in bands:
        key_pos = torch.arange(lo, hi, device=device)[None, :]
        visible = visible_keys(query_pos, key_pos, causal=causal, window_size=window_size)
        bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        out.append(MaskBand(bias, slice(lo - keys.start, hi - keys.start)))
    return out


class BlockState(NamedTuple):
    """What a block's forward leaves for its backward: p and w [N, G * R, K]
    (w is p for softmax attention)."""

    p: torch.Tensor
    w: torch.Tensor


def _scores(x, k, mask: list[MaskBand]):
    """x k^T [N, G * R, K] for rows x [N, G, R, D], plus the mask bias."""
    N, G, R, D = x.shape
    s = torch.matmul(x.reshape(N, G * R, D), k.transpose(1, 2))
    for band in mask:
        s.view(N, G, R, -1)[..., band.cols].add_(band.bias)
    return s


def _softmax(s: torch.Tensor) -> torch.Tensor:
    # torch.softmax, not exp_ in place: exp_ runs 5x slower on -inf (the mask)
    # and 40x slower on inputs below -87 (float32 underflow); softmax does not.
    return torch.softmax(s, dim=-1)


def block_forward(qs, r, k, v, mask: list[MaskBand]):
    """Forward of query rows qs = scale * q and r [N, G, R, D] (r may be None)
    against keys k, v [N, K, D]; every row must see a key.

    Returns the BlockState, 1 + sbar [N, G * R, 1] (None without r; it lets
    `block_recompute` rebuild w in two passes) and o [N, G, R, D].
    """
    N, G, R, D = qs.shape
    p = w = _softmax(_scores(qs, k, mask))
    one_sbar = None
    if r is not None:
        p2 = _scores(r, k, []).mul_(p)
        one_sbar = p2.sum(-1, keepdim=True).add_(1.0)
        w = p2.neg_().addcmul_(p, one_sbar)  # p (1 + sbar) - p s2
    o = torch.matmul(w, v).view(N, G, R, D)
    return BlockState(p, w), one_sbar, o


def block_recompute(qs, r, k, mask: list[MaskBand], one_sbar) -> BlockState:
    """The BlockState of `block_forward` again, given its 1 + sbar."""
    p = w = _softmax(_scores(qs, k, mask))
    if r is not None:
        s2 = _scores(r, k, [])
        w = torch.sub(one_sbar, s2, out=s2).mul_(p)  # p (1 + sbar - s2)
    return BlockState(p, w)


def block_backward(state: BlockState, do, d, qs, r, k, v, scale: float):
    """Gradients of one block from its forward state, dO [N, G, R, D] and
    D = <dO, o> [N, G, R, 1] (None for softmax attention); qs = scale * q.

    Returns dq, dr (None without r), dk, dv; dk and dv [N, K, D] are this
    block's contributions.
    """
    p, w = state
    N, GR, K = p.shape
    G, R, D = qs.shape[1], qs.shape[2], qs.shape[3]
    do_f = do.reshape(N, GR, D)
    g = torch.matmul(do_f, v.transpose(1, 2))
    ds1 = torch.mul(p, g)
    e = ds1.sum(-1, keepdim=True)  # E_i = sum_j p_ij g_ij = <dO_i, mu_i>
    g.sub_(e)
    dv = torch.matmul(w.transpose(1, 2), do_f)
    torch.mul(w, g, out=ds1)
    if r is not None:
        ds1.addcmul_(p, e - d.reshape(N, GR, 1))
    dq = torch.matmul(ds1, k).mul_(scale).view(N, G, R, D)
    dk = torch.matmul(ds1.transpose(1, 2), qs.reshape(N, GR, D))
    if r is None:
        return dq, None, dk, dv
    h = g.mul_(p)  # -ds2
    dk.baddbmm_(h.transpose(1, 2), r.reshape(N, GR, D), alpha=-1)
    return dq, torch.matmul(h, k).neg_().view(N, G, R, D), dk, dv
