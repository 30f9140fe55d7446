"""Dense Parallax attention on one block of query rows: batched matmuls in a
heads-major layout, the closed-form backward of docs/parallax-math.md.

Layout: queries are [N, G, R, D] and keys [N, K, D] with N = batch * KV heads
and G query heads per KV head, so grouped-query attention multiplies the G * R
query rows of a group against its keys in one matmul, keys never repeated.

Matrix products dominate, then passes over [R, K] tensors, so a block makes
three [R, K] tensors in its forward and keeps two, p and the Parallax weights
w = p (1 + sbar - s2), updating them in place:

    s1 = (scale q) k^T + bias (0 / -inf),  p = softmax(s1)
    sbar = rowsum(p s2),  w = p (1 + sbar - s2)  (in place of s2 = r k^T),  o = w v

The backward rewrites docs/parallax-math.md's ds1 through w, since
p (g - E)(1 + sbar - s2) = (g - E) w:

    g = dO v^T,  E = rowsum(p g),  D = <dO, o>
    ds1 = (g - E) w + (E - D) p,   ds2 = -p (g - E)
    dq = scale ds1 k,  dr = ds2 k,  dk = ds1^T (scale q) + ds2^T r,  dv = w^T dO

which is six matrix products (nine with the forward's three) and two new
[R, K] tensors, g and ds1 (none when the scores may be overwritten). With
`r=None` (softmax attention) w is p and ds2 is not needed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import keys_visible


def heads_view(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, HQ, D] seen as [B, HK, G, T, D], a view."""
    return x.unflatten(2, (kv_heads, x.shape[2] // kv_heads)).permute(0, 2, 3, 1, 4)


def to_heads(x: torch.Tensor, kv_heads: int, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """[B, T, HQ, D] -> a new contiguous [B * HK, G, T, D] in `dtype`, times `scale`."""
    B, T, H, D = x.shape
    out = torch.empty(B, kv_heads, H // kv_heads, T, D, dtype=dtype, device=x.device)
    if scale is not None and x.dtype == dtype:
        torch.mul(heads_view(x, kv_heads), scale, out=out)
    else:
        out.copy_(heads_view(x, kv_heads))
        if scale is not None:
            out.mul_(scale)
    return out.view(B * kv_heads, H // kv_heads, T, D)


def mask_bias(rows: range, keys: range, shift: int, causal: bool, window_size: int | None,
              dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive mask [len(rows), len(keys)]: 0 where query row i (at key position
    i + shift) sees key j, -inf elsewhere; None when every key is visible."""
    query_pos = torch.arange(rows.start, rows.stop, device=device)[:, None] + shift
    key_pos = torch.arange(keys.start, keys.stop, device=device)[None, :]
    visible = keys_visible(query_pos, key_pos, causal=causal, window_size=window_size)
    if bool(visible.all()):
        return None
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place: a fresh [R, K] tensor costs more
    than the extra pass (first-touch page faults of the new memory)."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.mul_(x.sum(-1, keepdim=True).reciprocal_())


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij as [..., R, 1], without materialising a * b."""
    return torch.einsum("nik,nik->ni", a, b).unsqueeze(-1)


class BlockState(NamedTuple):
    """What a block's forward leaves for its backward: p and w [N, G, R, K]
    (w is p for softmax attention) and the output o [N, G, R, D]."""

    p: torch.Tensor
    w: torch.Tensor
    o: torch.Tensor


def block_forward(qs, r, k, v, bias, scale: float) -> BlockState:
    """Forward of query rows qs = scale * q and r [N, G, R, D] (r may be None)
    against keys k, v [N, K, D], under an additive mask `bias` [R, K] (or
    None); every row must see a key."""
    N, G, R, D = qs.shape
    K = k.shape[1]
    s1 = torch.matmul(qs.reshape(N, G * R, D), k.transpose(1, 2))
    if bias is not None:
        s1.view(N, G, R, K).add_(bias)
    p = softmax_(s1)
    w = p
    if r is not None:
        s2 = torch.matmul(r.reshape(N, G * R, D), k.transpose(1, 2))
        one_sbar = row_dot(p, s2).add_(1.0)
        w = torch.sub(one_sbar, s2, out=s2).mul_(p)
    o = torch.matmul(w, v).view(N, G, R, D)
    return BlockState(p, w, o)


def block_backward(state: BlockState, do, qs, r, k, v, scale: float, *, overwrite: bool):
    """Gradients of one block from its forward state and dO [N, G, R, D];
    qs = scale * q as in `block_forward`.

    Returns dq, dr (None without r), dk, dv; dk and dv [N, K, D] are this
    block's contributions. `overwrite` lets the backward reuse the state's
    memory (only when nothing else holds it).
    """
    p, w = state.p, state.w
    N, GR, K = p.shape
    G, R, D = qs.shape[1], qs.shape[2], qs.shape[3]
    do_f = do.reshape(N, GR, D)
    g = torch.matmul(do_f, v.transpose(1, 2))
    e = row_dot(p, g)  # E_i = sum_j p_ij g_ij = <dO_i, mu_i>
    g.sub_(e)
    dv = torch.matmul(w.transpose(1, 2), do_f)
    ds1 = w.mul_(g) if overwrite else w * g
    if r is not None:  # with r=None, E = D and ds1 = p (g - E)
        d = (do_f * state.o.reshape(N, GR, D)).sum(-1, keepdim=True)  # D_i = <dO_i, o_i>
        ds1.addcmul_(p, e - d)
    dq = torch.matmul(ds1, k).mul_(scale).view(N, G, R, D)
    dk = torch.matmul(ds1.transpose(1, 2), qs.reshape(N, GR, D))
    if r is None:
        return dq, None, dk, dv
    h = g.mul_(p)  # -ds2
    dk.baddbmm_(h.transpose(1, 2), r.reshape(N, GR, D), alpha=-1)
    return dq, torch.matmul(h, k).neg_().view(N, G, R, D), dk, dv
