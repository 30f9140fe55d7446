"""The benchmarks' shared instruments: the timer, the baseline finder, the table writer."""
import math

import pytest
import torch

from benchmarks import timing
from benchmarks.baselines import find
from benchmarks.environment import OUT, markdown_table, save, table_path


class FakeClock:
    """perf_counter that advances only by `sleep`."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, ms):
        self.now += ms / 1e3


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_measure_warms_up_then_takes_turns_and_times_only_the_call(clock):
    calls = []

    def fn(name, ms):
        def call():
            calls.append(name)
            clock.sleep(ms)
        return call

    times = timing.measure({"a": fn("a", 5), "b": fn("b", 7)}, torch.device("cpu"), 3,
                           before_each=lambda: clock.sleep(100))
    assert calls == ["a"] * timing.WARMUP_CALLS + ["b"] * timing.WARMUP_CALLS + ["a", "b"] * 3
    assert times["a"].runs == [[pytest.approx(5.0)]] * 3
    assert times["b"].median == pytest.approx(7.0) and times["b"].best == pytest.approx(7.0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.measure({"a": fn("a", 1)}, torch.device("cpu"), 0)


def test_laps_split_a_run(clock):
    watch = timing.Stopwatch(torch.device("cpu"))
    durations = iter([(2, 3), (4, 5), (9, 1)])

    def run():
        first, second = next(durations, (1, 1))
        clock.sleep(first)
        watch.lap()
        clock.sleep(second)

    t = timing.measure({"run": run}, torch.device("cpu"), 3, watch=watch)["run"]
    assert t.runs == [pytest.approx([4.0, 5.0]), pytest.approx([9.0, 1.0]), pytest.approx([1.0, 1.0])]  # warm-up: (2, 3)
    assert t.lap_medians() == pytest.approx([4.0, 1.0])
    assert t.median == pytest.approx(9.0) and t.best == pytest.approx(2.0)


def test_find_takes_the_first_candidate_that_imports_and_says_why_others_did_not():
    found = find((("no_such_module_xyz", "f"), ("math", "no_such_name"), ("math", "sqrt"), ("math", "cos")))
    assert found.fn is math.sqrt and found.source == "math.sqrt"
    missing = find((("no_such_module_xyz", "f"), ("math", "no_such_name")))
    assert missing.fn is None and "no_such_module_xyz.f: ModuleNotFoundError" in missing.source
    assert "math.no_such_name: AttributeError" in missing.source


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, ""]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 |  |"]


@pytest.mark.gpu
def test_measure_cuda_graph_warms_up_captures_without_running_and_times_each_replay():
    device = torch.device("cuda")
    counter = torch.zeros((), device=device)
    before = []

    def step():
        counter.add_(1)

    t = timing.measure_cuda_graph(step, device, 5, before_each=lambda: before.append(counter.item()))
    # Eager warm-ups, then measure's warm-up replays and the timed ones; the capture adds nothing.
    assert counter.item() == timing.GRAPH_WARMUP_CALLS + timing.WARMUP_CALLS + 5
    assert before == [*range(timing.GRAPH_WARMUP_CALLS), timing.GRAPH_WARMUP_CALLS,
                      *range(timing.GRAPH_WARMUP_CALLS, counter.item())]
    assert len(t.runs) == 5 and all(ms > 0 for run in t.runs for ms in run)


def test_out_names_a_file_or_a_directory_and_defaults_to_the_ignored_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    assert table_path(OUT, "muon_cpu.md") == tmp_path.joinpath("out", "bench", "muon_cpu.md").relative_to(tmp_path)
    assert table_path("new/", "muon_cpu.md") == tmp_path.joinpath("new", "muon_cpu.md").relative_to(tmp_path)
    assert table_path("existing", "muon_cpu.md") == tmp_path.joinpath("existing", "muon_cpu.md").relative_to(tmp_path)
    assert table_path("mine.md", "muon_cpu.md").name == "mine.md"
    written = save(table_path(OUT, "t.md"), ["| a |", "|---|"])
    assert written.read_text() == "| a |\n|---|\n"
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.md")] == [written]  # nothing outside out/bench
