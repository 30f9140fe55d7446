"""GPT.generate's decoding loop: static caches, positions and sampling on the device.

Every length is known on the host in advance (prompts of equal length, one
token per step), so decoding reads nothing back from the device: the
per-layer caches hold the prompt plus the new tokens (at most block_size),
the tokens go into a preallocated history at a position kept on the device,
and sampling (temperature, top-k, the caller's generator) runs on the device.
A step is then a fixed sequence of device work, which `cuda_graphs.StepGraphs`
captures once and replays on CUDA; elsewhere the same steps run eagerly.

Past block_size the context is cropped to its last block_size tokens, which
are run through emptied caches at positions 0..block_size-1 every step:
exactly the context that recomputing the cropped sequence sees, and a step
of fixed shape too (`DecodeState.refill`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Sampling(NamedTuple):
    """How the next token is drawn from the last position's logits."""

    temperature: float  # 0: greedy
    top_k: int | None
    generator: torch.Generator | None


def sample_next(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next tokens [B, 1] (int64) from float32 logits [B, vocab], on the logits' device.

    A sample is argmax(p / E) with E ~ Exp(1) per token: the draw
    torch.multinomial makes for one sample (the same tokens from the same
    generator state), without its check of the probabilities on the host,
    which would wait for the device every token.
    """
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted to a maximum of 0 first, so a tiny temperature (1e-40) scales the
    # others to -inf instead of every logit to +-inf (and softmax to NaN); it
    # must not round to 0 in the logits' dtype either.
    temperature = max(float(sampling.temperature), torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=sampling.generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


class DecodeState:
    """The device state of decoding a batch: per-layer caches of `capacity`
    positions, the token history [B, history] and the position the next
    token goes to. `step` and `refill` only launch device work on these
    buffers, so they can be captured in a CUDA graph and replayed."""

    def __init__(self, model, batch_size: int, capacity: int, history: int, sampling: Sampling):
        device = model.lm_head.weight.device
        self.model, self.sampling = model, sampling
        self.caches = model.new_caches(batch_size, capacity)
        self.tokens = torch.zeros(batch_size, history, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.window = torch.arange(model.config.block_size, device=device)

    def start(self, prompt: torch.Tensor) -> int:
        """Prefill the caches with the prompt (its last block_size tokens) and
        sample the first new token; returns the number of cached tokens."""
        T = prompt.shape[1]
        self.tokens[:, :T] = prompt
        self.position.fill_(T)
        for cache in self.caches:
            cache.reset()
        context = prompt[:, -self.model.config.block_size:]
        self._emit(context)
        return context.shape[1]

    def step(self) -> None:
        """Run the newest token through the caches and sample the next."""
        self._emit(self.tokens.index_select(1, self.position - 1))

    def refill(self) -> None:
        """Run the last block_size tokens through emptied caches and sample the next."""
        for cache in self.caches:
            cache.reset()
        self._emit(self.tokens.index_select(1, self.position - len(self.window) + self.window))

    def _emit(self, context: torch.Tensor) -> None:
        h = self.model._hidden_states(context, self.caches)
        token = sample_next(self.model.lm_head(h[:, -1]).float(), self.sampling)
        self.tokens.index_copy_(1, self.position, token)
        self.position += 1


def decode(state: DecodeState, prompt: torch.Tensor, max_new_tokens: int,
           run: Callable[[str, Callable[[], None]], None]) -> None:
    """Write max_new_tokens >= 1 tokens after the prompt into state.tokens.

    `run(name, step)` runs one of the state's steps ("step" or "refill"):
    eagerly, or from a CUDA graph. The host counts the cached tokens itself.
    """
    block = state.model.config.block_size
    cached = state.start(prompt)
    for _ in range(max_new_tokens - 1):
        if cached < block:
            run("step", state.step)
            cached += 1
        else:
            run("refill", state.refill)


def run_eagerly(name: str, step: Callable[[], None]) -> None:
    step()


def cache_capacity(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """Positions a cache needs: every token but the last is fed back, and
    the context never exceeds block_size."""
    return min(prompt_len + max_new_tokens - 1, block_size)
