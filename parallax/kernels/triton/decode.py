"""Split-KV (flash-decoding) Triton kernel for `parallax_attn_with_kvcache`.

Kernel 1 gives each program one (batch, kv head, row block, key split). Its
query tile packs every query head of the KV group, every new query position,
and for each of them the q row and the r row (interleaved: row 2i is q_i, row
2i+1 is r_i), so one `tl.dot` against a K tile yields s1 and s2 and one
`tl.dot` of [P1; P2] against the V tile yields both value accumulators: each
cache byte is read once per KV head.

The streaming loop reads the cache only, over this split's share of the keys
the row block can see; the share is computed on the device from
`cache_seqlens`, so a cache filled far below its capacity still spreads its
keys over every split. The new tokens of an append are one epilogue tile of
the last split, read from k, v and written into the cache by one program per
(batch, kv head): the loop reads positions below `cache_seqlens`, the
epilogue writes at and above it, so no program reads a slot another writes.

With one split the kernel writes o = O1/d1 (1 + d2/d1) - O2/d1 itself;
otherwise every split writes its partial (m, d1, d2, O1, O2) to a float32
workspace and kernel 2 merges the splits of each query row by their
log-sum-exp. The number of splits depends only on shapes, so a launch needs no
host synchronisation and can be captured in a CUDA graph.

The kernel never reads or writes outside the cache, whatever the values of
`cache_seqlens`, `cache_leftpad` and `block_table` (the host reads them only
where that does not wait for a GPU; see `decode.py`): a sequence whose length
or left offset is out of range, or one of whose block table entries in use is
out of range, gets NaN rows and no append (the last split vets the entries; a
loop masks any bad one it meets).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..window import kernel_window

LOG2E = 1.4426950408889634
# A split should stream enough keys to amortise writing its partial and
# loading its query tile (used to cap the shape-based split count).
MIN_TILES_PER_SPLIT = 4
# The split-count model (`choose_num_splits`), in tiles one program streams
# while the device is full. First estimates from the H200 decode table (a
# program's fixed cost and the merge launch are a few microseconds each):
# recalibrate with bench_decode's split sweep.
PROGRAM_COST_TILES = 1.0  # loading the query tile, writing the partial
MERGE_LAUNCH_TILES = 1.0  # the merge kernel starts after the split kernel drains
MERGE_BLOCK_TILES = 0.5  # each MERGE_SPLIT_BLOCK partials a merge program reads in turn
MIN_WAVES = 2
UNSPLIT_PROGRAMS_PER_SM = 0.8  # work of this many programs per SM and more is not split
# Occupancy of a split program (`programs_per_multiprocessor`).
SPLIT_CONVERSION_BYTES = 2048
RESERVED_SHARED_PER_BLOCK = 1024  # CUDA's per-block reservation (sm_80 and later)
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
MAX_REGISTERS_PER_THREAD = 255
SPLIT_REGISTERS = {(2, 64): 83, (2, 128): 162, (2, 256): 208, (4, 64): 192}  # (element bytes, head dim)
# Row pairs (q row + r row) per program, capped so the [2 * pairs, D] float32
# accumulator stays in registers (sm_90 compiles: no spills at these caps).
MIN_PAIRS = 8  # tl.dot needs at least 16 rows
MAX_PAIRS = 64
MAX_ROWS_TIMES_D = 64 * 128
# New tokens per epilogue tile (tl.dot needs at least 16); more loop.
NEW_TILE = tl.constexpr(16)
# Block table entries vetted at once.
TABLE_TILE = tl.constexpr(64)
# Splits the merge reads at once (a [block, D] float32 tile per accumulator).
MERGE_SPLIT_BLOCK = 16


@triton.jit
def _attend(qr, k, v, visible, m, d, acc, qk_scale_log2,
            PAIRS: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, ROWS_DIFFER: tl.constexpr):
    """One key tile of the online-softmax recurrence, in base 2, for the
    interleaved [q; r] rows: returns the updated (m, d, acc).

    ROWS_DIFFER: the rows are several new tokens, so a key of the tile may be
    visible to some rows only. Then a non-finite key or value must not reach
    the others through a zero weight (0 * NaN): it is zeroed, and the rows that
    do see one are made NaN. With one new token every row sees the same keys
    (the loads zero the rest), and the kernel stays without these checks."""
    scores = tl.dot(qr, tl.trans(k), input_precision=DOT_PRECISION)
    s1, s2 = tl.split(tl.permute(tl.reshape(scores, (PAIRS, 2, BLOCK)), (0, 2, 1)))
    s1 = tl.where(visible, s1 * qk_scale_log2, float("-inf"))
    if ROWS_DIFFER:
        s2 = tl.where(visible, s2, 0.0)
        v_finite = (v == v) & (tl.abs(v) != float("inf"))
        v = tl.where(v_finite, v, 0.0)
        bad_key = tl.max(tl.where(v_finite, 0, 1), 1)
        sees_bad = tl.max(tl.where(visible & (bad_key[None, :] > 0), 1, 0), 1)
    m_new = tl.maximum(m, tl.max(s1, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    alpha = tl.math.exp2(m - m_safe)
    p1 = tl.math.exp2(s1 - m_safe[:, None])
    p = tl.reshape(tl.permute(tl.join(p1, p1 * s2), (0, 2, 1)), (2 * PAIRS, BLOCK))
    alpha_rows = tl.reshape(tl.join(alpha, alpha), (2 * PAIRS,))
    d = d * alpha_rows + tl.sum(p, 1)
    acc = acc * alpha_rows[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    if ROWS_DIFFER:
        acc = tl.where(tl.reshape(tl.join(sees_bad, sees_bad), (2 * PAIRS,))[:, None] > 0, float("nan"), acc)
    return m_new, d, acc


@triton.jit
def _split_kernel(
    Q, R, K, V, K_NEW, V_NEW, SEQLENS, LEFTPAD, BLOCK_TABLE, PART_M, PART_D, PART_O, O,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_rb, stride_rt, stride_rh, stride_rd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_knb, stride_knt, stride_knh, stride_knd,
    stride_vnb, stride_vnt, stride_vnh, stride_vnd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_table_b,
    qk_scale_log2, window, capacity, num_blocks, num_queries, num_kv_heads, num_row_blocks, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, APPEND: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, ROWS_DIFFER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    row_block = rest % num_row_blocks
    rest = rest // num_row_blocks
    kv_head = rest % num_kv_heads
    batch = rest // num_kv_heads

    group_rows = GROUP * num_queries
    new_tokens = num_queries if APPEND else 0
    seqlen = tl.load(SEQLENS + batch)
    seq_ok = (seqlen >= 0) & (seqlen <= capacity - new_tokens)
    if HAS_LEFTPAD:
        # Slots below the sequence's left offset are padding: never read, never seen.
        leftpad = tl.load(LEFTPAD + batch)
        seq_ok = seq_ok & (leftpad >= 0) & (leftpad <= seqlen + new_tokens)
        leftpad = tl.where(seq_ok, leftpad, 0)
    else:
        leftpad = 0
    cached = tl.where(seq_ok, seqlen, 0)  # an invalid length reads nothing
    length = cached + new_tokens  # keys in the sequence after the append
    first_pair = row_block * PAIRS
    # The last split also attends to the new tokens (one of its programs
    # writes them) and vets the sequence's block table entries.
    is_last = split == num_splits - 1

    # Cached keys this row block can see: from the window start of its earliest
    # query to its latest query, below `cached`.
    earliest_pos = length - num_queries + first_pair // GROUP
    latest_pos = length - num_queries + (tl.minimum(first_pair + PAIRS, group_rows) - 1) // GROUP
    key_lo = tl.maximum(earliest_pos - window + 1, leftpad)
    key_hi = tl.minimum(latest_pos + 1, cached)
    # This split's share, in whole tiles aligned to BLOCK_N, of the tiles of [key_lo, key_hi).
    first_tile = key_lo // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(key_hi, BLOCK_N) - first_tile, 0)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    lo = (first_tile + split * tiles_per_split) * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, key_hi)

    pair = first_pair + tl.arange(0, PAIRS)
    pair_valid = pair < group_rows
    part_row = ((batch * num_kv_heads + kv_head) * num_splits + split) * group_rows + pair
    m = tl.full([PAIRS], float("-inf"), tl.float32)
    if not SINGLE_SPLIT:
        if (lo >= hi) & ~is_last:
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
    bad_blocks = tl.zeros([], tl.int32)  # block table entries out of range met by this program
    for start in range(lo, hi, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        in_range = (key < hi) & (key >= key_lo)  # keys before every row's window load as zeros
        if PAGED:
            block = tl.load(BLOCK_TABLE + batch * stride_table_b + key // PAGE_SIZE, mask=in_range, other=0)
            block_ok = (block >= 0) & (block < num_blocks)
            bad_blocks += tl.sum((in_range & ~block_ok).to(tl.int32), 0)
            in_range = in_range & block_ok
            k_row = block.to(tl.int64) * stride_kb + (key % PAGE_SIZE) * stride_ks
            v_row = block.to(tl.int64) * stride_vb + (key % PAGE_SIZE) * stride_vs
        else:
            k_row = batch.to(tl.int64) * stride_kb + key.to(tl.int64) * stride_ks
            v_row = batch.to(tl.int64) * stride_vb + key.to(tl.int64) * stride_vs
        k = tl.load(K + k_row[:, None] + kv_head * stride_kh + dim[None, :] * stride_kd,
                    mask=in_range[:, None], other=0.0)
        v = tl.load(V + v_row[:, None] + kv_head * stride_vh + dim[None, :] * stride_vd,
                    mask=in_range[:, None], other=0.0)
        visible = (key[None, :] <= pos[:, None]) & (key[None, :] > pos[:, None] - window)
        visible = visible & in_range[None, :] & pair_valid[:, None]
        m, d, acc = _attend(qr, k, v, visible, m, d, acc, qk_scale_log2, PAIRS, BLOCK_N, DOT_PRECISION, ROWS_DIFFER)

    if PAGED:
        if is_last:
            # Every entry the sequence uses must be in range, else no append
            # and NaN rows (the merge spreads them from this split to all).
            used = tl.cdiv(length, PAGE_SIZE)
            for first in range(0, used, TABLE_TILE):
                index = first + tl.arange(0, TABLE_TILE)
                in_use = index < used
                entry = tl.load(BLOCK_TABLE + batch * stride_table_b + index, mask=in_use, other=0)
                bad_blocks += tl.sum((in_use & ((entry < 0) | (entry >= num_blocks))).to(tl.int32), 0)

    if APPEND:
        if is_last:
            # The new tokens, NEW_TILE at a time (one tile for decode): read
            # from k, v; written into the cache by row block 0 only.
            writable = tl.where(seq_ok & (bad_blocks == 0), num_queries, 0)
            for first_new in range(0, num_queries, NEW_TILE):
                t = first_new + tl.arange(0, NEW_TILE)
                t_valid = t < num_queries
                key = cached + t
                k = tl.load(K_NEW + batch * stride_knb + t[:, None] * stride_knt + kv_head * stride_knh
                            + dim[None, :] * stride_knd, mask=t_valid[:, None], other=0.0)
                v = tl.load(V_NEW + batch * stride_vnb + t[:, None] * stride_vnt + kv_head * stride_vnh
                            + dim[None, :] * stride_vnd, mask=t_valid[:, None], other=0.0)
                visible = (key[None, :] <= pos[:, None]) & (key[None, :] > pos[:, None] - window)
                visible = visible & t_valid[None, :] & pair_valid[:, None] & (key[None, :] >= leftpad)
                k_seen, v_seen = k, v
                if HAS_LEFTPAD:
                    # A padding token is stored but attends as a zero key (0 * NaN must not reach the output).
                    is_token = (key >= leftpad)[:, None]
                    k_seen, v_seen = tl.where(is_token, k, 0.0), tl.where(is_token, v, 0.0)
                m, d, acc = _attend(qr, k_seen, v_seen, visible, m, d, acc, qk_scale_log2, PAIRS, NEW_TILE,
                                    DOT_PRECISION, ROWS_DIFFER)
                if row_block == 0:
                    write = t < writable  # (not `t_valid & ok`: the interpreter rejects a mask made so)
                    if PAGED:
                        block = tl.load(BLOCK_TABLE + batch * stride_table_b + key // PAGE_SIZE, mask=write, other=0)
                        k_row = block.to(tl.int64) * stride_kb + (key % PAGE_SIZE) * stride_ks
                        v_row = block.to(tl.int64) * stride_vb + (key % PAGE_SIZE) * stride_vs
                    else:
                        k_row = batch.to(tl.int64) * stride_kb + key.to(tl.int64) * stride_ks
                        v_row = batch.to(tl.int64) * stride_vb + key.to(tl.int64) * stride_vs
                    tl.store(K + k_row[:, None] + kv_head * stride_kh + dim[None, :] * stride_kd, k,
                             mask=write[:, None])
                    tl.store(V + v_row[:, None] + kv_head * stride_vh + dim[None, :] * stride_vd, v,
                             mask=write[:, None])

    poisoned = (~seq_ok) | (bad_blocks > 0)
    if SINGLE_SPLIT:
        d1, d2 = tl.split(tl.reshape(d, (PAIRS, 2)))
        o1, o2 = tl.split(tl.permute(tl.reshape(acc, (PAIRS, 2, HEAD_DIM)), (0, 2, 1)))
        no_key = d1 == 0.0  # every key masked (or an empty cache): the output is 0
        inv_d1 = 1.0 / tl.where(no_key, 1.0, d1)
        out = o1 * inv_d1[:, None] * (1.0 + d2 * inv_d1)[:, None] - o2 * inv_d1[:, None]
        out = tl.where(no_key[:, None], 0.0, out)
        out = tl.where(poisoned, float("nan"), out)
        pair_t = pair // GROUP
        pair_head = kv_head * GROUP + pair % GROUP
        o_ptrs = O + batch * stride_ob + pair_t[:, None] * stride_ot + pair_head[:, None] * stride_oh
        tl.store(o_ptrs + dim[None, :] * stride_od, out.to(O.dtype.element_ty), mask=pair_valid[:, None])
    else:
        # m = +inf marks a poisoned partial: the merge turns it into NaN rows.
        tl.store(PART_M + part_row, tl.where(poisoned, float("inf"), m), mask=pair_valid)
        part_acc_row = 2 * (((batch * num_kv_heads + kv_head) * num_splits + split) * group_rows + first_pair) + row
        tl.store(PART_D + part_acc_row, d, mask=row_valid)
        tl.store(PART_O + part_acc_row.to(tl.int64)[:, None] * HEAD_DIM + dim[None, :], acc,
                 mask=row_valid[:, None])


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
        # Splits without visible keys wrote only m = -inf; a poisoned one
        # (m = +inf) gives weight exp2(inf - inf) = NaN, so NaN rows.
        has_keys = m_s > float("-inf")
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
def _device_limits(device_index: int) -> tuple[int, int]:
    """(multiprocessors, shared memory bytes per multiprocessor) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, props.shared_memory_per_multiprocessor


def split_program_shared_bytes(config: dict, head_dim: int, elem_bytes: int) -> int:
    """Upper bound on a split program's shared memory (every contiguous-cache
    row of the AOT table is within it): the K and V tiles of num_stages - 1
    pipeline buffers, the [q; r] rows of its query tile, conversion scratch."""
    streamed = 2 * config["BLOCK_N"] * head_dim * elem_bytes * max(1, config["num_stages"] - 1)
    return streamed + 4 * config["PAIRS"] * head_dim * elem_bytes + SPLIT_CONVERSION_BYTES


def split_program_registers(head_dim: int, elem_bytes: int) -> int:
    """Registers per thread of a split program: the AOT table's most (sm_90 and
    sm_80, paged and appending included) at the next head dim it compiles."""
    key = (elem_bytes, max(64, triton.next_power_of_2(head_dim)))
    return SPLIT_REGISTERS.get(key, MAX_REGISTERS_PER_THREAD)


def programs_per_multiprocessor(config: dict, head_dim: int, elem_bytes: int, shared_per_sm: int) -> int:
    """Split programs one streaming multiprocessor holds at once: bound by
    shared memory (each block also reserves some), registers and threads."""
    threads = 32 * config["num_warps"]
    by_shared = shared_per_sm // (split_program_shared_bytes(config, head_dim, elem_bytes) + RESERVED_SHARED_PER_BLOCK)
    by_registers = REGISTERS_PER_SM // (threads * split_program_registers(head_dim, elem_bytes))
    return max(1, min(by_shared, by_registers, THREADS_PER_SM // threads))


def choose_num_splits(work: int, key_tiles: int, multiprocessors: int, programs_per_sm: int) -> int:
    """Splits of the keys for `work` (batch, kv head, row block) programs whose
    caches hold `key_tiles` tiles of BLOCK_N keys, on a device of
    `multiprocessors` SMs each holding `programs_per_sm` split programs.

    Work that gives most SMs a whole cache already streams at full rate
    unsplit. Otherwise the count minimises a modelled time, in tiles one
    program streams while the device is full: waves x (tiles per split +
    the program's fixed cost) + the merge (its launch, and the partials each
    merge program reads in turn). A wave is one program per slot (SMs x
    programs per SM) and counts as at least MIN_WAVES: with fewer, early
    finishers leave SMs idle while the last programs stream. Splits keep at
    least MIN_TILES_PER_SPLIT tiles; ties go to fewer splits.
    """
    if work >= UNSPLIT_PROGRAMS_PER_SM * multiprocessors:
        return 1
    slots = multiprocessors * programs_per_sm

    def modelled_time(splits: int) -> float:
        waves = max(MIN_WAVES, math.ceil(work * splits / slots))
        stream = waves * (math.ceil(key_tiles / splits) + PROGRAM_COST_TILES)
        if splits == 1:
            return stream
        return stream + MERGE_LAUNCH_TILES + MERGE_BLOCK_TILES * math.ceil(splits / MERGE_SPLIT_BLOCK)

    return min(range(1, max(1, key_tiles // MIN_TILES_PER_SPLIT) + 1), key=modelled_time)


def default_num_splits(work: int, capacity: int, config: dict, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """`choose_num_splits` from shapes and the device only (no host
    synchronisation; a CUDA graph can capture the launch): the keys each
    split streams are set on the device from the lengths. The Triton
    interpreter (CPU) runs programs one by one: one split there."""
    if device.type != "cuda":
        return 1
    multiprocessors, shared_per_sm = _device_limits(device.index if device.index is not None
                                                    else torch.cuda.current_device())
    per_sm = programs_per_multiprocessor(config, head_dim, dtype.itemsize, shared_per_sm)
    return choose_num_splits(work, triton.cdiv(capacity, config["BLOCK_N"]), multiprocessors, per_sm)


def launch_config(head_dim: int, dtype: torch.dtype, group_rows: int) -> dict:
    """Tile sizes and launch options of the split kernel. Chosen from sm_90
    compiles (`ptxas -v`): none spills registers or nears 227 KB of shared
    memory. float32 runs `tl.dot` on FMA units and needs smaller tiles."""
    if dtype == torch.float32:
        small = head_dim <= 128
        return dict(PAIRS=MIN_PAIRS, BLOCK_N=64 if small else 16, num_warps=4, num_stages=3 if small else 2)
    cap = min(MAX_PAIRS, max(MIN_PAIRS, MAX_ROWS_TIMES_D // (2 * head_dim)))
    pairs = min(max(triton.next_power_of_2(group_rows), MIN_PAIRS), cap)
    big_tile = pairs >= 16  # 8 warps; at D=256 with 8 pairs they would spill
    return dict(PAIRS=pairs, BLOCK_N=64 if head_dim <= 128 else 32, num_warps=8 if big_tile else 4,
                num_stages=2 if big_tile else 3)


def triton_decode(q, r, k_cache, v_cache, cache_seqlens, block_table, *, k=None, v=None, scale: float,
                  window_size: int | None, cache_leftpad=None, num_splits: int | None = None) -> torch.Tensor:
    """Launch the split kernel, and the merge kernel when there is more than
    one split; inputs are already validated (shapes; values need not be).

    With k, v the split kernel also writes them into the cache at
    cache_seqlens (in place, as the torch path's append), and the sequence
    holds cache_seqlens + Tq keys, of which those below cache_leftpad are
    padding. `num_splits` overrides the shape-based choice (tests use it to
    exercise the merge).
    """
    B, Tq, HQ, D = q.shape
    HK = k_cache.shape[2]
    group = HQ // HK
    group_rows = group * Tq
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1  # a constexpr: keep it fixed for contiguous caches
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    config = launch_config(D, q.dtype, group_rows)
    num_row_blocks = triton.cdiv(group_rows, config["PAIRS"])
    if num_splits is None:
        num_splits = default_num_splits(B * HK * num_row_blocks, capacity, config, D, q.dtype, q.device)
    single = num_splits == 1
    window = kernel_window(window_size, capacity + Tq)  # the sequence holds at most capacity + Tq keys

    out = torch.empty_like(q)
    if single:  # no workspace: the split kernel writes the output
        part_m = part_d = part_o = out
    else:
        parts = B * HK * num_splits * group_rows
        part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_d = torch.empty(2 * parts, dtype=torch.float32, device=q.device)
        part_o = torch.empty(2 * parts, D, dtype=torch.float32, device=q.device)
    table = block_table if paged else cache_seqlens  # unused placeholder pointer when contiguous
    append = k is not None
    k_new, v_new = (k, v) if append else (k_cache, v_cache)  # placeholders, never read without APPEND
    precision = "ieee" if q.dtype == torch.float32 else None  # float32 caches must not round to tf32
    has_leftpad = cache_leftpad is not None
    leftpad = cache_leftpad if has_leftpad else cache_seqlens  # unused placeholder pointer without left padding
    _split_kernel[(B * HK * num_row_blocks * num_splits,)](
        q, r, k_cache, v_cache, k_new, v_new, cache_seqlens, leftpad, table, part_m, part_d, part_o, out,
        *q.stride(), *r.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        *out.stride(), table.stride(0),
        scale * LOG2E, window, capacity, k_cache.shape[0], Tq, HK, num_row_blocks, num_splits,
        GROUP=group, HEAD_DIM=D, PAGE_SIZE=page_size, PAGED=paged, APPEND=append, HAS_LEFTPAD=has_leftpad,
        SINGLE_SPLIT=single, ROWS_DIFFER=Tq > 1,
        DOT_PRECISION=precision, **config,
    )
    if not single:
        _merge_kernel[(B * HK * group_rows,)](
            part_m, part_d, part_o, out, *out.stride(), Tq, HK, num_splits,
            GROUP=group, HEAD_DIM=D, SPLIT_BLOCK=min(MERGE_SPLIT_BLOCK, max(2, triton.next_power_of_2(num_splits))),
            num_warps=1 if D <= 64 else 2,
        )
    return out
