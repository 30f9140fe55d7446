"""`python -m parallax.kernels.aot --subset ci`: the kernels compile for an
H100 (sm_90) on this CPU-only machine, through the real launchers.

The compile runs in a subprocess without TRITON_INTERPRET (conftest.py sets
it for the in-process kernel tests, and under it `triton.jit` gives
interpreted functions that cannot be compiled). About half a minute on two
cores: one compile per kernel (forward, the default and the fused backward,
the row statistics, decode split and merge) with ptxas from the triton wheel.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from .aot_table import parse_table

ROOT = Path(__file__).resolve().parents[2]


def test_ci_subset_compiles_every_kernel_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, "-m", "parallax.kernels.aot", "--subset", "ci", "--cache-dir", str(tmp_path / "cache"),
         "--out", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = parse_table(out.read_text())
    kernels = {(r["launcher"], r["kernel"]) for r in rows}
    assert {("forward", "_parallax_fwd_kernel"), ("backward", "_parallax_bwd_dkdv_kernel"),
            ("backward", "_row_dots_kernel"), ("backward", "_parallax_bwd_dq_kernel"),
            ("backward_fused", "_parallax_bwd_dkdv_kernel")} <= kernels
    assert any(launcher == "decode" for launcher, _ in kernels)
    for row in rows:
        assert row["arch"] == "sm_90" and row["verdict"] == "ok", row
        assert 0 < int(row["shared"]) <= 232448 and 0 < int(row["registers"]) <= 255
    # Hopper's warpgroup MMA in the training kernels' main loops, where the
    # resource model's estimate is within 10% of ptxas.
    for row in rows:
        if row["kernel"].startswith("_parallax_"):
            assert row["wgmma"] == "yes" and not row["loop MMA"].startswith(("mma", "-")), row
            assert abs(min(int(row["model"]), 255) - int(row["registers"])) <= 0.1 * int(row["registers"]), row


def test_result_cache_misses_rows_written_before_a_column_was_added(tmp_path):
    """A row cached by an older aot.py (fewer columns) is compiled again, not
    shown with the new columns' defaults; one with every column is reused."""
    from parallax.kernels.aot import Job, ResultCache, Row
    from parallax.kernels.aot.scenarios import Scenario

    scenario = Scenario("forward", 90, "bfloat16", 64)
    job = Job(scenario, 0, 0, True, "_parallax_fwd_kernel", "cfg", "key")
    row = Row("forward", "_parallax_fwd_kernel", 90, "bfloat16", 64, scenario.flags(), "cfg", True, 1024, 200, 0, True, 4,
              loop_mma="16 m64n64k16", loop_wgmma=True, barriers=2, dots=4)
    cache = ResultCache(str(tmp_path))
    cache.put(job, row)
    assert ResultCache(str(tmp_path)).get(job) == row
    older = {k: v for k, v in json.loads(cache.path.read_text())["row"].items() if k not in ("loop_mma", "barriers")}
    cache.path.write_text(json.dumps({"key": "key", "row": older}) + "\n")
    assert ResultCache(str(tmp_path)).get(job) is None
