"""What a tiling of a training kernel costs in shared memory and registers.

The autotune pruner (`common.prune`) keeps only the configs this
model says fit the GPU, and `tests/kernels/test_resources.py` checks the model
against every row of the AOT compile table (benchmarks/results/aot_kernels.md,
written by `python -m parallax.kernels.aot`).

Shared memory. Triton stages each tile a `tl.dot` reads from memory through
shared memory: the tiles a program keeps resident once, the streamed tiles
once per pipeline stage (`num_stages` buffers). On top come layout
conversions (score tiles handed from one product to the next, transposes),
bounded here by CONVERSION_BYTES. The model is an upper bound.

Registers. A float32 accumulator of R x C elements costs R * C / threads
registers per thread; a score tile that feeds a second product is spread
over min(num_warps, rows / 16) warps only (Triton puts the warps of chained
products along their rows; the others hold copies). The estimate adds the
accumulators, the score tiles, the resident operands where the products take
them from registers (mma.sync before Hopper or with few rows; float32, whose
products run on FMA units) and a fixed cost (addresses, row statistics, loop
state), with per-kernel weights fitted to the AOT table. ptxas spills past
MAX_REGISTERS; a tiling fits when the estimate is within MAX_REGISTERS plus
the spill budget.
"""
from __future__ import annotations

from dataclasses import dataclass

# float32 inputs go to the Triton kernels (by default) up to this head dim:
# beyond it their FMA products leave no tiling within the registers (the
# training kernels and decode alike; see the AOT table).
FLOAT32_MAX_HEAD_DIM = 64


def wide_float32(dtype, head_dim: int) -> bool:
    """float32 (a torch dtype or its name) wider than FLOAT32_MAX_HEAD_DIM:
    the dispatchers send it to the torch path unless told otherwise."""
    return str(dtype).removeprefix("torch.") == "float32" and head_dim > FLOAT32_MAX_HEAD_DIM


# The GPUs the AOT tool compiles for: opt-in shared memory per block, SM count.
GPUS = {
    90: {"max_shared_mem": 232448, "multiprocessor_count": 132, "name": "H100"},
    80: {"max_shared_mem": 166912, "multiprocessor_count": 108, "name": "A100"},
}
MAX_REGISTERS = 255            # per thread, what ptxas allocates before spilling
SPILL_BUDGET = 64              # bytes of spill stores per thread a kept config may have
REGISTERS_PER_BLOCK = 65536
# From this padded head dim up, a dK/dV program accumulates 1/split of the
# columns (split programs per key tile, each computing the full-width scores):
# two [BLOCK_N, 256] float32 accumulators leave no tiling within the registers
# (every candidate spilled 644 B to 40 KB). sm_80's mma.sync also keeps K and
# V in registers, hence the finer split there; query tiles stay 16 rows.
COLUMN_SPLIT_HEAD_DIM = 256
COLUMN_SPLIT = {90: 4, 80: 4}
# The full-width q, r, dO tiles of a split program's query step pass through
# registers beside its column tiles (fitted to the AOT table).
SPLIT_OPERAND_WEIGHT = 0.5
CONVERSION_BYTES = 16 * 1024   # layout-conversion scratch, upper bound seen in the AOT table

# Per kernel. resident / streamed / accumulators: (row side, count) of
# [rows, head_dim] tiles, the rows being BLOCK_M ("m") or BLOCK_N ("n");
# scores: [BLOCK_M, BLOCK_N] tiles alive per step; products: [rows, head_dim]
# float32 results made and consumed each step (the fused dQ, dR); weights and
# fixed registers fitted to the AOT table (sm_90 and sm_80, heaviest flags).
# Per kernel: resident / streamed / accumulators: (row side, count) of
# [rows, head_dim] tiles, the rows being BLOCK_M ("m") or BLOCK_N ("n");
# scores: [BLOCK_M, BLOCK_N] tiles alive per step; products: [rows, head_dim]
# float32 results made and consumed each step (the fused dQ, dR); transposes:
# the score tiles they take, staged in shared memory.
KERNELS = {
    # q, r resident; k, v streamed; s1, s2 scores; o1, o2 accumulators.
    "forward": dict(resident=("m", 2), streamed=("n", 2), accumulators=("m", 2), scores=2),
    # k, v resident; q, r, dO streamed; s1, s2, g scores; dk, dv accumulators.
    "backward_kv": dict(resident=("n", 2), streamed=("m", 3), accumulators=("n", 2), scores=3),
    "backward_kv_fused": dict(resident=("n", 2), streamed=("m", 3), accumulators=("n", 2), scores=3,
                              transposes=True, products=("m", 2)),
    # q, r, dO resident; k, v streamed; s1, s2, g scores; dq, dr accumulators.
    "backward_q": dict(resident=("m", 3), streamed=("n", 2), accumulators=("m", 2), scores=3),
}
# Register weights of `register_terms` (accumulator and product elements,
# score elements, operand words, warps, 1) per kernel and kind of product:
# "wgmma" (Hopper, operands from shared memory), "mma" (mma.sync: operands in
# registers, and the warps beyond the score tile's rows hold copies), "fma"
# (float32, no tensor cores; sm_90's code differs enough to be fitted apart).
# Fitted (a grid search, fewest wrong fit / no-fit verdicts first, then fewest
# estimates off by more than 10%) to every candidate compiled at the
# heaviest flags: the dK/dV kernels' for sm_90 and sm_80, bfloat16, D = 64,
# 128, 256 after their rewrite; the forward's and dQ's from
# benchmarks/results/aot_candidates.md. The float32 dK/dV weights predate the
# rewrite (refit owed with the full sweep).
WEIGHTS = {
    "forward": {"wgmma": (0.5, 2.25, 1.0, 2, 33), "mma": (0.8, 2.0, 0.75, 2, 65), "fma": (1.0, 3.0, 2.0, 10, -56),
                "fma_sm90": (0.5, 2.0, 1.75, 0, 68)},
    "backward_kv": {"wgmma": (0.8, 1.75, 0.5, -2, 67), "mma": (1.2, 2.75, 2.0, 16, -62),
                    "fma": (1.2, 1.0, 1.0, 0, 156), "fma_sm90": (1.2, 1.0, 1.0, 0, 156)},
    "backward_kv_fused": {"wgmma": (0.7, 1.0, 0.25, 0, 123), "mma": (1.6, 0.0, 2.0, -10, 76),
                          "fma": (1.2, 1.0, 1.0, 0, 148), "fma_sm90": (1.2, 1.0, 1.0, 8, 140)},
    "backward_q": {"wgmma": (0.4, 1.25, 1.25, 2, 1), "mma": (1.1, 1.0, 1.75, 8, -11),
                   "fma": (0.6, 1.5, 0.5, -2, 132), "fma_sm90": (0.5, 2.75, 0.0, -10, 144)},
}


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), largest
# tiles first; the pruner keeps those that fit. The forward keeps a query
# tile (BLOCK_M rows, two float32 accumulators) resident and streams BLOCK_N
# keys; dK/dV keeps BLOCK_N keys (two accumulators) and streams BLOCK_M
# queries; dQ mirrors the forward. Score tiles feed a second product, so
# Triton puts all warps along their rows: on Hopper 16 rows per warp there
# (BLOCK_M for the forward and dQ, BLOCK_N for dK/dV) or the surplus
# warpgroups compute the same rows again (`duplicates_work`). The small
# tilings serve sm_80 (mma.sync), head dim 256 and float32.
CANDIDATES = {
    "forward": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 16, 8, 2),
                (32, 16, 4, 1), (16, 32, 4, 1)],
    "backward_kv": [(32, 128, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2), (16, 64, 4, 2), (16, 64, 8, 2),
                    (16, 64, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
    "backward_q": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 8, 1),
                   (32, 16, 8, 1), (16, 32, 4, 1)],
}


def head_block(head_dim: int) -> int:
    """Head dims are padded to a power of two (masked), at least 16 for tl.dot."""
    return max(16, 1 << (head_dim - 1).bit_length())


@dataclass(frozen=True)
class Tiling:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def rows(self, side: str) -> int:
        return self.block_m if side == "m" else self.block_n


def column_split(kernel: str, arch: int, block_d: int) -> int:
    """Programs per key tile of the dK/dV kernels (1 for every other kernel)."""
    if not kernel.startswith("backward_kv") or block_d < COLUMN_SPLIT_HEAD_DIM:
        return 1
    return COLUMN_SPLIT[90 if arch >= 90 else 80]


def _score_rows(kernel: str, t: Tiling) -> int:
    """Rows of the products that make the score tiles (keys for dK/dV)."""
    return t.block_n if kernel.startswith("backward_kv") else t.block_m


def uses_wgmma(kernel: str, arch: int, elem_bytes: int, t: Tiling) -> bool:
    """Hopper's warpgroup MMA: 16-bit inputs and at least 64 rows (one
    warpgroup's worth) in the products that make the score tiles."""
    return arch >= 90 and elem_bytes == 2 and _score_rows(kernel, t) >= 64 and t.num_warps % 4 == 0


def duplicates_work(kernel: str, arch: int, elem_bytes: int, t: Tiling) -> bool:
    """On Hopper, Triton gives chained tensor-core products (wgmma, and
    mma.sync below 64 rows) one warp per 16 rows (warpsPerCTA [num_warps,
    1]): with fewer rows, the surplus warps compute the same rows again, and
    the layouts the other products get cost barriers (the AOT table's `dup
    dots`)."""
    return arch >= 90 and elem_bytes == 2 and _score_rows(kernel, t) < 16 * t.num_warps


def product_kind(kernel: str, arch: int, elem_bytes: int, t: Tiling) -> str:
    if elem_bytes == 4:
        return "fma_sm90" if arch >= 90 else "fma"
    return "wgmma" if uses_wgmma(kernel, arch, elem_bytes, t) else "mma"


def shared_bytes(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling) -> int:
    """Upper bound on the dynamic shared memory of one program: num_stages
    buffers of the streamed tiles (mma.sync often uses one fewer: see
    `shared_slack`); float32 products stage their score operands through
    shared memory too."""
    spec = KERNELS[kernel]
    kind = product_kind(kernel, arch, elem_bytes, t)
    cols = block_d // column_split(kernel, arch, block_d)
    side, count = spec["resident"]
    resident = count * t.rows(side) * block_d * elem_bytes
    side, count = spec["streamed"]
    per_stage = count * t.rows(side) * block_d * elem_bytes
    if cols < block_d:  # K's columns resident, the streamed tiles' columns loaded again
        resident += t.block_n * cols * elem_bytes
        per_stage += count * t.rows(side) * cols * elem_bytes
    total = resident + max(1, t.num_stages) * per_stage
    if spec.get("transposes"):
        # The [keys, 2 x queries] dS1/dS2 tile the fused dQ/dR product reads
        # from shared memory.
        total += 2 * t.block_m * t.block_n * elem_bytes
    if kind.startswith("fma"):
        total += spec["scores"] * t.block_m * t.block_n * elem_bytes
    return total + CONVERSION_BYTES


def shared_slack(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling) -> int:
    """How far above the compiled kernel's shared memory `shared_bytes` may
    be: the conversion scratch it reserves and, without wgmma, a pipeline
    buffer and the staged score operands the compiler may do without."""
    spec = KERNELS[kernel]
    kind = product_kind(kernel, arch, elem_bytes, t)
    if kind == "wgmma":
        return 2 * CONVERSION_BYTES
    side, count = spec["streamed"]
    slack = 2 * CONVERSION_BYTES + count * t.rows(side) * block_d * elem_bytes
    if kind.startswith("fma"):
        slack += spec["scores"] * t.block_m * t.block_n * elem_bytes
    return slack


def register_terms(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling) -> tuple:
    """Per thread: (float32 accumulator and product elements, score
    elements, 32-bit words of the operands that pass through registers,
    warps, 1): what WEIGHTS weigh."""
    spec = KERNELS[kernel]
    threads = 32 * t.num_warps
    cols = block_d // column_split(kernel, arch, block_d)
    side, count = spec["accumulators"]
    accumulators = count * t.rows(side) * cols / threads
    if "products" in spec:
        side, count = spec["products"]
        accumulators += count * t.rows(side) * cols / threads
    warps_on_scores = max(1, min(t.num_warps, _score_rows(kernel, t) // 16))
    scores = spec["scores"] * t.block_m * t.block_n / (32 * warps_on_scores)
    side, count = spec["resident"]
    operands = count * t.rows(side) * block_d
    if cols < block_d:
        operands += t.block_n * cols
        side, count = spec["streamed"]
        operands += SPLIT_OPERAND_WEIGHT * count * t.rows(side) * block_d
    return accumulators, scores, operands * elem_bytes / 4 / threads, t.num_warps, 1


def registers(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling) -> float:
    """Estimated registers per thread the tiling asks for (before spilling)."""
    weights = WEIGHTS[kernel][product_kind(kernel, arch, elem_bytes, t)]
    return sum(w * x for w, x in zip(weights, register_terms(kernel, arch, elem_bytes, block_d, t)))


def fits(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling, max_shared: int) -> bool:
    """Launchable (shared memory, registers per block) and within the spill budget."""
    if column_split(kernel, arch, block_d) > 1 and t.block_m > 16:
        return False  # measured: 32-row query tiles spill in every split tiling
    if shared_bytes(kernel, arch, elem_bytes, block_d, t) > max_shared:
        return False
    if 32 * t.num_warps * MAX_REGISTERS > REGISTERS_PER_BLOCK:
        return False
    return registers(kernel, arch, elem_bytes, block_d, t) <= MAX_REGISTERS + SPILL_BUDGET / 4
