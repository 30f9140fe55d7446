"""Pieces shared by the Parallax training kernels (forward and backward).

Every program works on one tile of rows of one (sequence, head) and loops over
tiles of the other side (keys for the forward and dQ, queries for dK/dV). The
helpers here say which sequence a tile belongs to, which tiles of the other side
its mask can reach, and which of those need a per-element mask, so that tiles
wholly outside the causal / window band are never loaded. The mask convention is
`reference.visible_keys`: query i sees key j when j <= i + S - T (causal) and
j > i + S - T - W (window W).

This module imports triton at load time; import it lazily.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.runtime import driver

from . import resources

# The interpreter runs tiles as numpy arrays: one small configuration keeps CPU
# tests fast and deterministic.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning keys on what changes the best tiling, never on sequence lengths.
AUTOTUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "GROUP"]


def _configs(candidates):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples as triton.Config."""
    if INTERPRETED:
        candidates = [(16, 16, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]


# Configs the autotuner times per (head dim, flags, dtype): two of those that
# fit, so first calls stay short.
MAX_KEPT = 2


def device_limits() -> tuple[int, int]:
    """(compute capability as 90, 80, ..., shared memory per block) of the
    device Triton compiles for: the GPU, or the AOT tool's stand-in."""
    active = driver.active
    target = active.get_current_target()
    props = active.utils.get_device_properties(active.get_current_device())
    arch = target.arch if isinstance(target.arch, int) else 80
    return arch, props["max_shared_mem"]


def prune_by_resources(kernel_of):
    """An `early_config_prune` keeping the configs that `resources.fits` the
    device and do not compute products twice (`resources.duplicates_work`),
    at most MAX_KEPT, in candidate order; if every fitting one duplicates
    work (the forward at D=256 on Hopper), those without wgmma (a duplicated
    wgmma product also runs at a fraction of its width); if none fits, the
    one that launches with the smallest register estimate. `kernel_of(args)`
    names the kernel in `resources.KERNELS`."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kernel, elem_bytes, block_d = kernel_of(args), args["q"].element_size(), args["BLOCK_D"]
        arch, max_shared = device_limits()
        tilings = [(c, resources.Tiling(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
                   for c in configs]
        fitting = [(c, t) for c, t in tilings if resources.fits(kernel, arch, elem_bytes, block_d, t, max_shared)]
        whole = [c for c, t in fitting if not resources.duplicates_work(kernel, arch, elem_bytes, t)]
        without_wgmma = [c for c, t in fitting if not resources.uses_wgmma(kernel, arch, elem_bytes, t)]
        if whole or without_wgmma:
            return (whole or without_wgmma)[:MAX_KEPT]
        return [min(tilings, key=lambda ct: (
            resources.shared_bytes(kernel, arch, elem_bytes, block_d, ct[1]) > max_shared,
            resources.registers(kernel, arch, elem_bytes, block_d, ct[1])))[0]]

    return {"early_config_prune": prune}


FORWARD_CONFIGS = _configs(resources.CANDIDATES["forward"])
BACKWARD_KV_CONFIGS = _configs(resources.CANDIDATES["backward_kv"])  # fused and deterministic dK/dV
BACKWARD_Q_CONFIGS = _configs(resources.CANDIDATES["backward_q"])
FORWARD_PRUNE = prune_by_resources(lambda args: "forward")
BACKWARD_KV_PRUNE = prune_by_resources(lambda args: "backward_kv_fused" if args["FUSED"] else "backward_kv")
BACKWARD_Q_PRUNE = prune_by_resources(lambda args: "backward_q")


# Heads whose shared operands (K/V for query tiles, Q/R/dO for key tiles)
# fit in about this many bytes run as one group (`heavy_first`): about two
# thirds of an H100's or H200's 50 MB L2 cache.
L2_GROUP_BYTES = 32 * 1024 * 1024


def heads_per_group(shared_bytes: int, heads_sharing: int = 1) -> int:
    """Heads per `heavy_first` group: as many units of `heads_sharing` heads
    (a GQA group sharing one K/V) as fit L2_GROUP_BYTES at `shared_bytes`
    each, at least one."""
    return max(1, L2_GROUP_BYTES // max(1, shared_bytes)) * heads_sharing


def search_steps(num_seqs: int) -> int:
    """Binary-search steps that find a tile's sequence among `num_seqs`."""
    return (num_seqs - 1).bit_length()


def tiles_per_head(rows: int, num_seqs: int, block: int, is_varlen: bool) -> int:
    """Programs per head along the tiled side (see `locate_tile`)."""
    return triton.cdiv(rows, block) + (num_seqs if is_varlen else 0)


@triton.jit
def locate_tile(tile, cu_seqlens, num_seqs, steps, rows_per_batch, BLOCK: tl.constexpr,
                IS_VARLEN: tl.constexpr):
    """(first row of the tile's sequence within its batch, sequence length,
    first row of the tile within the sequence).

    Dense batches: one sequence per batch, tiles at multiples of BLOCK. Packed
    (varlen) batches, without a host sync: give sequence s the padded start
    cu[s] + s * BLOCK, which increases with s and leaves room for its partial
    last tile; tile t belongs to the last s whose padded start is <= t * BLOCK
    (a binary search over cu_seqlens). Tiles past a sequence's end get a first
    row >= its length, and their programs exit.
    """
    if IS_VARLEN:
        target = tile * BLOCK
        lo = tile * 0
        hi = lo + num_seqs
        for _ in range(steps):
            mid = (lo + hi) // 2
            below = tl.load(cu_seqlens + mid) + mid * BLOCK <= target
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        start = tl.load(cu_seqlens + lo)
        length = tl.load(cu_seqlens + lo + 1) - start
        first_tile = tl.cdiv(start + lo * BLOCK, BLOCK)
        return start, length, (tile - first_tile) * BLOCK
    return tile * 0, tile * 0 + rows_per_batch, tile * BLOCK


@triton.jit
def heavy_first(pid, num_tiles, num_heads, group_heads):
    """(rank, head) of program `pid` of a grid of `num_heads * num_tiles`,
    rank 0 being a head's heaviest tile. Heads run in groups of
    `group_heads` (`heads_per_group`): within a group, every head's rank-0
    tile comes first, then every head's rank 1, and so on, so that the
    longest programs start first across heads (not only within one) while
    the group's shared operands stay in L2."""
    group_programs = group_heads * num_tiles
    group = pid // group_programs
    first_head = group * group_heads
    heads = tl.minimum(group_heads, num_heads - first_head)
    within = pid - group * group_programs
    return within // heads, first_head + within % heads


@triton.jit
def query_tile(pid, cu_seqlens, T, S, HQ, num_heads, group_heads, num_seqs, steps, BLOCK_M: tl.constexpr,
               IS_VARLEN: tl.constexpr):
    """Where a query-tile program works: (batch, head, batch * HQ + head,
    sequence start, sequence length, first row of the tile within the
    sequence, first key row, number of keys). Late (causal: heavy) tiles are
    launched first (`heavy_first`). A tile whose first row is >= the sequence
    length has nothing to do."""
    num_tiles = tl.cdiv(T, BLOCK_M)
    if IS_VARLEN:
        num_tiles += num_seqs
    rank, batch_head = heavy_first(pid, num_tiles, num_heads, group_heads)
    tile = num_tiles - 1 - rank
    batch = batch_head // HQ
    seq_start, seq_len, m0 = locate_tile(tile, cu_seqlens, num_seqs, steps, T, BLOCK_M, IS_VARLEN)
    if IS_VARLEN:
        key_start = seq_start
        key_len = seq_len
    else:
        key_start = batch * S
        key_len = S + seq_len * 0
    return batch, batch_head % HQ, batch_head, seq_start, seq_len, m0, key_start, key_len


@triton.jit
def tile_mask(rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a [rows, BLOCK_D] tile; the head-dim test only where the head
    dim is padded, so unpadded tiles mask whole rows (fewer predicates)."""
    if BLOCK_D == HEAD_DIM:
        mask = tl.broadcast_to(rows_ok[:, None], (rows_ok.shape[0], BLOCK_D))
    else:
        mask = rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def column_tile_pointers(base, rows, stride, first, col0, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """(pointers, mask) of the [BLOCK_ROWS, BLOCK_C] tile at row `first` and
    column `col0` of the [rows, HEAD_DIM] matrix at `base` (rows `stride`
    elements apart). The tile's start is a scalar and the offsets within it
    int32, so the pointer tensor costs half the registers of int64 offsets."""
    offs_r = tl.arange(0, BLOCK_ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    start = base + first.to(tl.int64) * stride + col0
    ptrs = start + (offs_r[:, None] * stride + offs_c[None, :])
    return ptrs, tile_mask(first + offs_r < rows, col0 + offs_c, HEAD_DIM, BLOCK_C)


@triton.jit
def load_columns(base, rows, stride, first, col0, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """The tile `column_tile_pointers` locates, zero outside the matrix."""
    ptrs, mask = column_tile_pointers(base, rows, stride, first, col0, HEAD_DIM, BLOCK_ROWS, BLOCK_C)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_columns(base, rows, stride, first, col0, value, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Store `value` (in the tensor's dtype) as the tile `load_columns` reads."""
    ptrs, mask = column_tile_pointers(base, rows, stride, first, col0, HEAD_DIM, BLOCK_ROWS, BLOCK_C)
    tl.store(ptrs, value, mask=mask)


@triton.jit
def load_tile(base, rows, stride, first, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [BLOCK_ROWS, BLOCK_D] tile at row `first` of the [rows, HEAD_DIM]
    matrix at `base`, zero outside it (rows past its end, head-dim padding):
    `load_columns` of the whole (padded) row width."""
    return load_columns(base, rows, stride, first, 0, HEAD_DIM, BLOCK_ROWS, BLOCK_D)


@triton.jit
def store_tile(base, rows, stride, first, value, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Store `value` (in the tensor's dtype) as the tile `load_tile` reads."""
    store_columns(base, rows, stride, first, 0, value, HEAD_DIM, BLOCK_ROWS, BLOCK_D)


@triton.jit
def query_tile_offsets(batch, head, seq_start, seq_len, m0, key_start, T, HQ, HK,
                       HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """For a query tile found by `query_tile`: (rows it holds, row indices,
    offset of its sequence's first row for its head in [B, T, HQ, D] tensors,
    offset of its KV head's first key in [B, S, HK, D] tensors)."""
    rows = tl.minimum(BLOCK_M, seq_len - m0)
    offs_m = tl.arange(0, BLOCK_M)
    q_base = (batch.to(tl.int64) * T + seq_start) * (HQ * HEAD_DIM) + head * HEAD_DIM
    kv_base = key_start.to(tl.int64) * (HK * HEAD_DIM) + (head // GROUP) * HEAD_DIM
    return rows, offs_m, q_base, kv_base


@triton.jit
def tile_phases(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the tiles covering [lo, hi) (starting at lo) into three runs.

    Tiles inside [full_lo, full_hi) are visible to every row of the resident
    tile and need no mask; the runs before and after them are masked. Returns
    (masked tiles before, unmasked tiles, total tiles).
    """
    total = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK)
    head = tl.minimum(tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK), total)
    full = tl.maximum(full_hi - (lo + head * BLOCK), 0) // BLOCK
    return head, tl.minimum(full, total - head), total


@triton.jit
def key_range(m0, rows, T, S, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Keys [lo, hi) reachable from query rows [m0, m0 + rows), and the range
    [full_lo, full_hi) that all BLOCK_M rows of the tile see."""
    shift = S - T
    lo = m0 * 0
    hi = lo + S
    full_lo = lo
    full_hi = hi
    if IS_CAUSAL:
        hi = tl.minimum(S, m0 + rows + shift)
        full_hi = tl.minimum(S, m0 + shift + 1)
    if HAS_WINDOW:
        lo = tl.maximum(0, m0 + shift - window + 1)
        full_lo = m0 + BLOCK_M + shift - window
    return lo, hi, full_lo, full_hi


@triton.jit
def query_range(n0, cols, T, S, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Queries [lo, hi) that see some key of [n0, n0 + cols), and the range
    [full_lo, full_hi) of queries that see all BLOCK_N keys of the tile."""
    shift = S - T
    lo = n0 * 0
    hi = lo + T
    full_lo = lo
    full_hi = hi
    if IS_CAUSAL:
        lo = tl.maximum(0, n0 - shift)
        full_lo = n0 + BLOCK_N - 1 - shift
    if HAS_WINDOW:
        hi = tl.minimum(T, n0 + cols - 1 - shift + window)
        full_hi = tl.minimum(T, n0 - shift + window)
    full_hi = tl.where(cols < BLOCK_N, full_lo, full_hi)  # a partial key tile is masked everywhere
    return lo, hi, full_lo, full_hi


@triton.jit
def visible(query_rows, key_cols, T, S, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """`reference.visible_keys` plus bounds checks, for broadcastable tensors of
    query and key positions ([M, 1] x [1, N], or transposed for [N, M] tiles)."""
    query_pos = query_rows + (S - T)
    keep = (query_rows < T) & (key_cols < S)
    if IS_CAUSAL:
        keep &= key_cols <= query_pos
    if HAS_WINDOW:
        keep &= key_cols > query_pos - window
    return keep
