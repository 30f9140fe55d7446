"""`bash benchmarks/gpu.sh --dry-run`: the GPU lease's plan, checked on CPU.

The script runs from a scratch copy of its folder (it writes its logs beside
itself), with this interpreter, and runs nothing but the import checks.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("decode", "train", "decode-official", "train-official", "quick", "1", "2")
# A command on the device machine may run 10 minutes; the single-purpose
# profiles must finish in 8, start to end. The steps' time limits, each with the grace
# `timeout --kill-after` gives, leave room for unpacking wheels and the
# import checks.
LIMIT_SECONDS = {part: 8 * 60 for part in ("decode", "train", "decode-official", "train-official")}
COMMAND_SECONDS = 10 * 60
SETUP_SECONDS = 30


def test_plans_fit_their_leases(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "gpu.sh", tmp_path / "benchmarks" / "gpu.sh")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu.sh"), "--dry-run", *PARTS],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout
    kill_after = int(re.search(r"--kill-after=(\d+)", (ROOT / "benchmarks" / "gpu.sh").read_text()).group(1))
    assert "import torch: ok" in output and "import triton: ok" in output
    plans = dict(re.findall(r"^=== part (\S+)\n(.*?)(?=^=== part |^== summary)", output, re.M | re.S))
    assert set(plans) == set(PARTS)
    for part, plan in plans.items():
        steps = re.findall(r"^== (\S+) \(limit (\d+)s\): (.*)$", plan, re.M)
        assert steps, part
        budget = LIMIT_SECONDS.get(part, COMMAND_SECONDS) - SETUP_SECONDS
        assert sum(int(limit) + kill_after for _, limit, _ in steps) <= budget, (part, steps)
    train = dict((name, command) for name, _, command in re.findall(
        r"^== (\S+) \(limit (\d+)s\): (.*)$", plans["train"], re.M))
    assert "-m gpu" in train["gpu-tests-train"] and "tests/kernels/test_triton_parallel.py" in train["gpu-tests-train"]
    assert "benchmarks.bench_train_kernels --quick" in train["bench_train_kernels"]
    assert "--baselines official" in plans["train-official"]
    assert "--prefix decode_official" in plans["decode-official"]
    assert "not run (dry run)" in output
    assert not list((tmp_path / "benchmarks").glob("results/*.md"))
