"""Parallax attention behind the self-attention interface of transformers' decoder layers.

transformers lets a model pick an attention *function* by name
(`AttentionInterface`, `ALL_ATTENTION_FUNCTIONS`), but that function receives
q, k, v after RoPE and after the cache update: it never sees the layer input
the probe r = W_R x is computed from, nor a cache it could hand to
`parallax_attn_with_kvcache`. So the converted model replaces each
self-attention *module* (the module interface every Llama-family decoder layer
calls: hidden states and (cos, sin) in, (output, weights) out). The name
"parallax" is still registered, with no attention function of its own and a
mask function that hands the layers the 2D padding mask as it is (never a
dense mask): padding and packed sequences are handled by rearranging tokens
(`padding.py`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface

from ..nn import ParallaxAttention
from .cache import parallax_cache_layer
from .padding import LeftPaddedChunk, PackedTokens, check_one_sequence_per_row, padding_mask_or_none

ATTENTION_NAME = "parallax"


def _no_attention_function(module, *args, **kwargs):
    raise TypeError(f"attn_implementation={ATTENTION_NAME!r} is computed by parallax.hf.ParallaxSelfAttention "
                    f"modules, not by an attention function; {type(module).__name__} cannot use it")


def parallax_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """The "parallax" mask: the 2D padding mask of the new tokens (the cache keeps what it needs of the
    past ones; a fixed shape while decoding, so compiled steps do not recompile), or None without padding."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        attention_mask = attention_mask[:, -q_length:]
    return padding_mask_or_none(attention_mask)


AttentionInterface.register(ATTENTION_NAME, _no_attention_function)
AttentionMaskInterface.register(ATTENTION_NAME, parallax_mask)


class ParallaxSelfAttention(ParallaxAttention):
    """A `ParallaxAttention` layer that a transformers decoder layer calls like its own self-attention.

    RoPE comes from the host model (its `position_embeddings` (cos, sin), so
    every RoPE variant and scaling it supports applies unchanged); keys and
    values go to a `ParallaxCacheLayer` of `past_key_values`, which decodes
    through `parallax_attn_with_kvcache` (the Triton kernel on CUDA). In
    training mode the cache is not used (transformers builds one by default)
    so gradients flow through `parallax_attn`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, layer_idx: int,
                 window_size: int | None, qk_norm: bool, bias: bool, scale: float | None = None,
                 backend: str | None = None, deterministic: bool = True):
        super().__init__(hidden_size, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, kind="parallax",
                         window_size=window_size, qk_norm=qk_norm, bias=bias, scale=scale, backend=backend,
                         deterministic=deterministic)
        self.rope = None  # the host model's rotary embedding rotates q, k and r (`position_embeddings`)
        self.layer_idx = layer_idx
        self.is_causal = True

    @classmethod
    def replacing(cls, attn: nn.Module, layer_idx: int, window_size: int | None, *, backend: str | None = None,
                  deterministic: bool = True) -> "ParallaxSelfAttention":
        """A Parallax layer that reuses the projections (and q/k norms) of a Llama-family attention module,
        and its q.k scale (`scaling`, head_dim ** -0.5 unless the family or config sets another).

        The probe starts at zero (`reset_probe`), so the output equals the original's.
        """
        q, k = attn.q_proj, attn.k_proj
        head_dim = int(attn.head_dim)
        if getattr(attn, "attention_dropout", 0.0):
            raise ValueError(f"layer {layer_idx} has attention_dropout={attn.attention_dropout}; Parallax attention "
                             "has no attention dropout")
        qk_norm = getattr(attn, "q_norm", None) is not None
        weight = q.weight
        with torch.device(weight.device):
            layer = cls(q.in_features, q.out_features // head_dim, k.out_features // head_dim, head_dim,
                        layer_idx=layer_idx, window_size=window_size, qk_norm=qk_norm, bias=q.bias is not None,
                        scale=float(getattr(attn, "scaling", head_dim ** -0.5)), backend=backend,
                        deterministic=deterministic)
        layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj = q, k, attn.v_proj, attn.o_proj
        if qk_norm:
            layer.q_norm, layer.k_norm = attn.q_norm, attn.k_norm
            layer.r_norm.eps = getattr(attn.q_norm, "variance_epsilon", layer.r_norm.eps)
            layer.r_norm.to(weight.dtype)
        layer.r_proj.to(weight.dtype)
        return layer.train(attn.training)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None,
                position_ids: torch.Tensor | None = None, **kwargs):
        """attention_mask: None or the 2D padding mask (1: token, 0: padding) over past and new tokens;
        position_ids: restarting positions mark packed sequences (without a cache)."""
        if position_embeddings is None:
            raise ValueError("position_embeddings (cos, sin) from the host model's rotary embedding are required")
        cos, sin = position_embeddings
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embedding covers {cos.shape[-1]} of head_dim {self.head_dim} dims; "
                             "Parallax attention needs full-width RoPE")
        half = self.head_dim // 2
        # transformers' rotate-half (cos, sin) repeat the same D/2 angles twice; the layer takes one copy.
        rope = (cos[..., :half].unsqueeze(-2), sin[..., :half].unsqueeze(-2))
        B, T = hidden_states.shape[:2]
        hf_cache = cache if past_key_values is None else past_key_values  # `cache` from transformers 5.24 on
        if hf_cache is not None and not self.training:
            chunk = LeftPaddedChunk.of(attention_mask, B, T)
            check_one_sequence_per_row(position_ids, chunk)
            kv = parallax_cache_layer(hf_cache, self.layer_idx).reserve(
                T, hidden_states, self.num_kv_heads, self.head_dim, None if chunk is None else chunk.pads)
            if chunk is None:
                return super().forward(hidden_states, cache=kv, rope=rope), None
            out = super().forward(chunk.pack(hidden_states), cache=kv, rope=tuple(map(chunk.pack, rope)))
            return chunk.unpack(out), None
        packed = PackedTokens.of(attention_mask, position_ids, B, T)
        if packed is None:
            return super().forward(hidden_states, rope=rope), None
        out = super().forward(packed.pack(hidden_states), cu_seqlens=packed.cu_seqlens,
                              rope=tuple(map(packed.pack, rope)))
        return packed.unpack(out), None
