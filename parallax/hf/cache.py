"""transformers `Cache` layers that hold keys and values in parallax's decode layout.

transformers' own layers keep [B, heads, seq, head_dim] tensors that grow by
concatenation; `parallax_attn_with_kvcache` (and its Triton kernel) reads a
preallocated [B, capacity, kv_heads, head_dim] buffer and appends in place.
`ParallaxCacheLayer` wraps a `parallax.nn.KVCache` that doubles its capacity
when full, so decoding costs amortised O(1) copies per token.
`StaticParallaxCacheLayer` has a fixed capacity and keeps its length on the
device, so a compiled decoding step (transformers' compiled generation,
`cache_implementation="static"`) neither recompiles nor waits for the device.
Left padding lives in `KVCache.leftpad` (see `padding.py`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import (Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer, StaticCache,
                                      StaticLayer, StaticSlidingWindowLayer)

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

    @property
    def batch_size(self) -> int:
        return self.kv.k.shape[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, HK, _, D = key_states.shape  # transformers' layout
        self.kv = KVCache(B, self._capacity(0), HK, D, dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def _capacity(self, needed: int) -> int:
        """The capacity of a new buffer holding at least `needed` tokens."""
        return max(needed, MIN_CAPACITY, 2 * (self.kv.max_seqlen if self.kv is not None else 0))

    def reserve(self, new_tokens: int, like: torch.Tensor, num_kv_heads: int, head_dim: int,
                pads: torch.Tensor | None = None) -> KVCache:
        """The KVCache the caller appends `new_tokens` tokens to (grown if needed); counts them as cached.

        like: the new keys' batch size, dtype and device come from this tensor's dim 0, dtype and device.
        pads: int32 [B], padding tokens at the front of each row of the new tokens (`LeftPaddedChunk`); they
        extend the row's left padding, which only a row without cached tokens may have.
        """
        if self.kv is None:
            self.lazy_initialization(like.new_empty(like.shape[0], num_kv_heads, 0, head_dim), None)
        kv = self.kv
        if kv.k.shape[0] != like.shape[0] or kv.k.dtype != like.dtype or kv.k.device != like.device:
            raise ValueError(f"the cache holds batch {kv.k.shape[0]} {kv.k.dtype} on {kv.k.device}; the new tokens "
                             f"are batch {like.shape[0]} {like.dtype} on {like.device}")
        if pads is not None:
            _add_left_padding(kv, pads)
        self._make_room(new_tokens)
        return self.kv

    def _make_room(self, new_tokens: int) -> None:
        kv, needed = self.kv, self.length + new_tokens
        if needed > kv.max_seqlen:
            grown = KVCache(kv.k.shape[0], self._capacity(needed), kv.k.shape[2], kv.k.shape[3], dtype=kv.k.dtype,
                            device=kv.k.device)
            grown.k[:, :self.length] = kv.k[:, :self.length]
            grown.v[:, :self.length] = kv.v[:, :self.length]
            grown.seqlens.copy_(kv.seqlens)
            grown.leftpad = kv.leftpad
            self.kv = grown
        self.length = needed

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
            self._uncache(removed)

    def _uncache(self, removed) -> None:
        self.kv.seqlens -= removed
        if self.kv.leftpad is not None:  # padding past the new end is no longer part of the sequence
            torch.minimum(self.kv.leftpad, self.kv.seqlens, out=self.kv.leftpad)

    def _map_batch(self, fn) -> None:
        if self.kv is not None:
            kv = self.kv
            kv.k, kv.v, kv.seqlens = fn(kv.k), fn(kv.v), fn(kv.seqlens)
            if kv.leftpad is not None:
                kv.leftpad = fn(kv.leftpad)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def offload(self):
        raise NotImplementedError("offloading a ParallaxCacheLayer is not supported")

    prefetch = offload


class StaticParallaxCacheLayer(ParallaxCacheLayer):
    """A fixed-capacity `ParallaxCacheLayer` whose length is a device tensor, for compiled decoding.

    Appending past `max_cache_len` raises (checked by `parallax_attn_with_kvcache` where it reads lengths on the
    host; the Triton kernel on CUDA gives NaN rows instead).
    """

    is_compileable = True

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = torch.zeros((), dtype=torch.int64)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # left padding exists from the start, so compiled steps see the same tensors every time
        self.kv.leftpad = torch.zeros_like(self.kv.seqlens)
        self.length = self.length.to(key_states.device)
        if not torch.compiler.is_compiling():  # fixed addresses: compiled steps and CUDA graphs reuse them
            for t in (self.kv.k, self.kv.v, self.kv.seqlens, self.kv.leftpad, self.length):
                torch._dynamo.mark_static_address(t)

    def _capacity(self, needed: int) -> int:
        return self.max_cache_len

    def _make_room(self, new_tokens: int) -> None:
        self.length.add_(new_tokens)

    @property
    def keys(self) -> torch.Tensor | None:
        """The whole buffer in transformers' layout (positions past the length hold stale values)."""
        return None if self.kv is None else self.kv.k.transpose(1, 2)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv.v.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.seqlens.zero_()
            self.kv.leftpad.zero_()
        self.length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        removed = torch.clamp(self.length, max=-tokens_to_remove)
        self.length.sub_(removed)
        if self.kv is not None:
            self._uncache(removed.to(torch.int32))

    def _uncache(self, removed) -> None:
        self.kv.seqlens.sub_(removed)
        torch.minimum(self.kv.leftpad, self.kv.seqlens, out=self.kv.leftpad)

    def _map_batch(self, fn) -> None:
        if self.kv is not None:  # in place: the addresses stay fixed
            for t in (self.kv.k, self.kv.v, self.kv.seqlens, self.kv.leftpad):
                t.copy_(fn(t))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a StaticParallaxCacheLayer has a fixed batch size; expand the inputs instead")

    batch_select_indices = batch_repeat_interleave


def _add_left_padding(kv: KVCache, pads: torch.Tensor) -> None:
    """Extend each row's left padding by `pads` tokens, refusing padding after a row's cached tokens."""
    pads = pads.to(kv.seqlens.device)
    if kv.leftpad is None:
        kv.leftpad = torch.zeros_like(kv.seqlens)
    allowed = (pads == 0) | (kv.seqlens == kv.leftpad)
    message = ("padding after cached tokens: a row of a KV cache can only be padded before its first token "
               "(pad on the left, or start from an empty cache)")
    if torch.compiler.is_compiling():
        torch._assert_async(allowed.all(), message)
    elif not bool(allowed.all()):
        raise ValueError(message)
    kv.leftpad.add_(pads)


class ParallaxCache(Cache):
    """A Cache of `ParallaxCacheLayer`s, one per decoder layer, created as layers first use it."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=ParallaxCacheLayer)


class StaticParallaxCache(StaticCache):
    """A `StaticCache` of `StaticParallaxCacheLayer`s holding up to `max_cache_len` tokens each (what
    `generate(cache_implementation="static")` builds for Parallax models): every layer keeps all its keys,
    sliding ones included (the attention applies the window)."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        layers = config.get_text_config(decoder=True).num_hidden_layers
        Cache.__init__(self, layers=[StaticParallaxCacheLayer(max_cache_len) for _ in range(layers)])


def parallax_cache_layer(cache: Cache, layer_idx: int) -> ParallaxCacheLayer:
    """The Parallax layer at `layer_idx` of `cache`, installed in place of an empty transformers layer:
    dynamic layers become a `ParallaxCacheLayer`, static ones a `StaticParallaxCacheLayer` of their capacity."""
    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(ParallaxCacheLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, ParallaxCacheLayer):
        return layer
    name = type(layer).__name__
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        if layer.get_seq_length() > 0:
            raise ValueError(f"past_key_values layer {layer_idx} already holds {layer.get_seq_length()} tokens "
                             "cached by another attention implementation; start from an empty cache")
        replacement = ParallaxCacheLayer()
    elif type(layer) is StaticLayer or (type(layer) is StaticSlidingWindowLayer and layer.is_croppable):
        # (a sliding static layer is croppable exactly when its capacity is the whole cache's)
        if layer.is_initialized:
            raise ValueError(f"past_key_values layer {layer_idx} is a {name} already filled by another attention "
                             "implementation; start from an empty cache")
        replacement = StaticParallaxCacheLayer(layer.max_cache_len)
    else:
        raise TypeError(f"past_key_values layer {layer_idx} is a {name}; Parallax attention keeps every key in "
                        "parallax.hf.ParallaxCache (generate()'s default) or StaticParallaxCache "
                        "(cache_implementation='static')")
    cache.layers[layer_idx] = replacement
    return replacement

