"""A transformers `Cache` whose layers hold keys and values in parallax's decode layout.

transformers' own layers keep [B, heads, seq, head_dim] tensors that grow by
concatenation; `parallax_attn_with_kvcache` (and its Triton kernel) reads a
preallocated [B, capacity, kv_heads, head_dim] buffer and appends in place.
`ParallaxCacheLayer` wraps a `parallax.nn.KVCache` that doubles its capacity
when full, so decoding costs amortised O(1) copies per token.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..nn import KVCache

MIN_CAPACITY = 64


class ParallaxCacheLayer(CacheLayerMixin):
    """One attention layer's cache: a growing `KVCache` plus its length as a Python int (no host sync)."""

    is_compileable = False
    is_sliding = False  # every key is kept; the attention applies the window
    is_croppable = True

    def __init__(self, **kwargs):  # the base __init__ would assign the read-only `keys` / `values`
        self.kv: KVCache | None = None
        self.length = 0
        self.is_initialized = False

    @property
    def keys(self) -> torch.Tensor | None:
        """Cached keys in transformers' layout [B, kv_heads, seq, head_dim] (a view)."""
        return None if self.kv is None else self.kv.k[:, :self.length].transpose(1, 2)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv.v[:, :self.length].transpose(1, 2)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, HK, _, D = key_states.shape  # transformers' layout
        self.kv = KVCache(B, MIN_CAPACITY, HK, D, dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def reserve(self, new_tokens: int, like: torch.Tensor, num_kv_heads: int, head_dim: int) -> KVCache:
        """The KVCache the caller appends `new_tokens` tokens to (grown if needed); counts them as cached.

        like: the new keys' batch size, dtype and device come from this tensor's dim 0, dtype and device.
        """
        if self.kv is None:
            self.lazy_initialization(like.new_empty(like.shape[0], num_kv_heads, 0, head_dim), None)
        kv, needed = self.kv, self.length + new_tokens
        if kv.k.shape[0] != like.shape[0] or kv.k.dtype != like.dtype or kv.k.device != like.device:
            raise ValueError(f"the cache holds batch {kv.k.shape[0]} {kv.k.dtype} on {kv.k.device}; the new tokens "
                             f"are batch {like.shape[0]} {like.dtype} on {like.device}")
        if needed > kv.max_seqlen:
            grown = KVCache(kv.k.shape[0], max(needed, 2 * kv.max_seqlen), num_kv_heads, head_dim,
                            dtype=kv.k.dtype, device=kv.k.device)
            grown.k[:, :self.length] = kv.k[:, :self.length]
            grown.v[:, :self.length] = kv.v[:, :self.length]
            grown.seqlens.copy_(kv.seqlens)
            self.kv = kv = grown
        self.length = needed
        return kv

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a ParallaxCacheLayer is filled by Parallax attention (parallax_attn_with_kvcache), "
                        "not by Cache.update")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows without bound

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        removed = min(-tokens_to_remove, self.length)
        if removed and self.kv is not None:
            self.length -= removed
            self.kv.seqlens -= removed

    def _map_batch(self, fn) -> None:
        if self.kv is not None:
            self.kv.k, self.kv.v, self.kv.seqlens = fn(self.kv.k), fn(self.kv.v), fn(self.kv.seqlens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def offload(self):
        raise NotImplementedError("offloading a ParallaxCacheLayer is not supported")

    prefetch = offload


class ParallaxCache(Cache):
    """A Cache of `ParallaxCacheLayer`s, one per decoder layer, created as layers first use it."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=ParallaxCacheLayer)


# Empty layers of these types are swapped for a ParallaxCacheLayer on first use, so
# generate()'s default DynamicCache works; other layer types (static, quantized) are refused.
REPLACEABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def parallax_cache_layer(cache: Cache, layer_idx: int) -> ParallaxCacheLayer:
    """The ParallaxCacheLayer at `layer_idx` of `cache`, installed in place of an empty dynamic layer."""
    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(ParallaxCacheLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, ParallaxCacheLayer):
        return layer
    if type(layer) not in REPLACEABLE_LAYERS:
        raise TypeError(f"past_key_values layer {layer_idx} is a {type(layer).__name__}; Parallax attention caches "
                        "through parallax.hf.ParallaxCache (generate() sets one up by default)")
    if layer.get_seq_length() > 0:
        raise ValueError(f"past_key_values layer {layer_idx} already holds {layer.get_seq_length()} tokens cached by "
                         "another attention implementation; start from an empty cache")
    cache.layers[layer_idx] = ParallaxCacheLayer()
    return cache.layers[layer_idx]
