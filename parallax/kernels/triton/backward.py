"""Parallax backward: closed-form gradients of docs/parallax-math.md.

First, per row, D = <dO, o> and E = <dO, mu> (mu = softmax output saved by the
forward). Then one program per (key tile, batch * kv_head) keeps its K/V tile
resident, loops over the G query heads of its group and the query tiles that
see it, and accumulates dK, dV in registers (no G-times-larger buffer for GQA).

- Default (`deterministic=True`, three launches): dQ/dR come from a third
  launch, one program per (query tile, batch * head) streaming the key tiles
  it sees, which recomputes the scores: 11 tile products per (query, key)
  tile pair, no atomics, bitwise reproducible.
- Fused (`deterministic=False`, one main launch): the dK/dV program also adds
  its share of dQ and dR into a float32 buffer with atomics: 8 products, but
  the float32 sums' order (so their last bits) varies from run to run.

The dK/dV program works on transposed [keys, queries] score tiles: every
product has the key tile's rows (the fused dQ/dR product, transposed too, the
head dim's), so on Hopper one warpgroup layout serves all of them when the
key tile has 16 rows per warp (`resources.duplicates_work`), and K and V,
loaded once with their masks, feed the tensor cores from shared memory.

Weights are recomputed from the saved lse: p = exp(scale * q.k - lse).

This module imports triton at load time; import it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import resources
from .common import (
    AUTOTUNE_KEY, BACKWARD_KV_CONFIGS, BACKWARD_KV_PRUNE, BACKWARD_Q_CONFIGS, BACKWARD_Q_PRUNE, column_tile_pointers,
    device_limits, heads_per_group, heavy_first, key_range, load_columns, load_tile, locate_tile,
    query_range, query_tile, query_tile_offsets, store_columns, store_tile, tile_phases, tiles_per_head, visible,
)
from .forward import dot_precision, key_heads_per_group, varlen_args
from ..window import kernel_window

# Elements per program of the D / E reduction: three [rows, BLOCK_D] float32
# tiles must stay in registers (64 rows at D=256 spilled: AOT table).
ROW_BLOCK_ELEMENTS = 4096


@triton.jit
def _row_dots_kernel(do, o, mu, delta, dmu, rows, T, HQ,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """delta = <dO, o> and dmu = <dO, mu> per (token, head), stored as [B, HQ, T]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs[:, None] < rows) & (offs_d[None, :] < HEAD_DIM)
    ptrs = offs[:, None] * HEAD_DIM + offs_d[None, :]
    grad = tl.load(do + ptrs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(o + ptrs, mask=mask, other=0.0).to(tl.float32)
    soft = tl.load(mu + ptrs, mask=mask, other=0.0).to(tl.float32)
    # offs enumerates (batch, token, head); the stats live at (batch, head, token).
    head = offs % HQ
    token = (offs // HQ) % T
    batch = offs // (HQ * T)
    stat = (batch * HQ + head) * T + token
    tl.store(delta + stat, tl.sum(grad * out, 1), mask=offs < rows)
    tl.store(dmu + stat, tl.sum(grad * soft, 1), mask=offs < rows)


@triton.jit
def _stream_queries(dk, dv, k_tile, v_tile, k_cols, q_seq, r_seq, do_seq, dqr_seq,
                    lse_seq, sbar_seq, delta_seq, dmu_seq,
                    q_stride, first, head_tiles, full_tiles, total, key_pos, T, S, window, scale, qk_scale_log2,
                    col0, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    FUSED: tl.constexpr, DOT_PRECISION: tl.constexpr, D_SPLIT: tl.constexpr):
    """Add the contributions of `total` query tiles from row `first` to dK, dV
    (and, FUSED, atomically to the float32 dQ, dR buffer); tiles outside
    [head_tiles, head_tiles + full_tiles) are masked (one loop, as in the
    forward's `_stream_keys`).

    With D_SPLIT > 1 the scores use all columns and dK, dV, dQ, dR only the
    BLOCK_D / D_SPLIT from `col0` (k_cols: those columns of K).
    """
    offs_m = tl.arange(0, BLOCK_M)
    for step in range(total):
        m0 = first + step * BLOCK_M
        rows = m0 + offs_m
        row_ok = rows < T
        q_tile = load_tile(q_seq, T, q_stride, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
        r_tile = load_tile(r_seq, T, q_stride, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
        do_tile = load_tile(do_seq, T, q_stride, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
        if D_SPLIT == 1:
            q_cols, r_cols, do_cols = q_tile, r_tile, do_tile
        else:
            q_cols = load_columns(q_seq, T, q_stride, m0, col0, HEAD_DIM, BLOCK_M, BLOCK_D // D_SPLIT)
            r_cols = load_columns(r_seq, T, q_stride, m0, col0, HEAD_DIM, BLOCK_M, BLOCK_D // D_SPLIT)
            do_cols = load_columns(do_seq, T, q_stride, m0, col0, HEAD_DIM, BLOCK_M, BLOCK_D // D_SPLIT)
        lse_log2 = tl.load(lse_seq + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # log2(e)
        row_sbar = tl.load(sbar_seq + rows, mask=row_ok, other=0.0)
        row_delta = tl.load(delta_seq + rows, mask=row_ok, other=0.0)
        row_dmu = tl.load(dmu_seq + rows, mask=row_ok, other=0.0)

        # Each score tile is consumed as soon as it is made, to keep few alive.
        s1 = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION)
        p = tl.exp2(s1 * qk_scale_log2 - lse_log2[None, :])
        if (step < head_tiles) | (step >= head_tiles + full_tiles):
            p = tl.where(visible(rows[None, :], key_pos[:, None], T, S, window, IS_CAUSAL, HAS_WINDOW), p, 0.0)
        s2 = tl.dot(k_tile, tl.trans(r_tile), input_precision=DOT_PRECISION)
        lever = 1.0 + row_sbar[None, :] - s2  # w = p * lever
        dv = tl.dot((p * lever).to(do_tile.dtype), do_cols, dv, input_precision=DOT_PRECISION)
        g = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
        centred = g - row_dmu[None, :]
        ds2 = (-p * centred).to(r_tile.dtype)
        ds1 = (p * (centred * lever + (row_dmu - row_delta)[None, :]) * scale).to(q_tile.dtype)
        dk = tl.dot(ds1, q_cols, dk, input_precision=DOT_PRECISION)
        dk = tl.dot(ds2, r_cols, dk, input_precision=DOT_PRECISION)
        if FUSED:
            # dQ and dR in one product, transposed ([columns, queries]) so
            # that its rows are the head dim: columns 2i and 2i + 1 are query
            # i's dQ and dR, side by side as in the buffer they are added to
            # (one product and one layout change instead of two each).
            ds = tl.reshape(tl.join(ds1, ds2), [BLOCK_N, 2 * BLOCK_M])
            ptrs, in_bounds = _pair_columns_pointers(dqr_seq, T, 2 * q_stride, m0, col0, HEAD_DIM, BLOCK_M,
                                                     BLOCK_D // D_SPLIT)
            # Relaxed: nothing reads the sums until the launch ends.
            tl.atomic_add(ptrs, tl.dot(tl.trans(k_cols), ds, input_precision=DOT_PRECISION), mask=in_bounds,
                          sem="relaxed")
    return dk, dv


@triton.jit
def _pair_columns_pointers(base, rows, stride, first, col0, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """(pointers, mask) of a [BLOCK_C, 2 * BLOCK_ROWS] tile of a [rows, 2,
    HEAD_DIM] matrix at `base` (pairs of rows `stride` elements apart),
    transposed: element (c, 2i + j) is column col0 + c of row first + i,
    pair member j."""
    offs = tl.arange(0, 2 * BLOCK_ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    start = base + first.to(tl.int64) * stride + col0
    ptrs = start + ((offs // 2) * stride + (offs % 2) * HEAD_DIM)[None, :] + offs_c[:, None]
    mask = (first + offs // 2 < rows)[None, :] & (col0 + offs_c < HEAD_DIM)[:, None]
    return ptrs, mask


@triton.jit
def _load_keys(base, seq_len, stride, n0, col0, lowest, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """`load_columns` of a key tile, with a window zero for keys below `lowest`
    too: keys older than every query's window (dQ would otherwise pick up
    0 * whatever they hold). Masked in the load, not after, so that the
    products read the tile straight from shared memory."""
    ptrs, mask = column_tile_pointers(base, seq_len, stride, n0, col0, HEAD_DIM, BLOCK_N, BLOCK_C)
    if HAS_WINDOW:
        mask &= (n0 + tl.arange(0, BLOCK_N) >= lowest)[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


# Autotuning benchmarks launch the fused kernel repeatedly: zero its
# accumulators before each run.
@triton.autotune(configs=BACKWARD_KV_CONFIGS, key=AUTOTUNE_KEY + ["FUSED"], prune_configs_by=BACKWARD_KV_PRUNE,
                 reset_to_zero=["dqr_acc"])
@triton.jit
def _parallax_bwd_dkdv_kernel(
    q, r, k, v, do, lse, sbar, delta, dmu, dk, dv, dqr_acc, cu_seqlens,
    scale, T, S, HQ, HK, window, num_seqs, steps, num_heads, group_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    FUSED: tl.constexpr, DOT_PRECISION: tl.constexpr, D_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_tiles = tl.cdiv(S, BLOCK_N)
    if IS_VARLEN:
        num_tiles += num_seqs
    pid = tl.program_id(0)
    col0 = (pid % D_SPLIT) * (BLOCK_D // D_SPLIT)  # this program's dK, dV columns
    # Causal: early key tiles see the most queries.
    tile, batch_kv_head = heavy_first(pid // D_SPLIT, num_tiles, num_heads, group_heads)
    batch = batch_kv_head // HK
    kv_head = batch_kv_head % HK
    seq_start, seq_len, n0 = locate_tile(tile, cu_seqlens, num_seqs, steps, S, BLOCK_N, IS_VARLEN)
    if n0 >= seq_len:
        return
    if IS_VARLEN:
        query_len = seq_len
    else:
        query_len = T

    q_stride = HQ * HEAD_DIM
    kv_stride = HK * HEAD_DIM
    cols = tl.minimum(BLOCK_N, seq_len - n0)
    offs_n = tl.arange(0, BLOCK_N)
    kv_base = (batch.to(tl.int64) * S + seq_start) * kv_stride + kv_head * HEAD_DIM
    lowest = seq_len - query_len - window + 1
    k_tile = _load_keys(k + kv_base, seq_len, kv_stride, n0, 0, lowest, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_WINDOW)
    v_tile = _load_keys(v + kv_base, seq_len, kv_stride, n0, 0, lowest, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_WINDOW)
    if D_SPLIT == 1:
        k_cols = k_tile
    else:
        k_cols = _load_keys(k + kv_base, seq_len, kv_stride, n0, col0, lowest, HEAD_DIM, BLOCK_N, BLOCK_D // D_SPLIT,
                            HAS_WINDOW)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], tl.float32)
    qk_scale_log2 = scale * 1.4426950408889634  # log2(e)
    key_pos = n0 + offs_n
    lo, hi, full_lo, full_hi = query_range(n0, cols, query_len, seq_len, window, IS_CAUSAL, HAS_WINDOW, BLOCK_N)
    head_tiles, full_tiles, total = tile_phases(lo, hi, full_lo, full_hi, BLOCK_M)
    for member in range(GROUP):
        head = kv_head * GROUP + member
        q_offset = (batch.to(tl.int64) * T + seq_start) * q_stride + head * HEAD_DIM
        stat_offset = (batch.to(tl.int64) * HQ + head) * T + seq_start
        dk_acc, dv_acc = _stream_queries(
            dk_acc, dv_acc, k_tile, v_tile, k_cols, q + q_offset, r + q_offset, do + q_offset, dqr_acc + 2 * q_offset,
            lse + stat_offset, sbar + stat_offset, delta + stat_offset, dmu + stat_offset,
            q_stride, lo, head_tiles, full_tiles, total, key_pos, query_len, seq_len, window, scale, qk_scale_log2,
            col0, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW, FUSED, DOT_PRECISION, D_SPLIT)
    store_columns(dk + kv_base, seq_len, kv_stride, n0, col0, dk_acc.to(dk.dtype.element_ty),
                  HEAD_DIM, BLOCK_N, BLOCK_D // D_SPLIT)
    store_columns(dv + kv_base, seq_len, kv_stride, n0, col0, dv_acc.to(dv.dtype.element_ty),
                  HEAD_DIM, BLOCK_N, BLOCK_D // D_SPLIT)


@triton.jit
def _stream_keys_grad(dq, dr, q_tile, r_tile, do_tile, lse_log2, row_sbar, row_delta, row_dmu,
                      k_seq, v_seq, kv_stride, first, head_tiles, full_tiles, total, query_pos, T, S, window,
                      qk_scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of `total` key tiles from key `first` to dQ / scale
    and dR; tiles outside [head_tiles, head_tiles + full_tiles) are masked."""
    offs_n = tl.arange(0, BLOCK_N)
    for step in range(total):
        n0 = first + step * BLOCK_N
        k_tile = load_tile(k_seq, S, kv_stride, n0, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_tile = load_tile(v_seq, S, kv_stride, n0, HEAD_DIM, BLOCK_N, BLOCK_D)
        s1 = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
        p = tl.exp2(s1 * qk_scale_log2 - lse_log2[:, None])
        if (step < head_tiles) | (step >= head_tiles + full_tiles):
            p = tl.where(visible(query_pos[:, None], (n0 + offs_n)[None, :], T, S, window, IS_CAUSAL, HAS_WINDOW),
                         p, 0.0)
        s2 = tl.dot(r_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
        g = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        centred = g - row_dmu[:, None]
        ds2 = -p * centred
        ds1 = p * (centred * (1.0 + row_sbar[:, None] - s2) + (row_dmu - row_delta)[:, None])
        dq = tl.dot(ds1.to(k_tile.dtype), k_tile, dq, input_precision=DOT_PRECISION)
        dr = tl.dot(ds2.to(k_tile.dtype), k_tile, dr, input_precision=DOT_PRECISION)
    return dq, dr


@triton.autotune(configs=BACKWARD_Q_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=BACKWARD_Q_PRUNE)
@triton.jit
def _parallax_bwd_dq_kernel(
    q, r, k, v, do, lse, sbar, delta, dmu, dq, dr, cu_seqlens,
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
    do_tile = load_tile(do + q_base, seq_len, q_stride, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
    stat_rows = (batch_head.to(tl.int64) * T + seq_start + m0) + offs_m
    row_ok = offs_m < rows
    lse_log2 = tl.load(lse + stat_rows, mask=row_ok, other=0.0) * 1.4426950408889634  # log2(e)
    row_sbar = tl.load(sbar + stat_rows, mask=row_ok, other=0.0)
    row_delta = tl.load(delta + stat_rows, mask=row_ok, other=0.0)
    row_dmu = tl.load(dmu + stat_rows, mask=row_ok, other=0.0)
    k_seq = k + kv_base
    v_seq = v + kv_base

    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dr_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale_log2 = scale * 1.4426950408889634
    query_pos = m0 + offs_m
    lo, hi, full_lo, full_hi = key_range(m0, rows, seq_len, key_len, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M)
    head_tiles, full_tiles, total = tile_phases(lo, hi, full_lo, full_hi, BLOCK_N)
    dq_acc, dr_acc = _stream_keys_grad(
        dq_acc, dr_acc, q_tile, r_tile, do_tile, lse_log2, row_sbar, row_delta, row_dmu,
        k_seq, v_seq, kv_stride, lo, head_tiles, full_tiles, total, query_pos, seq_len, key_len, window,
        qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, DOT_PRECISION)
    store_tile(dq + q_base, seq_len, q_stride, m0, (dq_acc * scale).to(dq.dtype.element_ty),
               HEAD_DIM, BLOCK_M, BLOCK_D)
    store_tile(dr + q_base, seq_len, q_stride, m0, dr_acc.to(dr.dtype.element_ty),
               HEAD_DIM, BLOCK_M, BLOCK_D)


def parallax_bwd(grad_out, q, r, k, v, o, lse, sbar, mu, scale: float, causal: bool, window_size: int | None, cu_seqlens,
                 deterministic: bool = True):
    """Contiguous tensors from `parallax_fwd` plus dO -> (dq, dr, dk, dv).

    Besides the four gradients it allocates two float32 [B, HQ, T] row
    statistics, whatever the GQA group size, and, fused
    (`deterministic=False`), a float32 [B, T, HQ, 2, D] dQ/dR accumulator.
    """
    B, T, HQ, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)
    dmu = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)
    fused = not deterministic
    if fused:
        dqr_acc = torch.zeros(B, T, HQ, 2, D, dtype=torch.float32, device=q.device)
    else:
        dq, dr = torch.empty_like(q), torch.empty_like(r)
        # A placeholder the deterministic kernel never reads; the autotuner
        # zeroes it (reset_to_zero), so it must not alias real data.
        dqr_acc = torch.zeros(1, dtype=torch.float32, device=q.device)
    if D == 0 or B * HQ == 0:
        return _gradients(q, dqr_acc) + (dk, dv) if fused else (dq, dr, dk, dv)
    block_d = resources.head_block(D)
    rows = B * T * HQ
    if rows:
        row_block = max(16, ROW_BLOCK_ELEMENTS // block_d)
        _row_dots_kernel[(triton.cdiv(rows, row_block),)](
            grad_out, o, mu, delta, dmu, rows, T, HQ, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_ROWS=row_block)
    cu, num_seqs, steps = varlen_args(cu_seqlens, q.device)
    is_varlen = cu_seqlens is not None
    common = dict(
        HEAD_DIM=D, BLOCK_D=block_d, GROUP=HQ // HK, IS_CAUSAL=causal, HAS_WINDOW=window_size is not None,
        IS_VARLEN=is_varlen, DOT_PRECISION=dot_precision(q.dtype),
    )
    scalars = (scale, T, S, HQ, HK, kernel_window(window_size, S), num_seqs, steps)
    if S:
        d_split = dkdv_column_split(block_d)
        # A key tile's programs stream the q, r and dO of its GQA group.
        group_heads = heads_per_group(3 * (HQ // HK) * T * D * q.element_size())

        def key_grid(meta):
            return (tiles_per_head(S, num_seqs, meta["BLOCK_N"], is_varlen) * B * HK * d_split,)

        _parallax_bwd_dkdv_kernel[key_grid](
            q, r, k, v, grad_out, lse, sbar, delta, dmu, dk, dv, dqr_acc, cu, *scalars, B * HK, group_heads,
            FUSED=fused, D_SPLIT=d_split, **common)
    if fused:
        return _gradients(q, dqr_acc) + (dk, dv)
    if T:
        def query_grid(meta):
            return (tiles_per_head(T, num_seqs, meta["BLOCK_M"], is_varlen) * B * HQ,)

        _parallax_bwd_dq_kernel[query_grid](
            q, r, k, v, grad_out, lse, sbar, delta, dmu, dq, dr, cu, *scalars, B * HQ, key_heads_per_group(k, HQ),
            **common)
    return dq, dr, dk, dv


def dkdv_column_split(block_d: int) -> int:
    """dK/dV programs per key tile on the current device (resources.column_split)."""
    if block_d < resources.COLUMN_SPLIT_HEAD_DIM:
        return 1  # asks no device: the interpreter has none
    return resources.column_split("backward_kv", device_limits()[0], block_d)


def _gradients(q, dqr_acc):
    """The fused kernel's float32 dQ, dR sums as contiguous tensors of q's
    dtype (copies even for float32: outputs of a custom op may not alias);
    dq is already scaled."""
    return tuple(dqr_acc[..., i, :].to(q.dtype, copy=True) for i in range(2))
