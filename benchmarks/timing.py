"""The one timer of the benchmarks.

`measure` times callables the same way in every benchmark: each first runs
WARMUP_CALLS times untimed (compilation, autotuning, first allocations),
then the callables take turns for `repeats` rounds, so that load from
other processes (a shared CPU) hits them alike. A run is timed by CUDA
events on a GPU (recorded on the current stream around the call; the device
is synchronized once the run is over) and by `time.perf_counter` on a CPU.
`before_each` (an L2-cache flush, a reset of state the call advances) runs
before every run, outside the timing. A callable may split its run into laps
with `Stopwatch.lap` (pass the stopwatch to `measure`). `measure_cuda_graph`
times the replays of a step captured in a CUDA graph the same way.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

WARMUP_CALLS = 1
GRAPH_WARMUP_CALLS = 3  # eager runs before a capture: compilation and autotuning may not happen inside one
L2_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 cache


class Stopwatch:
    """Milliseconds between marks on `device`'s clock."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._mark()]

    def lap(self) -> None:
        self.marks.append(self._mark())

    def stop(self) -> list[float]:
        """The laps' milliseconds (one lap unless `lap` was called)."""
        self.lap()
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


@dataclass(frozen=True)
class Timing:
    runs: list[list[float]]  # per run, its laps in ms

    @property
    def median(self) -> float:
        return statistics.median(sum(run) for run in self.runs)

    @property
    def best(self) -> float:
        return min(sum(run) for run in self.runs)

    def lap_medians(self) -> list[float]:
        return [statistics.median(laps) for laps in zip(*self.runs)]


def measure(fns: dict[object, Callable[[], object]], device: torch.device, repeats: int, *,
            before_each: Callable[[], object] | None = None, watch: Stopwatch | None = None) -> dict[str, Timing]:
    """{name: Timing of `repeats` runs} (see the module docstring)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    watch = watch or Stopwatch(device)
    for fn in fns.values():
        for _ in range(WARMUP_CALLS):
            if before_each is not None:
                before_each()
            fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            watch.start()
            fn()
            runs[name].append(watch.stop())
    return {name: Timing(values) for name, values in runs.items()}


def measure_cuda_graph(step: Callable[[], object], device: torch.device, replays: int, *,
                       before_each: Callable[[], object] | None = None) -> Timing:
    """Timing of `replays` replays of `step` captured in a CUDA graph. The step
    first runs GRAPH_WARMUP_CALLS times eagerly on a side stream (as capturing
    requires); `before_each` (a flush, a rewind of the state the step advances)
    runs before each of those runs, the capture and every replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_CALLS):
            if before_each is not None:
                before_each()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_each is not None:
        before_each()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return measure({"step": graph.replay}, device, replays, before_each=before_each)["step"]


def l2_flush(device: torch.device) -> Callable[[], object]:
    """A call that evicts the GPU's L2 cache (a real step follows other layers: its inputs are not cached)."""
    buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return buffer.zero_
