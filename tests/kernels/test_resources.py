"""The resource model behind the autotune pruner, against the AOT compile table.

benchmarks/results/aot_kernels.md holds, for every config the pruner keeps
(and the flag combinations that change code), what ptxas reported when the
kernel was compiled for sm_90 and sm_80. The model must agree with every row
of a training kernel: an upper bound on shared memory, and "fits" exactly when
the compile launches and stays within the spill budget.
"""
from pathlib import Path

import pytest

from parallax.kernels import resources
from parallax.kernels.aot import COLUMNS, parse_table
from parallax.kernels.resources import Tiling

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "aot_kernels.md"
MAX_SHARED = {90: 232448, 80: 166912}
ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# (launcher, kernel) in the table -> kernel in the model
MODEL_KERNEL = {
    ("forward", "_parallax_fwd_kernel"): "forward",
    ("backward", "_parallax_bwd_dkdv_kernel"): "backward_kv_fused",
    ("backward_deterministic", "_parallax_bwd_dkdv_kernel"): "backward_kv",
    ("backward_deterministic", "_parallax_bwd_dq_kernel"): "backward_q",
}


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _tiling(config: str) -> Tiling:
    words = dict(w.split("=") for w in config.split() if "=" in w)
    warps = next(int(w[1:]) for w in config.split() if w.startswith("w"))
    stages = next(int(w[1:]) for w in config.split() if w.startswith("s"))
    return Tiling(int(words["BLOCK_M"]), int(words["BLOCK_N"]), warps, stages)


def _training_rows():
    rows = parse_table(TABLE.read_text())
    assert rows, f"no rows in {TABLE}"
    out = [r for r in rows if (r["launcher"], r["kernel"]) in MODEL_KERNEL]
    assert {(r["launcher"], r["kernel"]) for r in out} == set(MODEL_KERNEL)
    return out


def test_table_columns_and_verdicts():
    rows = parse_table(TABLE.read_text())
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert row["verdict"] == "ok" or row["verdict"].split(",")[0] in ("shared>limit", "registers>limit", "spills")


def test_model_agrees_with_every_row():
    """For every compiled row: the model says "fits" exactly when the compile
    launches within the spill budget (verdict ok); its shared memory is an
    upper bound wherever the compile fits the GPU, and a tight one (within
    `shared_slack`) wherever the model lets the config run."""
    disagreements = []
    for row in _training_rows():
        kernel = MODEL_KERNEL[(row["launcher"], row["kernel"])]
        arch = int(row["arch"].removeprefix("sm_"))
        elem, block_d, tiling = ELEM_BYTES[row["dtype"]], _block_d(int(row["D"])), _tiling(row["config"])
        fits = resources.fits(kernel, arch, elem, block_d, tiling, MAX_SHARED[arch])
        if fits != (row["verdict"] == "ok"):
            estimate = resources.registers(kernel, arch, elem, block_d, tiling)
            disagreements.append(f"fits={fits} (estimate {estimate:.0f} registers): {row}")
        shared, actual = resources.shared_bytes(kernel, arch, elem, block_d, tiling), int(row["shared"])
        if actual <= MAX_SHARED[arch] and shared < actual:
            disagreements.append(f"shared {shared} below the compiled {actual}: {row}")
        if fits and shared > actual + resources.shared_slack(kernel, arch, elem, block_d, tiling):
            disagreements.append(f"shared {shared} far above the compiled {actual}: {row}")
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_has_a_fitting_config(arch):
    candidates = dict(resources.CANDIDATES)
    candidates["backward_kv_fused"] = candidates["backward_kv"]
    missing = []
    for kernel, tilings in candidates.items():
        for elem, head_dims in ((2, (64, 80, 128, 256)), (4, (16, 32, 64))):
            for d in head_dims:
                fitting = [t for t in tilings
                           if resources.fits(kernel, arch, elem, _block_d(d), Tiling(*t), MAX_SHARED[arch])]
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

    from parallax.kernels.aot_capture import DEVICES, stand_in_driver
    from parallax.kernels.triton_parallel import FORWARD_PRUNE, MAX_KEPT

    tilings = [Tiling(*t) for t in resources.CANDIDATES["forward"]]
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                             num_stages=t.num_stages) for t in tilings]
    for dtype, head_dim in ((torch.bfloat16, 128), (torch.float32, 64)):
        q = torch.zeros(1, 1, 1, head_dim, dtype=dtype)
        with stand_in_driver(arch):
            kept = FORWARD_PRUNE["early_config_prune"](configs, {"q": q}, BLOCK_D=head_dim)
        limit = DEVICES[arch]["max_shared_mem"]
        expected = [c for c, t in zip(configs, tilings)
                    if resources.fits("forward", arch, q.element_size(), head_dim, t, limit)][:MAX_KEPT]
        assert kept == expected and 1 <= len(kept) <= MAX_KEPT
