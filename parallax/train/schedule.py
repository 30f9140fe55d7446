"""Learning-rate schedules as multipliers of each group's base lr (for LambdaLR)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "wsd", "constant")


class LRSchedule:
    """Multiplier at step s (0-based) of a `total`-step run.

    cosine: linear warmup over `warmup` steps, then cosine from 1 to min_ratio.
    wsd: warmup, stable at 1, then linear decay to min_ratio over the last
        `cooldown` fraction of the steps (warmup-stable-decay).
    constant: warmup, then 1.
    A plain object (not a closure) so LambdaLR's state_dict round-trips it.
    """

    def __init__(self, kind: str, total: int, warmup: int = 0, min_ratio: float = 0.0, cooldown: float = 0.2):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        self.kind, self.total, self.warmup = kind, int(total), int(warmup)
        self.min_ratio, self.cooldown = float(min_ratio), float(cooldown)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (step - self.warmup) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        decay = max(1, round(self.cooldown * self.total))
        start = self.total - decay
        if step < start:
            return 1.0
        t = min(1.0, (step - start + 1) / decay)
        return 1.0 - (1.0 - self.min_ratio) * t


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup: int = 0,
                    min_ratio: float = 0.0, cooldown: float = 0.2) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = LRSchedule(kind, total, warmup, min_ratio, cooldown)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
