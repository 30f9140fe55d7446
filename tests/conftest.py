"""Test-wide setup: kernels run in the Triton interpreter on CPU, `torch.empty`
returns NaN so reading uninitialised memory fails loudly, and `gpu` tests are
skipped where there is no CUDA device (a selection of only those, such as
`pytest -m gpu`, says so in one line and exits non-zero: nothing was tested)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede importing triton


def _nan_filled(factory):
    def wrapper(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))


@pytest.fixture
def traceable_empty(monkeypatch):
    """torch.empty and torch.empty_like as they are: torch.compile cannot trace the NaN-filling wrappers."""
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    # Dynamo maps torch's functions to its handlers once, by identity: a map made
    # while the wrappers were installed lacks these two, so make it again.
    from torch._dynamo import trace_rules

    trace_rules.clear_lru_cache()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, restoring the count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NO_CUDA = "the gpu tests need a CUDA device and this machine has none"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _only_gpu_tests(session) -> bool:
    items = getattr(session, "items", [])
    return not torch.cuda.is_available() and bool(items) and all("gpu" in item.keywords for item in items)


def pytest_collection_finish(session):
    if _only_gpu_tests(session):
        session.config.get_terminal_writer().line(f"{NO_CUDA}: all {len(session.items)} selected tests are skipped")


def pytest_sessionfinish(session, exitstatus):
    if _only_gpu_tests(session) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED  # pytest's status for "nothing ran"
