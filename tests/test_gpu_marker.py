"""`pytest -m gpu` on a machine without CUDA: one line says why nothing ran,
and the exit status is not success (tests/conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = '''import pytest


@pytest.mark.gpu
def test_on_the_gpu():
    pass


def test_anywhere():
    pass
'''


def pytest_without_cuda(tmp_path, *args) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403  (the suite's hooks)\n")
    (tmp_path / "test_marked.py").write_text(TESTS)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "markers=gpu: CUDA",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_only_gpu_tests_without_cuda_say_so_in_one_line_and_fail(tmp_path):
    proc = pytest_without_cuda(tmp_path, "-m", "gpu")
    said = [line for line in proc.stdout.splitlines() if "CUDA" in line]
    assert said == ["the gpu tests need a CUDA device and this machine has none: all 1 selected tests are skipped"], \
        proc.stdout
    assert proc.returncode == 5, proc.stdout  # pytest's "no tests ran"


def test_a_mixed_selection_runs_and_skips_quietly(tmp_path):
    proc = pytest_without_cuda(tmp_path)
    assert proc.returncode == 0 and "1 passed, 1 skipped" in proc.stdout, proc.stdout
    assert "need a CUDA device and" not in proc.stdout
