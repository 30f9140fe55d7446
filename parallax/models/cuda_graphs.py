"""CUDA graphs of GPT.generate's decode steps (see `generation.py`)."""
from __future__ import annotations

import itertools
from typing import Callable

import torch

from .generation import DecodeState


class StepGraphs:
    """One CUDA graph per named step of a `DecodeState`, captured on first use.

    A step's first run executes it for real on a side stream, where kernels
    compile and workspaces are allocated (neither may happen during a
    capture), then captures it; capturing records the step without running
    it, so every call of `run` advances decoding by exactly one step. The
    graphs share one memory pool. Sampling with the caller's generator
    registers it with each graph, so every replay draws fresh numbers.
    """

    def __init__(self, state: DecodeState, key: tuple):
        self.state, self.key = state, key
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run(self, name: str, step: Callable[[], None]) -> None:
        graph = self.graphs.get(name)
        if graph is not None:
            graph.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _uncached_autocast():
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        generator = self.state.sampling.generator
        if generator is not None:
            graph.register_generator_state(generator)  # the default generator registers itself
        with torch.cuda.graph(graph, pool=self.pool), _uncached_autocast():
            step()
        self.pool = graph.pool()
        self.graphs[name] = graph


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _uncached_autocast():
    """Autocast as the caller has it, without its cache of cast weights: the
    cache is freed when the caller's autocast exits, and a graph would go on
    reading it (torch's rule for autocast in CUDA graphs)."""
    enabled, dtype = _autocast_state()
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


def graphed_decoding(model, batch_size: int, capacity: int, history: int, sampling) -> StepGraphs:
    """The model's graphed decoding for these settings: the one kept from
    the last call when it fits (its graphs replay at once, as transformers
    reuses a static cache), else a new one that replaces it. The graphs
    read the weights where they were captured, so moving or replacing a
    weight makes a new one; so does another autocast setting."""
    weights = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    key = (batch_size, capacity, sampling, weights, _autocast_state())
    kept = model._graphed_decoding
    if kept is not None and kept.key == key and kept.state.tokens.shape[1] >= history:
        return kept
    model._graphed_decoding = None  # free its caches and graphs before allocating new ones
    model._graphed_decoding = StepGraphs(DecodeState(model, batch_size, capacity, history, sampling), key)
    return model._graphed_decoding
