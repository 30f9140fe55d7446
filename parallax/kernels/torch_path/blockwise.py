"""The torch path: exact Parallax attention in blocks of query rows, any device.

Each block of query rows is scored against only the keys its mask can reach
(dense.py does a block's math with batched matmuls), so causal or windowed
inputs skip the keys nobody in the block sees. When the score matrices of all
blocks fit KEPT_SCORE_BYTES (the training shapes), the forward keeps them and
the backward reuses them: a dense computation. Beyond that the forward keeps
one number per row (1 + sbar) and the backward recomputes each block's scores, so
memory stays O(block * S) instead of O(T * S). Either way the backward is the
closed form of docs/parallax-math.md: exact, float64 included.

GQA is handled by viewing the HQ query heads as [HK, G] so keys are never
repeated. `r=None` computes plain softmax attention at softmax cost.
"""
from __future__ import annotations

import torch

from .dense import BlockState, block_backward, block_forward, block_recompute, heads_view, mask_bias, to_heads
from ..reference import nonfinite_positions, poison_rows, rows_seeing, visible_range
from ..window import spanning_window

# Rows per block: as many as fill SCORE_BLOCK_ELEMENTS elements of a
# [B * HQ, rows, keys] score matrix (a few MB, near the L2 cache, and causal
# blocks skip the keys above their diagonal), but at least MIN_BLOCK_ROWS so
# long sequences do not drown in per-block overhead (about fifty small ops).
SCORE_BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK_ROWS = 64
# Bytes of score matrices (p and w, two per block) the forward may keep for the
# backward; beyond that it keeps none and the backward recomputes them. Keeping
# saves two matmuls and a softmax per block (about 10% at T = 512 and 2048 on CPU).
KEPT_SCORE_BYTES = 512 << 20


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def parallax_weights(q, r, k, visible, scale):
    """Softmax weights p, probe scores s2 and their mean sbar (the decode path's torch fallback).

    q, r: [B, Tq, HK, G, D]; k: [B, Sk, HK, D]; visible: bool, broadcastable
    to [B, HK, G, Tq, Sk]. Returns tensors of that shape (sbar: [..., Tq, 1]);
    s2 and sbar are None when r is None. Rows that see no key get p = 0.
    """
    has_key = visible.any(dim=-1, keepdim=True)
    s1 = torch.einsum("btkgd,bskd->bkgts", q, k) * scale
    s1 = s1.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s1, dim=-1).masked_fill(~visible, 0.0)
    if r is None:
        return p, None, None
    s2 = torch.einsum("btkgd,bskd->bkgts", r, k).masked_fill(~visible, 0.0)
    sbar = (p * s2).sum(dim=-1, keepdim=True)
    return p, s2, sbar


def row_blocks(T: int, S: int, rows: int, causal: bool, window_size: int | None):
    """(row range, key range) pairs: query rows [t0, t1) see at most keys [lo, hi).

    Causal rows before T - S see no key; they are left out (their output is 0).
    """
    first = max(0, T - S) if causal else 0
    for t0 in range(first, T if S else first, rows):
        t1 = min(T, t0 + rows)
        hi = min(S, t1 + S - T) if causal else S
        lo = max(0, t0 + S - T - window_size + 1) if window_size is not None else 0
        yield range(t0, t1), range(lo, hi)


def plan(B: int, T: int, S: int, HQ: int, causal: bool, window_size: int | None, itemsize: int):
    """Row blocks and whether the forward keeps their scores for the backward."""
    rows = max(MIN_BLOCK_ROWS, SCORE_BLOCK_ELEMENTS // max(1, B * HQ * S))
    blocks = list(row_blocks(T, S, rows, causal, window_size))
    kept = sum(2 * B * HQ * len(t) * len(s) * itemsize for t, s in blocks)
    return blocks, kept <= KEPT_SCORE_BYTES


def _add_keys(total, part, keys: range, S: int):
    """Accumulate a block's dk or dv [N, len(keys), D] into total [N, S, D] (None: not started)."""
    if total is None and len(keys) == S:
        return part
    if total is None:
        total = part.new_zeros(part.shape[0], S, part.shape[2])
    total[:, keys.start:keys.stop] += part
    return total


def _kv_layout(x, B: int, dtype: torch.dtype) -> torch.Tensor:
    """[B * HK, S, D] -> a new [B, S, HK, D] in `dtype`."""
    N, S, D = x.shape
    out = torch.empty(B, S, N // B, D, dtype=dtype, device=x.device)
    return out.copy_(x.view(B, N // B, S, D).transpose(1, 2))


class _BlockwiseParallax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, k, v, scale, causal, window_size):
        B, T, HQ, D = q.shape
        S, HK = k.shape[1], k.shape[2]
        dtype = compute_dtype(q)
        qs = to_heads(q, HK, dtype, scale)  # q only ever enters as scale * q
        rh = None if r is None else to_heads(r, HK, dtype)
        # [B * HK, S, D], non-finite entries zeroed (`poison_rows` marks the rows that see them)
        kh, vh = (to_heads(x, HK, dtype)[:, 0].nan_to_num_(0.0, 0.0, 0.0) for x in (k, v))
        blocks, keep = plan(B, T, S, HQ, causal, window_size, qs.element_size())
        out = torch.empty_like(q)
        out_heads = heads_view(out, HK)
        out_heads[:, :, :, :blocks[0][0].start if blocks else T].zero_()  # rows that see no key
        kept = [None] * len(blocks)  # per block: p and w, or only 1 + sbar
        # Largest blocks first (causal: the last rows see the most keys), so each
        # block's temporaries fit in the memory the previous block freed; in the
        # other order the allocator's heap grows by a block at every step.
        for i in reversed(range(len(blocks))):
            rows, keys = blocks[i]
            sl, kl = slice(rows.start, rows.stop), slice(keys.start, keys.stop)
            mask = mask_bias(rows, keys, S - T, causal, window_size, dtype, q.device)
            state, one_sbar, o = block_forward(qs[:, :, sl], None if rh is None else rh[:, :, sl], kh[:, kl],
                                               vh[:, kl], mask)
            out_heads[:, :, :, sl] = o.unflatten(0, (B, HK))
            kept[i] = state if keep else (one_sbar,)
        ctx.save_for_backward(qs, rh, kh, vh, out, *(x for block in kept for x in block))
        ctx.keep = keep
        ctx.args = (scale, causal, window_size, blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _exact(grad_out):
            return _BlockwiseParallax._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        qs, rh, kh, vh, out, *kept = ctx.saved_tensors
        scale, causal, window_size, blocks = ctx.args
        B, T, HQ, D = grad_out.shape
        S, HK = kh.shape[1], kh.shape[0] // B
        dtype = qs.dtype
        do = to_heads(grad_out, HK, dtype)
        d = None
        if rh is not None:  # D_i = <dO_i, o_i>, [B, T, HQ] -> [B * HK, G, T, 1]
            d = (grad_out.to(dtype) * out.to(dtype)).sum(-1, keepdim=True)
            d = to_heads(d, HK, dtype)
        dq = torch.empty_like(grad_out)
        dr = None if rh is None else torch.empty_like(grad_out)
        row_grads = [heads_view(x, HK) for x in (dq, dr) if x is not None]
        for x in row_grads:
            x[:, :, :, :blocks[0][0].start if blocks else T].zero_()  # rows that see no key
        dk = dv = None
        for i in reversed(range(len(blocks))):  # the last block sees the most keys: it starts dk, dv
            rows, keys = blocks[i]
            sl, kl = slice(rows.start, rows.stop), slice(keys.start, keys.stop)
            qc, rc, kc, vc = qs[:, :, sl], None if rh is None else rh[:, :, sl], kh[:, kl], vh[:, kl]
            if ctx.keep:
                state = BlockState(*kept[2 * i:2 * i + 2])
            else:
                mask = mask_bias(rows, keys, S - T, causal, window_size, dtype, qs.device)
                state = block_recompute(qc, rc, kc, mask, kept[i])
            gq, gr, gk, gv = block_backward(state, do[:, :, sl], None if d is None else d[:, :, sl],
                                            qc, rc, kc, vc, scale)
            for x, g in zip(row_grads, (gq, gr)):
                x[:, :, :, sl] = g.unflatten(0, (B, HK))
            dk, dv = _add_keys(dk, gk, keys, S), _add_keys(dv, gv, keys, S)
        if dk is None:  # no row sees a key
            dk, dv = kh.new_zeros(kh.shape), vh.new_zeros(vh.shape)
        dk, dv = (_kv_layout(x, B, grad_out.dtype) for x in (dk, dv))
        return dq, dr, dk, dv, None, None, None


def _exact(x: torch.Tensor):
    """The torch path computes in float32 (float64 for float64 inputs) and picks
    its own dtypes: an enclosing autocast region must not lower its matmuls."""
    return torch.autocast(x.device.type, enabled=False)


def blockwise_attention(q, r, k, v, *, scale: float, causal: bool, window_size: int | None):
    """Exact Parallax (or, with r=None, softmax) attention; inputs already validated."""
    T, S = q.shape[1], k.shape[1]
    window_size = spanning_window(window_size, S)
    with _exact(q):
        out = _BlockwiseParallax.apply(q, r, k, v, scale, causal, window_size)
    lo, hi = visible_range(T, S, causal=causal, window_size=window_size, device=q.device)
    return poison_rows(out, rows_seeing(nonfinite_positions(k, v), lo, hi))
