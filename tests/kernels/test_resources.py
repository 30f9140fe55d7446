"""The resource model behind the autotune pruner, against the AOT compile table.

benchmarks/results/aot_kernels.md holds, for every config the pruner keeps,
what ptxas reported when the kernel was compiled (and what its main loop
does). The model must agree with every row of a training kernel: an upper
bound on shared memory, "fits" exactly when the compile launches and stays
within the spill budget, and registers within 10% of ptxas's where nothing
spills. Every dK/dV config kept for sm_90 at D = 64 and 128 must feed the
tensor cores (aot.Row.structure_problems).
"""
import re
from pathlib import Path

import pytest

from parallax.kernels.triton import resources
from parallax.kernels.aot import COLUMNS, MAX_LOOP_BARRIERS, MODEL_KERNELS
from parallax.kernels.triton.resources import GPUS, Tiling, head_block

from .aot_table import parse_table

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "aot_kernels.md"
ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
RESOURCE_VERDICTS = ("shared>limit", "registers>limit", "spills")


def _max_shared(arch: int) -> int:
    return GPUS[arch]["max_shared_mem"]


def _tiling(config: str) -> Tiling:
    words = dict(w.split("=") for w in config.split() if "=" in w)
    warps = next(int(w[1:]) for w in config.split() if w.startswith("w"))
    stages = next(int(w[1:]) for w in config.split() if w.startswith("s"))
    return Tiling(int(words["BLOCK_M"]), int(words["BLOCK_N"]), warps, stages)


def _training_rows():
    rows = parse_table(TABLE.read_text())
    assert rows, f"no rows in {TABLE}"
    out = [r for r in rows if (r["launcher"], r["kernel"]) in MODEL_KERNELS]
    assert {(r["launcher"], r["kernel"]) for r in out} == set(MODEL_KERNELS)
    return out


def test_table_columns_and_verdicts():
    rows = parse_table(TABLE.read_text())
    assert list(rows[0]) == list(COLUMNS)
    known = RESOURCE_VERDICTS + ("duplicated", "m64n8", "ldmatrix", f"bar.sync>{MAX_LOOP_BARRIERS}")
    for row in rows:
        assert row["verdict"] == "ok" or set(row["verdict"].split(",")) <= set(known), row


def test_model_agrees_with_every_row():
    """For every compiled row: the model says "fits" exactly when the compile
    launches within the spill budget; its shared memory is an upper bound
    wherever the compile fits the GPU, and a tight one (within
    `shared_slack`) wherever the model lets the config run; its registers
    (shown in the table) are within 10% of ptxas's where nothing spills, and
    over MAX_REGISTERS where the spills pass the budget."""
    disagreements = []
    for row in _training_rows():
        kernel = MODEL_KERNELS[(row["launcher"], row["kernel"])]
        arch = int(row["arch"].removeprefix("sm_"))
        elem, block_d, tiling = ELEM_BYTES[row["dtype"]], head_block(int(row["D"])), _tiling(row["config"])
        fits = resources.fits(kernel, arch, elem, block_d, tiling, _max_shared(arch))
        launches_in_budget = not set(row["verdict"].split(",")) & set(RESOURCE_VERDICTS)
        estimate = resources.registers(kernel, arch, elem, block_d, tiling)
        if fits != launches_in_budget:
            disagreements.append(f"fits={fits} (estimate {estimate:.0f} registers): {row}")
        if round(estimate) != int(row["model"]):
            disagreements.append(f"the table's model column is stale (now {estimate:.0f}): {row}")
        registers, spill = int(row["registers"]), int(row["spill"])
        if spill == 0 and abs(min(estimate, resources.MAX_REGISTERS) - registers) > 0.1 * registers:
            disagreements.append(f"estimate {estimate:.0f} registers, ptxas {registers}: {row}")
        shared, actual = resources.shared_bytes(kernel, arch, elem, block_d, tiling), int(row["shared"])
        if actual <= _max_shared(arch) and shared < actual:
            disagreements.append(f"shared {shared} below the compiled {actual}: {row}")
        if fits and shared > actual + resources.shared_slack(kernel, arch, elem, block_d, tiling):
            disagreements.append(f"shared {shared} far above the compiled {actual}: {row}")
    assert not disagreements, "\n".join(disagreements)


def test_kept_dkdv_configs_feed_hopper_tensor_cores():
    """The issue's structure target, row by row: at D = 64 and 128 on sm_90
    (16-bit inputs), every kept dK/dV config runs its main loop on wgmma of
    64 rows or more per warpgroup and at least 16 columns, no dot computed by
    two warpgroups, K/V read by the tensor cores from shared memory (no
    ldmatrix in the loop), at most MAX_LOOP_BARRIERS barriers, spills within
    the budget."""
    rows = [r for r in parse_table(TABLE.read_text()) if r["kernel"] == "_parallax_bwd_dkdv_kernel"
            and r["arch"] == "sm_90" and r["dtype"] != "float32" and int(r["D"]) <= 128 and r["kept"] == "yes"]
    assert {r["launcher"] for r in rows} == {"backward", "backward_fused"}
    assert {int(r["D"]) for r in rows} >= {64, 128}
    for row in rows:
        shapes = row["loop MMA"].split(" + ")
        assert shapes and all(re.fullmatch(r"\d+ m64n(\d+)k16", s) and int(s.split("n")[1].split("k")[0]) >= 16
                              for s in shapes), row
        assert row["dup dots"].startswith("0/") and row["ldmatrix"] == "0", row
        assert int(row["bar.sync"]) <= MAX_LOOP_BARRIERS and int(row["spill"]) <= resources.SPILL_BUDGET, row
        assert row["verdict"] == "ok", row


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_has_a_fitting_config(arch):
    candidates = dict(resources.CANDIDATES)
    candidates["backward_kv_fused"] = candidates["backward_kv"]
    missing = []
    for kernel, tilings in candidates.items():
        for elem, head_dims in ((2, (64, 80, 128, 256)), (4, (16, 32, 64))):
            for d in head_dims:
                fitting = [t for t in tilings
                           if resources.fits(kernel, arch, elem, head_block(d), Tiling(*t), _max_shared(arch))]
                if not fitting:
                    missing.append((kernel, elem, d, fitting))
    assert not missing, missing


@pytest.mark.parametrize("arch", [90, 80])
def test_pruner_keeps_the_fitting_configs_of_the_device(arch):
    """The autotune pruner reads the device from Triton's driver (here the AOT
    stand-in) and the dtype from q, and keeps at most MAX_KEPT configs, all
    of which the model says fit; a float32 call gets small tiles."""
    import torch
    import triton

    from parallax.kernels.aot.capture import stand_in_driver
    from parallax.kernels.triton.common import FORWARD_PRUNE, MAX_KEPT

    tilings = [Tiling(*t) for t in resources.CANDIDATES["forward"]]
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                             num_stages=t.num_stages) for t in tilings]
    for dtype, head_dim in ((torch.bfloat16, 128), (torch.float32, 64)):
        q = torch.zeros(1, 1, 1, head_dim, dtype=dtype)
        with stand_in_driver(arch):
            kept = FORWARD_PRUNE["early_config_prune"](configs, {"q": q}, BLOCK_D=head_dim)
        elem = q.element_size()
        expected = [c for c, t in zip(configs, tilings)
                    if resources.fits("forward", arch, elem, head_dim, t, _max_shared(arch))
                    and not resources.duplicates_work("forward", arch, elem, t)][:MAX_KEPT]
        assert kept == expected and 1 <= len(kept) <= MAX_KEPT


@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_dkdv_pruner_rejects_tilings_that_duplicate_work_on_hopper(fused):
    """On sm_90, 16-bit: every kept dK/dV tiling gives each warp 16 key rows
    or more (on sm_80, where mma.sync has no warpgroups, no such rule)."""
    import torch
    import triton

    from parallax.kernels.aot.capture import stand_in_driver
    from parallax.kernels.triton.common import BACKWARD_KV_PRUNE

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in resources.CANDIDATES["backward_kv"]]
    assert any(c.kwargs["BLOCK_N"] < 16 * c.num_warps for c in configs)  # the rule has something to reject
    for head_dim in (64, 128, 256):
        q = torch.zeros(1, 1, 1, head_dim, dtype=torch.bfloat16)
        with stand_in_driver(90):
            kept = BACKWARD_KV_PRUNE["early_config_prune"](configs, {"q": q}, BLOCK_D=head_dim, FUSED=fused)
        assert kept and all(c.kwargs["BLOCK_N"] >= 16 * c.num_warps for c in kept), (head_dim, kept)
