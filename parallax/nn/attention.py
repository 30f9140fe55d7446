"""ParallaxAttention: a drop-in multi-head attention layer, softmax or Parallax."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.attention import parallax_attn, softmax_attention
from ..kernels.backend import check_backend
from ..kernels.checks import check_cu_seqlens, check_deterministic, check_flag, check_scale, check_window
from ..kernels.decode import parallax_attn_with_kvcache
from .cache import KVCache
from .rope import RotaryEmbedding, apply_rope, packed_positions

KINDS = ("parallax", "softmax")


class ParallaxAttention(nn.Module):
    """Causal self-attention mapping [B, T, dim] to [B, T, dim].

    kind="parallax" adds one projection, the probe r = W_R x (shape of q), and
    computes softmax attention minus the probe covariance; kind="softmax" is the
    same layer without it. RoPE rotates q, k and r by the same angles;
    qk_norm applies a per-head RMSNorm to q, r and k. Pass a `KVCache` (see
    `new_cache`) to decode incrementally: chunk after chunk through the cache
    gives the outputs of one call on the whole sequence.

    scale multiplies q.k (None: head_dim ** -0.5); window_size, backend and
    deterministic are those of `parallax_attn`, which every call (training,
    prefill and decoding through the cache) receives. They are attributes,
    so they can be changed after construction (a new value is checked by the
    op on the next call).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 kind: str = "parallax", window_size: int | None = None, qk_norm: bool = False,
                 rope_theta: float = 10000.0, bias: bool = False, scale: float | None = None,
                 backend: str | None = None, deterministic: bool = True):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is None")
            head_dim = dim // num_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be an int >= 1, got {head_dim!r}")
        check_window(window_size)
        check_scale(scale)
        check_backend(backend)
        check_deterministic(deterministic)
        check_flag("qk_norm", qk_norm)
        check_flag("bias", bias)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kind, self.window_size, self.scale = kind, window_size, scale
        self.backend, self.deterministic = backend, deterministic
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.r_proj = nn.Linear(dim, num_heads * head_dim, bias=bias) if kind == "parallax" else None
        self.q_norm = self.k_norm = self.r_norm = None
        if qk_norm:
            self.q_norm = nn.RMSNorm(head_dim)
            self.k_norm = nn.RMSNorm(head_dim)
            if kind == "parallax":
                self.r_norm = nn.RMSNorm(head_dim)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.reset_probe()

    def reset_probe(self) -> None:
        """Start as exact softmax attention: the probe r is zero at step 0.

        s2 = <r, k> is not scaled by D ** -0.5, so a probe at the usual init
        would move the weights w = p (1 + sbar - s2) far from a distribution
        before training has said it wants a correction. A zero probe still
        receives gradient (dr = sum_j ds2_ij k_j is non-zero), so it grows only
        where the loss asks. With qk_norm the RMSNorm would amplify a zero
        probe's gradient by 1/sqrt(eps), so there W_R keeps its random init
        and the r-norm's gain starts at zero instead.
        """
        if self.r_proj is None:
            return
        if self.r_norm is not None:
            nn.init.zeros_(self.r_norm.weight)
        else:
            nn.init.zeros_(self.r_proj.weight)
        if self.r_proj.bias is not None:
            nn.init.zeros_(self.r_proj.bias)

    def new_cache(self, batch_size: int, max_seqlen: int, *, dtype=None, device=None) -> KVCache:
        """An empty KV cache for decoding `batch_size` sequences of up to `max_seqlen` positions each.

        `cache.k` and `cache.v` are [batch_size, max_seqlen, num_kv_heads, head_dim], in the dtype and on
        the device of the layer's weights unless given; `cache.seqlens` (int32 [batch_size], zeros here)
        counts the positions each sequence holds. Every `layer(x, cache=cache)` with x [batch_size, T, dim]
        appends x's T keys and values and advances `seqlens` by T (see `forward`); `cache.reset()` empties
        it for the next batch of sequences.
        """
        weight = self.k_proj.weight
        return KVCache(batch_size, max_seqlen, self.num_kv_heads, self.head_dim,
                       dtype=dtype or weight.dtype, device=device or weight.device)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, heads: int, norm: nn.Module | None) -> torch.Tensor:
        y = proj(x).unflatten(-1, (heads, self.head_dim))
        return y if norm is None else norm(y)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, cu_seqlens: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim].

        cache: a `KVCache` from `new_cache(B, ...)`. x's T tokens continue each sequence b at position
        `cache.seqlens[b]` (RoPE included, not counting the cache's left padding `cache.leftpad[b]`): their
        keys and values are written there, every query attends to all the positions the cache then holds
        (causally, within window_size), and `cache.seqlens` advances by T. So a prompt and then one token
        per call give the outputs of a single call on the whole sequence. cu_seqlens: packed sequences
        (batch 1), as `parallax_attn`'s; not with a cache.
        positions: integer [B, T] or [T], the positions of x's tokens for the layer's RoPE; None: after the
        cache's tokens, restarting per packed sequence, or 0 .. T - 1.
        rope: (cos, sin) broadcastable to [B, T, H, head_dim / 2] to rotate q, k and r with instead of the
        layer's own RoPE (a host model's scaled RoPE, see `parallax.hf`)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        dim = self.q_proj.in_features
        if x.ndim != 3 or x.shape[-1] != dim:
            raise ValueError(f"x must have shape [batch, seq, {dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cache and cu_seqlens cannot be used together")
        B, T, _ = x.shape
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences but x has batch {B}; make the cache with "
                             f"new_cache({B}, max_seqlen)")
        q = self._heads(self.q_proj, x, self.num_heads, self.q_norm)
        k = self._heads(self.k_proj, x, self.num_kv_heads, self.k_norm)
        v = self._heads(self.v_proj, x, self.num_kv_heads, None)
        r = None if self.r_proj is None else self._heads(self.r_proj, x, self.num_heads, self.r_norm)
        check_cu_seqlens(cu_seqlens, q, k)  # before the packed positions of RoPE read it

        if rope is not None:
            cos, sin = rope
        else:
            if positions is None:
                positions = torch.arange(T, device=x.device)
                if cache is not None:
                    first = cache.seqlens if cache.leftpad is None else cache.seqlens - cache.leftpad
                    positions = first.long()[:, None] + positions
                elif cu_seqlens is not None:
                    positions = packed_positions(cu_seqlens, T)
            cos, sin = self.rope(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if r is not None:
            r = apply_rope(r, cos, sin)

        common = dict(scale=self.scale, window_size=self.window_size, backend=self.backend)
        if cache is not None:
            # Softmax decode is Parallax decode with a zero probe (w = p); the
            # extra FLOPs are free in the bandwidth-bound decode.
            probe = torch.zeros_like(q) if r is None else r
            o = parallax_attn_with_kvcache(q, probe, cache.k, cache.v, k=k, v=v, cache_seqlens=cache.seqlens,
                                           cache_leftpad=cache.leftpad, **common)
            cache.seqlens += T
        elif r is None:
            o = softmax_attention(q, k, v, cu_seqlens=cu_seqlens, deterministic=self.deterministic, **common)
        else:
            o = parallax_attn(q, r, k, v, cu_seqlens=cu_seqlens, deterministic=self.deterministic, **common)
        return self.o_proj(o.flatten(-2))
