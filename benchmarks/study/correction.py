"""Measure, per layer, the size of the Parallax correction relative to the
softmax output: ||Cov_p(s2, v)|| / ||mu|| = ||mu - o|| / ||mu||."""
from __future__ import annotations

import contextlib

import torch

import parallax.nn.attention as attention_layer
from parallax import softmax_attention


@contextlib.contextmanager
def record_correction(ratios: list[float]):
    """While active, every Parallax attention call appends its correction ratio."""
    original = attention_layer.parallax_attn

    def instrumented(q, r, k, v, **kwargs):
        o = original(q, r, k, v, **kwargs)
        mu = softmax_attention(q, k, v, **kwargs)
        ratios.append(((mu - o).float().norm() / mu.float().norm().clamp_min(1e-12)).item())
        return o

    attention_layer.parallax_attn = instrumented
    try:
        yield ratios
    finally:
        attention_layer.parallax_attn = original


@torch.no_grad()
def correction_ratios(model, idx: torch.Tensor) -> list[float]:
    """One ratio per layer (in order) for a batch of token ids; [] for softmax models."""
    ratios: list[float] = []
    with record_correction(ratios):
        model(idx)
    return ratios
