"""The torch path: exact Parallax attention in query chunks, for any device.

Each chunk of query rows is scored against only the keys its mask can reach,
so memory stays O(chunk * S) instead of O(T * S), and causal or windowed
inputs skip the keys nobody in the chunk sees. The backward recomputes each
chunk's weights and applies the closed-form gradient of
docs/parallax-math.md, so it is exact and needs no saved [T, S] state.

GQA is handled by viewing the HQ query heads as [HK, G] so keys are never
repeated. `r=None` computes plain softmax attention at softmax cost.
"""
from __future__ import annotations

import torch

from .reference import keys_visible

# Elements of one [B, HK, G, rows, keys] score block; about 16 MB in float32.
# The backward keeps roughly eight such blocks alive at once.
SCORE_BLOCK_ELEMENTS = 1 << 22


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(T: int, S: int, rows: int, causal: bool, window_size: int | None):
    """Yield (t0, t1, lo, hi): query rows [t0, t1) see at most keys [lo, hi)."""
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        hi = min(S, t1 + S - T) if causal else S
        lo = max(0, t0 + S - T - window_size + 1) if window_size is not None else 0
        yield t0, t1, lo, hi


def parallax_weights(q, r, k, visible, scale):
    """Softmax weights p, probe scores s2 and their mean sbar.

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


def _chunk_visible(t0, t1, lo, hi, T, S, causal, window_size, device):
    """Mask [t1 - t0, hi - lo] of query rows [t0, t1) against keys [lo, hi)."""
    query_pos = torch.arange(t0, t1, device=device)[:, None] + (S - T)
    key_pos = torch.arange(lo, hi, device=device)[None, :]
    return keys_visible(query_pos, key_pos, causal=causal, window_size=window_size)


class _BlockwiseParallax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, k, v, scale, causal, window_size):
        B, T, HQ, D = q.shape
        S, HK = k.shape[1], k.shape[2]
        dtype = compute_dtype(q)
        qg, rg = (None if x is None else x.to(dtype).view(B, T, HK, HQ // HK, D) for x in (q, r))
        kf, vf = k.to(dtype), v.to(dtype)
        out = torch.zeros(B, T, HK, HQ // HK, D, dtype=dtype, device=q.device)
        rows = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * HQ * S))
        for t0, t1, lo, hi in _chunks(T, S, rows, causal, window_size):
            if hi <= lo:
                continue  # no key visible: these rows stay 0
            rc = None if rg is None else rg[:, t0:t1]
            visible = _chunk_visible(t0, t1, lo, hi, T, S, causal, window_size, q.device)
            p, s2, sbar = parallax_weights(qg[:, t0:t1], rc, kf[:, lo:hi], visible, scale)
            w = p if s2 is None else p * (1.0 + sbar - s2)
            out[:, t0:t1] = torch.einsum("bkgts,bskd->btkgd", w, vf[:, lo:hi])
        ctx.save_for_backward(q, r, k, v)
        ctx.args = (scale, causal, window_size)
        return out.view(B, T, HQ, D).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, r, k, v = ctx.saved_tensors
        scale, causal, window_size = ctx.args
        B, T, HQ, D = q.shape
        S, HK = k.shape[1], k.shape[2]
        G = HQ // HK
        dtype = compute_dtype(q)
        qg, rg, dog = (None if x is None else x.to(dtype).view(B, T, HK, G, D) for x in (q, r, grad_out))
        kf, vf = k.to(dtype), v.to(dtype)
        dq = torch.zeros_like(qg)
        dr = None if rg is None else torch.zeros_like(rg)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        rows = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * HQ * S))
        for t0, t1, lo, hi in _chunks(T, S, rows, causal, window_size):
            if hi <= lo:
                continue
            qc, do, kc, vc = qg[:, t0:t1], dog[:, t0:t1], kf[:, lo:hi], vf[:, lo:hi]
            rc = None if rg is None else rg[:, t0:t1]
            visible = _chunk_visible(t0, t1, lo, hi, T, S, causal, window_size, q.device)
            p, s2, sbar = parallax_weights(qc, rc, kc, visible, scale)
            g = torch.einsum("btkgd,bskd->bkgts", do, vc)  # g_ij = <dO_i, v_j>
            mu = torch.einsum("bkgts,bskd->btkgd", p, vc)
            E = (do * mu).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)  # <dO_i, mu_i>
            if rc is None:
                w, ds1 = p, p * (g - E)
            else:
                w = p * (1.0 + sbar - s2)
                o = torch.einsum("bkgts,bskd->btkgd", w, vc)
                Dr = (do * o).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)  # <dO_i, o_i>
                ds2 = -p * (g - E)
                ds1 = p * ((g - E) * (1.0 + sbar - s2) + (E - Dr))
                dr[:, t0:t1] = torch.einsum("bkgts,bskd->btkgd", ds2, kc)
                dk[:, lo:hi] += torch.einsum("bkgts,btkgd->bskd", ds2, rc)
            dq[:, t0:t1] = scale * torch.einsum("bkgts,bskd->btkgd", ds1, kc)
            dk[:, lo:hi] += scale * torch.einsum("bkgts,btkgd->bskd", ds1, qc)
            dv[:, lo:hi] += torch.einsum("bkgts,btkgd->bskd", w, do)
        dr = None if dr is None else dr.view(B, T, HQ, D).to(r.dtype)
        return dq.view(B, T, HQ, D).to(q.dtype), dr, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def blockwise_attention(q, r, k, v, *, scale: float, causal: bool, window_size: int | None):
    """Exact Parallax (or, with r=None, softmax) attention; inputs already validated."""
    return _BlockwiseParallax.apply(q, r, k, v, scale, causal, window_size)
