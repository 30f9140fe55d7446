"""Split-KV (flash-decoding) Triton kernel for `parallax_attn_with_kvcache`.

Kernel 1 gives each program one (batch, kv head, row block, key split). Its
query tile packs every query head of the KV group, every new query position,
and for each of them the q row and the r row (interleaved: row 2i is q_i, row
2i+1 is r_i), so one `tl.dot` against a K tile yields s1 and s2 and one
`tl.dot` of [P1; P2] against the V tile yields both value accumulators: each
cache byte is read once per KV head. The partial (m, d1, d2, O1, O2) of every
split goes to a float32 workspace; kernel 2 merges the splits of each query row
by their log-sum-exp and forms o = O1/d1 (1 + d2/d1) - O2/d1.

The number of splits depends only on shapes (never on cache_seqlens values),
so a launch needs no host synchronisation and can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# A split should stream enough keys to amortise writing its partial and
# loading its query tile.
MIN_TILES_PER_SPLIT = 4
# Row pairs (q row + r row) per program, capped so the [2 * pairs, D] float32
# accumulator stays in registers.
MIN_PAIRS = 8  # tl.dot needs at least 16 rows
MAX_ROWS_TIMES_D = 64 * 128
# Splits the merge reads at once (a [block, D] float32 tile per accumulator).
MERGE_SPLIT_BLOCK = 16


@triton.jit
def _kv_tile(CACHE, NEW, cache_offsets, new_offsets, from_cache, is_new, APPEND: tl.constexpr):
    """A [BLOCK_N, D] tile of keys (or values). With APPEND, this call's new
    tokens come from NEW, not the cache, and are written into the cache: the
    append costs no launch, and no program reads a slot another one writes."""
    tile = tl.load(CACHE + cache_offsets, mask=from_cache[:, None], other=0.0)
    if APPEND:
        new = tl.load(NEW + new_offsets, mask=is_new[:, None], other=0.0)
        # Programs whose ranges share a new token store the same bytes.
        tl.store(CACHE + cache_offsets, new, mask=is_new[:, None])
        tile = tl.where(is_new[:, None], new, tile)
    return tile


@triton.jit
def _split_kernel(
    Q, R, K, V, K_NEW, V_NEW, SEQLENS, BLOCK_TABLE, PART_M, PART_D, PART_O,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_rb, stride_rt, stride_rh, stride_rd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_knb, stride_knt, stride_knh, stride_knd,
    stride_vnb, stride_vnt, stride_vnh, stride_vnd,
    stride_table_b,
    qk_scale_log2, window, capacity, num_queries, num_kv_heads, num_row_blocks, num_splits, split_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, APPEND: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    row_block = rest % num_row_blocks
    rest = rest // num_row_blocks
    kv_head = rest % num_kv_heads
    batch = rest // num_kv_heads

    group_rows = GROUP * num_queries
    cached = tl.load(SEQLENS + batch)
    length = cached + num_queries if APPEND else cached  # keys in the sequence after the append
    first_pair = row_block * PAIRS

    # Keys this row block can see: from the window start of its earliest query
    # to its latest query; clip to this split's slice of the cache.
    earliest_pos = length - num_queries + first_pair // GROUP
    latest_pos = length - num_queries + (tl.minimum(first_pair + PAIRS, group_rows) - 1) // GROUP
    lo = tl.maximum(split * split_len, tl.maximum(earliest_pos - window + 1, 0))
    # Lengths are only checked outside CUDA graphs: never touch memory past the cache.
    hi = tl.minimum(tl.minimum((split + 1) * split_len, latest_pos + 1), capacity)

    pair = first_pair + tl.arange(0, PAIRS)
    pair_valid = pair < group_rows
    part_row = ((batch * num_kv_heads + kv_head) * num_splits + split) * group_rows + pair
    m = tl.full([PAIRS], float("-inf"), tl.float32)
    if lo >= hi:
        # Nothing visible here: only the max is written; the merge skips this split.
        tl.store(PART_M + part_row, m, mask=pair_valid)
        return

    # Interleaved row layout of the packed tile: row 2i is q of pair i, 2i+1 its r.
    row = tl.arange(0, 2 * PAIRS)
    row_pair = first_pair + row // 2
    row_valid = row_pair < group_rows
    is_probe = (row % 2) == 1
    query_t = row_pair // GROUP
    query_head = kv_head * GROUP + row_pair % GROUP
    dim = tl.arange(0, HEAD_DIM)
    q_offsets = batch * stride_qb + query_t[:, None] * stride_qt + query_head[:, None] * stride_qh
    r_offsets = batch * stride_rb + query_t[:, None] * stride_rt + query_head[:, None] * stride_rh
    q_rows = tl.load(Q + q_offsets + dim[None, :] * stride_qd, mask=(row_valid & ~is_probe)[:, None], other=0.0)
    r_rows = tl.load(R + r_offsets + dim[None, :] * stride_rd, mask=(row_valid & is_probe)[:, None], other=0.0)
    qr = tl.where(is_probe[:, None], r_rows, q_rows)

    pos = length - num_queries + pair // GROUP  # position of each pair's query
    d = tl.zeros([2 * PAIRS], tl.float32)
    acc = tl.zeros([2 * PAIRS, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        in_range = key < hi
        if PAGED:
            block = tl.load(BLOCK_TABLE + batch * stride_table_b + key // PAGE_SIZE, mask=in_range, other=0)
            k_row = block.to(tl.int64) * stride_kb + (key % PAGE_SIZE) * stride_ks
            v_row = block.to(tl.int64) * stride_vb + (key % PAGE_SIZE) * stride_vs
        else:
            k_row = batch.to(tl.int64) * stride_kb + key.to(tl.int64) * stride_ks
            v_row = batch.to(tl.int64) * stride_vb + key.to(tl.int64) * stride_vs
        is_new = in_range & (key >= cached) if APPEND else key < 0
        from_cache = in_range & ~is_new
        new_t = key - cached  # the new token's index in k, v
        k = _kv_tile(
            K, K_NEW,
            k_row[:, None] + kv_head * stride_kh + dim[None, :] * stride_kd,
            batch * stride_knb + new_t[:, None] * stride_knt + kv_head * stride_knh + dim[None, :] * stride_knd,
            from_cache, is_new, APPEND,
        )
        v = _kv_tile(
            V, V_NEW,
            v_row[:, None] + kv_head * stride_vh + dim[None, :] * stride_vd,
            batch * stride_vnb + new_t[:, None] * stride_vnt + kv_head * stride_vnh + dim[None, :] * stride_vnd,
            from_cache, is_new, APPEND,
        )

        scores = tl.dot(qr, tl.trans(k), input_precision=DOT_PRECISION)
        s1, s2 = tl.split(tl.permute(tl.reshape(scores, (PAIRS, 2, BLOCK_N)), (0, 2, 1)))
        visible = (key[None, :] <= pos[:, None]) & (key[None, :] > pos[:, None] - window)
        visible = visible & in_range[None, :] & pair_valid[:, None]
        s1 = tl.where(visible, s1 * qk_scale_log2, float("-inf"))

        m_new = tl.maximum(m, tl.max(s1, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        alpha = tl.math.exp2(m - m_safe)
        p1 = tl.math.exp2(s1 - m_safe[:, None])
        p = tl.reshape(tl.permute(tl.join(p1, p1 * s2), (0, 2, 1)), (2 * PAIRS, BLOCK_N))
        alpha_rows = tl.reshape(tl.join(alpha, alpha), (2 * PAIRS,))
        d = d * alpha_rows + tl.sum(p, 1)
        acc = acc * alpha_rows[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    tl.store(PART_M + part_row, m, mask=pair_valid)
    part_acc_row = 2 * (((batch * num_kv_heads + kv_head) * num_splits + split) * group_rows + first_pair) + row
    tl.store(PART_D + part_acc_row, d, mask=row_valid)
    tl.store(PART_O + part_acc_row.to(tl.int64)[:, None] * HEAD_DIM + dim[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _merge_kernel(
    PART_M, PART_D, PART_O, O,
    stride_ob, stride_ot, stride_oh, stride_od,
    num_queries, num_kv_heads, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    group_rows = GROUP * num_queries
    pair = pid % group_rows
    rest = pid // group_rows
    kv_head = rest % num_kv_heads
    batch = rest // num_kv_heads
    first_part = (batch * num_kv_heads + kv_head) * num_splits
    split_offsets = tl.arange(0, SPLIT_BLOCK)

    m_max = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
    for first in range(0, num_splits, SPLIT_BLOCK):
        split = first + split_offsets
        m_s = tl.load(PART_M + (first_part + split) * group_rows + pair, mask=split < num_splits, other=float("-inf"))
        m_max = tl.maximum(m_max, m_s)
    m_ref = tl.max(m_max, 0)
    m_ref = tl.where(m_ref == float("-inf"), 0.0, m_ref)

    dim = tl.arange(0, HEAD_DIM)
    d1 = tl.zeros([SPLIT_BLOCK], tl.float32)
    d2 = tl.zeros([SPLIT_BLOCK], tl.float32)
    o1 = tl.zeros([HEAD_DIM], tl.float32)
    o2 = tl.zeros([HEAD_DIM], tl.float32)
    for first in range(0, num_splits, SPLIT_BLOCK):
        split = first + split_offsets
        row = (first_part + split) * group_rows + pair
        m_s = tl.load(PART_M + row, mask=split < num_splits, other=float("-inf"))
        has_keys = m_s > float("-inf")  # splits without visible keys wrote only m
        weight = tl.where(has_keys, tl.math.exp2(m_s - m_ref), 0.0)
        d1 += weight * tl.load(PART_D + 2 * row, mask=has_keys, other=0.0)
        d2 += weight * tl.load(PART_D + 2 * row + 1, mask=has_keys, other=0.0)
        o_rows = PART_O + (2 * row).to(tl.int64)[:, None] * HEAD_DIM + dim[None, :]
        o1 += tl.sum(weight[:, None] * tl.load(o_rows, mask=has_keys[:, None], other=0.0), 0)
        o2 += tl.sum(weight[:, None] * tl.load(o_rows + HEAD_DIM, mask=has_keys[:, None], other=0.0), 0)
    d1_total = tl.sum(d1, 0)
    d2_total = tl.sum(d2, 0)

    no_key = d1_total == 0.0  # every key masked (or an empty cache): the output is 0
    inv_d1 = 1.0 / tl.where(no_key, 1.0, d1_total)
    out = o1 * inv_d1 * (1.0 + d2_total * inv_d1) - o2 * inv_d1
    out = tl.where(no_key, 0.0, out)
    query_t = pair // GROUP
    query_head = kv_head * GROUP + pair % GROUP
    o_ptrs = O + batch * stride_ob + query_t * stride_ot + query_head * stride_oh + dim * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_to_fill(device: torch.device) -> int:
    """About two waves of programs per streaming multiprocessor; the Triton
    interpreter (CPU) runs programs one by one, so one is enough there."""
    if device.type != "cuda":
        return 1
    return 2 * _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


def default_num_splits(batch_kv_programs: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Splits per sequence from shapes only: enough programs to fill the device,
    never so many that a split streams fewer than MIN_TILES_PER_SPLIT tiles."""
    wanted = max(1, _programs_to_fill(device) // batch_kv_programs)
    most = max(1, math.ceil(capacity / (MIN_TILES_PER_SPLIT * block_n)))
    return min(wanted, most)


def _block_n(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def _pairs_per_program(group_rows: int, head_dim: int) -> int:
    cap = max(MIN_PAIRS, MAX_ROWS_TIMES_D // (2 * head_dim))
    return min(max(triton.next_power_of_2(group_rows), MIN_PAIRS), cap)


def triton_decode(q, r, k_cache, v_cache, cache_seqlens, block_table, *, k=None, v=None, scale: float,
                  window_size: int | None, num_splits: int | None = None) -> torch.Tensor:
    """Launch the split and merge kernels; inputs are already validated.

    With k, v the split kernel also writes them into the cache at
    cache_seqlens (in place, as the torch path's append), and the sequence
    holds cache_seqlens + Tq keys. `num_splits` overrides the shape-based
    choice (tests use it to exercise the merge).
    """
    B, Tq, HQ, D = q.shape
    HK = k_cache.shape[2]
    group = HQ // HK
    group_rows = group * Tq
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1  # a constexpr: keep it fixed for contiguous caches
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    block_n = _block_n(D)
    pairs = _pairs_per_program(group_rows, D)
    num_row_blocks = triton.cdiv(group_rows, pairs)
    if num_splits is None:
        num_splits = default_num_splits(B * HK * num_row_blocks, capacity, block_n, q.device)
    # Whole tiles per split, so splits never share a key tile.
    split_len = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
    # Every visible key lies within capacity positions of its query.
    window = capacity + Tq if window_size is None else min(window_size, capacity + Tq)

    parts = B * HK * num_splits * group_rows
    part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
    part_d = torch.empty(2 * parts, dtype=torch.float32, device=q.device)
    part_o = torch.empty(2 * parts, D, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    table = block_table if paged else cache_seqlens  # unused placeholder pointer when contiguous
    append = k is not None
    k_new, v_new = (k, v) if append else (k_cache, v_cache)  # placeholders, never read without APPEND
    precision = "ieee" if q.dtype == torch.float32 else None  # float32 caches must not round to tf32
    big_tile = D > 128 or pairs > 16
    _split_kernel[(B * HK * num_row_blocks * num_splits,)](
        q, r, k_cache, v_cache, k_new, v_new, cache_seqlens, table, part_m, part_d, part_o,
        *q.stride(), *r.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        table.stride(0),
        scale * LOG2E, window, capacity, Tq, HK, num_row_blocks, num_splits, split_len,
        GROUP=group, HEAD_DIM=D, PAIRS=pairs, BLOCK_N=block_n, PAGE_SIZE=page_size, PAGED=paged, APPEND=append,
        DOT_PRECISION=precision, num_warps=8 if big_tile else 4, num_stages=2 if big_tile else 3,
    )
    _merge_kernel[(B * HK * group_rows,)](
        part_m, part_d, part_o, out, *out.stride(), Tq, HK, num_splits,
        GROUP=group, HEAD_DIM=D, SPLIT_BLOCK=min(MERGE_SPLIT_BLOCK, max(2, triton.next_power_of_2(num_splits))),
        num_warps=1 if D <= 64 else 2,
    )
    return out
