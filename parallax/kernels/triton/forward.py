"""Fused Parallax forward: one program per (query tile, batch * head).

The program keeps its q and r tiles resident and streams the K/V tiles its
mask can reach, with the online softmax of docs/parallax-math.md:
P1 = exp(s1 - m) and P2 = P1 * s2 share the running max, so d1, d2, O1, O2 are
all rescaled by one factor. It writes o, mu = O1 / d1 (for the backward's E),
lse (natural log) and sbar = d2 / d1. Scores run in log2 units so exp2 is used.

This module imports triton at load time; import it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .resources import head_block
from .common import (
    AUTOTUNE_KEY, FORWARD_CONFIGS, FORWARD_PRUNE, heads_per_group, key_range, load_tile, query_tile,
    query_tile_offsets, search_steps, store_tile, tile_phases, tiles_per_head, visible,
)
from ..window import kernel_window


@triton.jit
def _stream_keys(m_i, d1, d2, o1, o2, q_tile, r_tile, k_seq, v_seq, kv_stride, first, head_tiles, full_tiles,
                 total, offs_m, T, S, window, qk_scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold `total` key tiles starting at key `first` into the running state;
    tiles outside [head_tiles, head_tiles + full_tiles) are masked. One loop
    (not one per run of tiles): each loop keeps its own copy of the loop
    state in registers, and ptxas spills when there are three."""
    offs_n = tl.arange(0, BLOCK_N)
    for step in range(total):
        n0 = first + step * BLOCK_N
        k_tile = load_tile(k_seq, S, kv_stride, n0, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_tile = load_tile(v_seq, S, kv_stride, n0, HEAD_DIM, BLOCK_N, BLOCK_D)
        s1 = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale_log2
        s2 = tl.dot(r_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
        if (step < head_tiles) | (step >= head_tiles + full_tiles):
            keep = visible(offs_m[:, None], (n0 + offs_n)[None, :], T, S, window, IS_CAUSAL, HAS_WINDOW)
            s1 = tl.where(keep, s1, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s1, 1))
        # A row that has seen no key keeps m = -inf; subtract 0 instead so
        # exp2 gives 0 rather than NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p1 = tl.exp2(s1 - m_ref[:, None])
        p2 = p1 * s2
        d1 = d1 * alpha + tl.sum(p1, 1)
        d2 = d2 * alpha + tl.sum(p2, 1)
        o1 = tl.dot(p1.to(v_tile.dtype), v_tile, o1 * alpha[:, None], input_precision=DOT_PRECISION)
        o2 = tl.dot(p2.to(v_tile.dtype), v_tile, o2 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, d1, d2, o1, o2


@triton.autotune(configs=FORWARD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=FORWARD_PRUNE)
@triton.jit
def _parallax_fwd_kernel(
    q, r, k, v, o, mu, lse, sbar, cu_seqlens,
    scale, T, S, HQ, HK, window, num_seqs, steps, num_heads, group_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch, head, batch_head, seq_start, seq_len, m0, key_start, key_len = query_tile(
        tl.program_id(0), cu_seqlens, T, S, HQ, num_heads, group_heads, num_seqs, steps, BLOCK_M, IS_VARLEN)
    if m0 >= seq_len:
        return

    rows, offs_m, q_base, kv_base = query_tile_offsets(
        batch, head, seq_start, seq_len, m0, key_start, T, HQ, HK, HEAD_DIM, GROUP, BLOCK_M)
    q_stride = HQ * HEAD_DIM
    kv_stride = HK * HEAD_DIM
    q_tile = load_tile(q + q_base, seq_len, q_stride, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
    r_tile = load_tile(r + q_base, seq_len, q_stride, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
    k_seq = k + kv_base
    v_seq = v + kv_base

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    d1 = tl.zeros([BLOCK_M], tl.float32)
    d2 = tl.zeros([BLOCK_M], tl.float32)
    o1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    o2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale_log2 = scale * 1.4426950408889634  # log2(e)
    positions = m0 + offs_m
    lo, hi, full_lo, full_hi = key_range(m0, rows, seq_len, key_len, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M)
    head_tiles, full_tiles, total = tile_phases(lo, hi, full_lo, full_hi, BLOCK_N)
    m_i, d1, d2, o1, o2 = _stream_keys(
        m_i, d1, d2, o1, o2, q_tile, r_tile, k_seq, v_seq, kv_stride, lo, head_tiles, full_tiles, total,
        positions, seq_len, key_len, window, qk_scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, DOT_PRECISION)

    # Rows that saw no key (d1 == 0) output 0.
    seen = d1 > 0
    safe_d1 = tl.where(seen, d1, 1.0)
    inv_d1 = tl.where(seen, 1.0 / safe_d1, 0.0)
    row_sbar = d2 * inv_d1
    row_mu = o1 * inv_d1[:, None]
    out = row_mu * (1.0 + row_sbar)[:, None] - o2 * inv_d1[:, None]
    store_tile(o + q_base, seq_len, q_stride, m0, out.to(o.dtype.element_ty),
               HEAD_DIM, BLOCK_M, BLOCK_D)
    store_tile(mu + q_base, seq_len, q_stride, m0, row_mu.to(mu.dtype.element_ty),
               HEAD_DIM, BLOCK_M, BLOCK_D)
    stat_rows = (batch_head.to(tl.int64) * T + seq_start + m0) + offs_m
    # lse = +inf on empty rows makes every backward weight exp(s - lse) = 0.
    row_lse = tl.where(seen, (m_i + tl.log2(safe_d1)) * 0.6931471805599453, float("inf"))  # ln(2)
    tl.store(lse + stat_rows, row_lse, mask=offs_m < rows)
    tl.store(sbar + stat_rows, row_sbar, mask=offs_m < rows)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact products (Triton would otherwise use TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def key_heads_per_group(k, HQ: int) -> int:
    """`heavy_first` group of query heads for programs streaming K and V
    (the forward, dQ): whole GQA groups, as many as L2 holds the K/V of."""
    _, S, HK, D = k.shape
    return heads_per_group(2 * S * D * k.element_size(), HQ // HK)


def varlen_args(cu_seqlens: torch.Tensor | None, device: torch.device):
    """(cu_seqlens or a placeholder, number of sequences, search steps)."""
    if cu_seqlens is None:
        return torch.zeros(2, dtype=torch.int32, device=device), 1, 0
    num_seqs = cu_seqlens.numel() - 1
    return cu_seqlens, num_seqs, search_steps(num_seqs)


def parallax_fwd(q, r, k, v, scale: float, causal: bool, window_size: int | None, cu_seqlens):
    """Contiguous q, r [B, T, HQ, D], k, v [B, S, HK, D] -> (o, lse, sbar, mu).

    lse and sbar are float32 [B, HQ, T]; mu = softmax attention output, q's dtype.
    """
    B, T, HQ, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    mu = torch.empty_like(q)
    lse = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)
    sbar = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse, sbar, mu
    cu, num_seqs, steps = varlen_args(cu_seqlens, q.device)
    is_varlen = cu_seqlens is not None

    def grid(meta):
        return (tiles_per_head(T, num_seqs, meta["BLOCK_M"], is_varlen) * B * HQ,)

    _parallax_fwd_kernel[grid](
        q, r, k, v, o, mu, lse, sbar, cu,
        scale, T, S, HQ, HK, kernel_window(window_size, S), num_seqs, steps, B * HQ, key_heads_per_group(k, HQ),
        HEAD_DIM=D, BLOCK_D=head_block(D), GROUP=HQ // HK,
        IS_CAUSAL=causal, HAS_WINDOW=window_size is not None, IS_VARLEN=is_varlen,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse, sbar, mu

