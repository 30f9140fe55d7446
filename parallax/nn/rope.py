"""Rotary position embedding (rotate-half form), computed in float32."""
from __future__ import annotations

import sys

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 for rotary embeddings, got {head_dim!r}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta <= sys.float_info.max:
            raise ValueError(f"rope_theta must be a finite number > 0, got {theta!r}")
        self.head_dim, self.theta = head_dim, float(theta)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute inv_freq: it is not saved, so a loader that builds the model on the meta device
        (transformers' from_pretrained) must refill it."""
        self.inv_freq.copy_(self._inv_freq())

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer [B, T] or [T] -> cos, sin broadcastable to [B, T, H, D/2]."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos()[..., None, :], angles.sin()[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x: [B, T, H, D] by the given angles (cos, sin: [..., D/2]).

    As x * [cos, cos] + roll(x, D/2) * [-sin, sin]: three passes over x where
    the halves form takes seven (a tenth of a CPU training step went to RoPE).
    """
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions that restart at 0 at each sequence start of a packed batch."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    return idx - cu_seqlens.long()[seq]
