"""What a tiling of a training kernel costs in shared memory and registers.

The autotune pruner (`triton_parallel.prune`) keeps only the configs this
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
# beyond it their FMA products leave no tiling within the registers.
FLOAT32_MAX_HEAD_DIM = 64
MAX_REGISTERS = 255            # per thread, what ptxas allocates before spilling
SPILL_BUDGET = 64              # bytes of spill stores per thread a kept config may have
REGISTERS_PER_BLOCK = 65536
CONVERSION_BYTES = 12 * 1024   # layout-conversion scratch, upper bound seen in the AOT table
ACCUMULATOR_WEIGHT = 1.2       # an accumulator register plus the copies around its products

# Per kernel. resident / streamed / accumulators: (row side, count) of
# [rows, head_dim] tiles, the rows being BLOCK_M ("m") or BLOCK_N ("n");
# scores: [BLOCK_M, BLOCK_N] tiles alive per step; products: [rows, head_dim]
# float32 results made and consumed each step (the fused dQ, dR); weights and
# fixed registers fitted to the AOT table (sm_90 and sm_80, heaviest flags).
KERNELS = {
    # q, r resident; k, v streamed; s1, s2 scores; o1, o2 accumulators.
    "forward": dict(resident=("m", 2), streamed=("n", 2), accumulators=("m", 2), scores=2,
                    score_weight=1.0, operand_weight=0.0, fixed=68),
    # k, v resident; q, r, dO streamed; s1, s2, g scores; dk, dv accumulators.
    "backward_kv": dict(resident=("n", 2), streamed=("m", 3), accumulators=("n", 2), scores=3,
                        score_weight=0.5, operand_weight=2.0, fixed=141),
    # as backward_kv, plus each step's dq, dr products (transposed scores in shared memory).
    "backward_kv_fused": dict(resident=("n", 2), streamed=("m", 3), accumulators=("n", 2), scores=3,
                              score_weight=0.5, operand_weight=2.0, fixed=141, transposes=2, products=("m", 1)),
    # q, r, dO resident; k, v streamed; s1, s2, g scores; dq, dr accumulators.
    "backward_q": dict(resident=("m", 3), streamed=("n", 2), accumulators=("m", 2), scores=3,
                       score_weight=0.5, operand_weight=1.0, fixed=90),
}


@dataclass(frozen=True)
class Tiling:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def rows(self, side: str) -> int:
        return self.block_m if side == "m" else self.block_n


def _score_rows(kernel: str, t: Tiling) -> int:
    """Rows of the products that make the score tiles (keys for dK/dV)."""
    return t.block_n if kernel.startswith("backward_kv") else t.block_m


def uses_wgmma(kernel: str, arch: int, elem_bytes: int, t: Tiling) -> bool:
    """Hopper's warpgroup MMA: 16-bit inputs and at least 64 rows (one
    warpgroup's worth) in the products that make the score tiles."""
    return arch >= 90 and elem_bytes == 2 and _score_rows(kernel, t) >= 64 and t.num_warps % 4 == 0


def shared_bytes(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling) -> int:
    """Upper bound on the dynamic shared memory of one program."""
    spec = KERNELS[kernel]
    side, count = spec["resident"]
    resident = count * t.rows(side) * block_d * elem_bytes
    side, count = spec["streamed"]
    per_stage = count * t.rows(side) * block_d * elem_bytes
    total = resident + max(1, t.num_stages) * per_stage
    total += spec.get("transposes", 0) * t.block_m * t.block_n * elem_bytes
    return total + CONVERSION_BYTES


def registers(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling) -> float:
    """Estimated registers per thread the tiling asks for (before spilling)."""
    spec = KERNELS[kernel]
    threads = 32 * t.num_warps
    side, count = spec["accumulators"]
    need = ACCUMULATOR_WEIGHT * count * t.rows(side) * block_d / threads
    warps_on_scores = max(1, min(t.num_warps, _score_rows(kernel, t) // 16))
    need += spec["score_weight"] * spec["scores"] * t.block_m * t.block_n / (32 * warps_on_scores)
    if "products" in spec:
        side, count = spec["products"]
        need += count * t.rows(side) * block_d / threads
    side, count = spec["resident"]
    resident = count * t.rows(side) * block_d
    if elem_bytes == 4:
        # float32 products run on FMA units, every operand in registers.
        side, count = spec["streamed"]
        need += (resident + count * t.rows(side) * block_d) / threads
    elif not uses_wgmma(kernel, arch, elem_bytes, t):
        # mma.sync takes the resident tiles from registers (16-bit, two per register).
        need += spec["operand_weight"] * resident / 2 / threads
    return need + spec["fixed"]


def fits(kernel: str, arch: int, elem_bytes: int, block_d: int, t: Tiling, max_shared: int) -> bool:
    """Launchable (shared memory, registers per block) and within the spill budget."""
    if shared_bytes(kernel, arch, elem_bytes, block_d, t) > max_shared:
        return False
    if 32 * t.num_warps * MAX_REGISTERS > REGISTERS_PER_BLOCK:
        return False
    return registers(kernel, arch, elem_bytes, block_d, t) <= MAX_REGISTERS + SPILL_BUDGET / 4
