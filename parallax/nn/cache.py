"""The KV cache one attention layer reads and appends to during decoding."""
from __future__ import annotations

import torch


class KVCache:
    """Contiguous cache [B, max_seqlen, HK, D] for keys and values, plus the
    int32 number of tokens cached per sequence. This is the layout that
    `parallax_attn_with_kvcache` (and its Triton kernel) reads.

    `leftpad`: None, or int32 [B] positions of left padding at the start of
    each sequence (its `cache_leftpad`); `parallax.hf` sets it for padded
    batches.
    """

    def __init__(self, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int, *,
                 dtype=torch.float32, device=None):
        for name, value, low in (("batch_size", batch_size, 0), ("max_seqlen", max_seqlen, 0),
                                 ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        shape = (batch_size, max_seqlen, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.leftpad: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.seqlens.zero_()
        self.leftpad = None
