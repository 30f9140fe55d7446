"""`parallax_attn_with_kvcache`: attention of new queries against a KV cache.

The cache follows FlashAttention's `flash_attn_with_kvcache` conventions:
contiguous [B, S_max, HK, D] or paged [num_blocks, block_size, HK, D] with an
int32 block_table [B, max_blocks]; `cache_seqlens` [B] counts the tokens
already cached. New keys/values, when given, are written in place at
`cache_seqlens` before attending. The sequence then holds
L = cache_seqlens + Tq keys (L = cache_seqlens when no k, v are given), and
query t sits at position L - Tq + t: end-aligned causal, as FlashAttention.
`cache_leftpad` [B] (FlashAttention's argument of that name) marks the first
positions of each sequence as left padding: keys there are never attended to.
The Triton kernel lives in `triton/decode.py`; the torch path here is exact
and serves CPU tensors and inputs the kernel does not take.
"""
from __future__ import annotations

import torch

from .backend import resolve_backend
from .torch_path.blockwise import SCORE_BLOCK_ELEMENTS, compute_dtype, parallax_weights
from .checks import check_same, check_scale, check_tensor, check_window, resolve_scale
from .reference import nonfinite_positions, poison_rows, visible_keys
from .window import spanning_window


def _check_lengths(name, x, B, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32 or x.shape != (B,):
        raise ValueError(f"{name} must be an int32 tensor of shape [{B}], got {x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the cache's device ({device}), got {x.device}")


def _validate(q, r, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, block_table, scale, window_size,
              check_values):
    layout = "[batch, seq, heads, head_dim]"
    check_tensor("q", q, 4, layout)
    check_tensor("r", r, 4, layout)
    if r.shape != q.shape:
        raise ValueError(f"r must have the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    check_same("q", q, "r", r)
    if block_table is not None:
        cache_layout = "[num_blocks, block_size, kv_heads, head_dim]"
    else:
        cache_layout = "[batch, max_seqlen, kv_heads, head_dim]"
    check_tensor("k_cache", k_cache, 4, cache_layout)
    check_tensor("v_cache", v_cache, 4, cache_layout)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    check_same("q", q, "k_cache", k_cache)
    check_same("q", q, "v_cache", v_cache)
    B, Tq, HQ, D = q.shape
    HK = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache must have the head_dim of q ({D}), got {k_cache.shape[3]}")
    if HK == 0 or HQ % HK != 0:
        raise ValueError(f"q heads ({HQ}) must be a multiple of k_cache heads ({HK}) for grouped-query attention")
    if Tq < 1:
        raise ValueError(f"q must hold at least one query per sequence, got seq length {Tq}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, 4, "[batch, seq, kv_heads, head_dim]")
            if x.shape != (B, Tq, HK, D):
                raise ValueError(f"{name} must have shape {(B, Tq, HK, D)} (q's batch and seq, the cache's heads), "
                                 f"got {tuple(x.shape)}")
            check_same("k_cache", k_cache, name, x)
    _check_lengths("cache_seqlens", cache_seqlens, B, k_cache.device)
    if cache_leftpad is not None:
        _check_lengths("cache_leftpad", cache_leftpad, B, k_cache.device)
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache must have q's batch size ({B}) in dim 0, got {k_cache.shape[0]}")
        capacity = k_cache.shape[1]
    else:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
        if block_table.dtype != torch.int32 or block_table.ndim != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be an int32 tensor of shape [{B}, max_blocks], "
                             f"got {block_table.dtype} {tuple(block_table.shape)}")
        if block_table.device != k_cache.device:
            raise ValueError(f"block_table must be on the cache's device ({k_cache.device}), got {block_table.device}")
        capacity = block_table.shape[1] * k_cache.shape[1]
    check_scale(scale)
    check_window(window_size)
    if check_values is not None and not isinstance(check_values, bool):
        raise TypeError(f"check_values must be None, True or False, got {check_values!r}")
    return capacity


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def decode_kernel_refuses(q) -> Exception | None:
    """Why the decode kernel cannot take q, or None if it can (for `resolve_backend`)."""
    if q.dtype not in TRITON_DTYPES:
        return TypeError(f"backend='triton' needs q of dtype float16, bfloat16 or float32, got {q.dtype}; "
                         "use backend='torch'")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return ValueError(f"backend='triton' needs q's head_dim in {TRITON_HEAD_DIMS}, got {q.shape[-1]}; "
                          "use backend='torch'")
    return None


def _reads_values(check_values, use_triton, cache_seqlens) -> bool:
    """Whether the host reads cache_seqlens and block_table before the call.

    Reading device memory waits for the device, so by default the Triton
    kernel on CUDA does not: it guards itself (see `triton/decode.py`: never
    outside the cache; a sequence with an invalid length gets NaN rows and no
    append). The torch path and CPU tensors (the interpreter) read them, which
    costs nothing there. Nothing is read while a CUDA graph is captured or
    torch.compile traces. check_values=True reads them always (a ValueError
    before anything is written), False never.
    """
    capturing = cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_values is not None:
        if check_values and (capturing or torch.compiler.is_compiling()):
            raise ValueError("check_values=True reads cache_seqlens on the host, which cannot happen while a "
                             "CUDA graph is captured or torch.compile traces; pass check_values=None")
        return check_values
    if capturing or torch.compiler.is_compiling():
        return False
    return not (use_triton and cache_seqlens.is_cuda)


def _check_values(cache_seqlens, cache_leftpad, block_table, new_tokens, capacity, num_blocks):
    lengths = cache_seqlens.tolist()
    if not lengths:  # batch 0
        return
    if min(lengths) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {min(lengths)}")
    if max(lengths) + new_tokens > capacity:
        raise ValueError(
            f"cache overflow: cache_seqlens + {new_tokens} new tokens reaches {max(lengths) + new_tokens}, "
            f"but the cache holds {capacity} positions per sequence"
        )
    if cache_leftpad is not None:
        for b, (pad, length) in enumerate(zip(cache_leftpad.tolist(), lengths)):
            if not 0 <= pad <= length + new_tokens:
                raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens + {new_tokens} new tokens]; "
                                 f"sequence {b} has {pad} for a length of {length + new_tokens}")
    if block_table is not None:
        # Only the blocks a sequence will read must be valid; unused slots may hold anything.
        bs = capacity // block_table.shape[1]
        used = (torch.tensor(lengths, device=block_table.device)[:, None] + new_tokens + bs - 1) // bs
        in_use = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < used
        bad = in_use & ((block_table < 0) | (block_table >= num_blocks))
        if bool(bad.any()):
            raise ValueError(f"block_table entries in use must lie in [0, {num_blocks}) (k_cache's num_blocks)")


def _logical_cache(cache, block_table, seqlens, leftpad):
    """[B, S, HK, D] copy of the cache in which positions at or past `seqlens`
    (and before `leftpad`) are 0: an unused tail (or unused paged slot, or
    padding) may hold anything, NaN included, and must not reach the output
    through a zero weight (0 * NaN = NaN)."""
    if block_table is not None:
        # Unused slots may hold any id; clamp so the gather stays in bounds (they are zeroed below).
        cache = cache[block_table.long().clamp(0, cache.shape[0] - 1)].flatten(1, 2)
    position = torch.arange(cache.shape[1], device=cache.device)
    filled = position < seqlens.long()[:, None]  # [B, S]
    if leftpad is not None:
        filled &= position >= leftpad.long()[:, None]
    return torch.where(filled[:, :, None, None], cache, torch.zeros((), dtype=cache.dtype, device=cache.device))


def _valid_sequences(cache_seqlens, block_table, new_tokens: int, capacity: int, num_blocks: int) -> torch.Tensor:
    """Bool [B], on the device: whether a sequence's length, and every block
    table entry it uses, is in range (what `_check_values` asks, without a
    host read: the torch path's contract under check_values=False is the
    kernel's, NaN rows and no append for the others)."""
    lengths = cache_seqlens.long()
    valid = (lengths >= 0) & (lengths + new_tokens <= capacity)
    if block_table is not None:
        bs = capacity // block_table.shape[1]
        used = (lengths.clamp(0, capacity)[:, None] + new_tokens + bs - 1) // bs
        in_use = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < used
        valid &= ~(in_use & ((block_table < 0) | (block_table >= num_blocks))).any(1)
    return valid


def _append(k_cache, v_cache, k, v, cache_seqlens, block_table, valid):
    """Write k, v at cache_seqlens in place, for the `valid` sequences only.

    The entries of the others write what the first valid entry writes, to
    its slot (with none valid, a slot's own value back): never outside the
    cache, and never racing a valid write."""
    B, Tq = k.shape[:2]
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    pos = (cache_seqlens.long()[:, None] + torch.arange(Tq, device=k.device)).clamp(0, capacity - 1)  # [B, Tq]
    if block_table is None:
        slots = (torch.arange(B, device=k.device)[:, None].expand(B, Tq), pos)
    else:
        bs = k_cache.shape[1]
        blocks = torch.gather(block_table.long(), 1, pos // bs).clamp(0, k_cache.shape[0] - 1)
        slots = (blocks, pos % bs)
    ok = valid[:, None].expand(B, Tq).flatten()
    first = ok.int().argmax()[None]  # [1]: a valid entry, if there is one (a 0-d index would be read on the host)
    targets = tuple(torch.where(ok, i.flatten(), i.flatten()[first]) for i in slots)
    for cache, new in ((k_cache, k), (v_cache, v)):
        fallback = torch.where(ok[first][:, None, None], new.flatten(0, 1)[first],
                               cache[tuple(i[first] for i in targets)])
        cache[targets] = torch.where(ok[:, None, None], new.flatten(0, 1), fallback)


def kvcache_attention_torch(q, r, k_cache, v_cache, seqlens, block_table, scale, window_size, leftpad=None,
                            valid=None):
    """Dense float32 attention of q, r against the cached keys in [leftpad, seqlens)
    of each sequence, in chunks of query rows so a long prefill through the
    cache keeps its score blocks near SCORE_BLOCK_ELEMENTS. Sequences not
    `valid` [B] (default: all) get NaN rows."""
    B, Tq, HQ, D = q.shape
    dtype = compute_dtype(q)
    K = _logical_cache(k_cache, block_table, seqlens, leftpad).to(dtype)
    V = _logical_cache(v_cache, block_table, seqlens, leftpad).to(dtype)
    bad = nonfinite_positions(K, V)  # [B, S, HK]; zeroed below, `poison_rows` marks the rows that see them
    K, V = K.nan_to_num_(0.0, 0.0, 0.0), V.nan_to_num_(0.0, 0.0, 0.0)
    HK = K.shape[2]
    qg = q.to(dtype).view(B, Tq, HK, HQ // HK, D)
    rg = r.to(dtype).view(B, Tq, HK, HQ // HK, D)
    key_pos = torch.arange(K.shape[1], device=q.device)
    rows = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * HQ * K.shape[1]))
    out = []
    for t0 in range(0, Tq, rows):
        t1 = min(Tq, t0 + rows)
        pos = seqlens.long()[:, None] - Tq + torch.arange(t0, t1, device=q.device)  # [B, rows]
        visible = visible_keys(pos[:, :, None], key_pos, causal=True, window_size=window_size)
        if leftpad is not None:
            visible &= key_pos >= leftpad.long()[:, None, None]
        p, s2, sbar = parallax_weights(qg[:, t0:t1], rg[:, t0:t1], K, visible[:, None, None], scale)
        w = p * (1.0 + sbar - s2)
        o = torch.einsum("bkgts,bskd->btkgd", w, V).reshape(B, t1 - t0, HQ, D)
        sees_bad = (visible[..., None] & bad[:, None]).any(2)
        if valid is not None:
            sees_bad |= ~valid[:, None, None]
        out.append(poison_rows(o, sees_bad))
    return torch.cat(out, dim=1).to(q.dtype)


def parallax_attn_with_kvcache(
    q, r, k_cache, v_cache, *, k=None, v=None, cache_seqlens, cache_leftpad=None, scale=None, window_size=None,
    block_table=None, backend=None, check_values=None,
):
    """Parallax attention of Tq >= 1 new queries against a KV cache.

    Args:
        q, r: [B, Tq, HQ, D].
        k_cache, v_cache: [B, S_max, HK, D], or [num_blocks, block_size, HK, D]
            with `block_table`.
        k, v: optional [B, Tq, HK, D], written in place into the cache at
            `cache_seqlens` before attending.
        cache_seqlens: int32 [B], tokens in the cache before this call.
        cache_leftpad: optional int32 [B], in [0, cache_seqlens + Tq]: the
            first cache_leftpad[b] positions of sequence b are left padding,
            never attended to (FlashAttention's `cache_leftpad`). A query at
            a padded position sees no key (its row is 0). Positions, and so
            the causal mask and the window, still count the padding slots.
        scale: multiplies q.k only; None means D ** -0.5.
        window_size: attend to the W most recent positions only (self included).
        block_table: int32 [B, max_blocks] for a paged cache.
        backend: None (the split-KV Triton kernel for CUDA tensors it supports:
            float16/bfloat16/float32, head_dim a power of two in [16, 256];
            torch otherwise), "torch" or "triton".
        check_values: whether the host reads cache_seqlens, cache_leftpad
            and block_table to reject out-of-range values with a ValueError
            before anything is written. None (default): yes for the torch
            path and CPU tensors, no for the Triton kernel on CUDA, which
            never synchronises with the device (it never touches memory
            outside the cache; a sequence with an out-of-range length or left
            offset gets NaN rows and no append). True: always (one device
            synchronisation); False: never.

    Returns [B, Tq, HQ, D] in q's dtype. cache_seqlens is not advanced: the
    caller owns it (add Tq after the call).
    """
    capacity = _validate(q, r, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, block_table, scale, window_size,
                         check_values)
    # Resolved before anything is written to the cache: an explicit "triton" the kernel cannot serve raises.
    use_triton = resolve_backend(backend, q, decode_kernel_refuses) == "triton"
    if _reads_values(check_values, use_triton, cache_seqlens):
        _check_values(cache_seqlens, cache_leftpad, block_table, q.shape[1] if k is not None else 0, capacity,
                      k_cache.shape[0])
    if q.numel() == 0:  # batch or head_dim 0: an empty output (and nothing to append)
        return q * 0
    scale = resolve_scale(scale, q.shape[-1])
    window_size = spanning_window(window_size, capacity + q.shape[1])
    if use_triton:
        from .triton.decode import triton_decode  # lazy: the torch path works without triton

        # The kernel appends k, v itself, in the same launch.
        return triton_decode(q, r, k_cache, v_cache, cache_seqlens, block_table, k=k, v=v, scale=scale,
                             window_size=window_size, cache_leftpad=cache_leftpad)
    new_tokens = 0 if k is None else q.shape[1]
    valid = _valid_sequences(cache_seqlens, block_table, new_tokens, capacity, k_cache.shape[0])
    if k is not None:
        _append(k_cache, v_cache, k, v, cache_seqlens, block_table, valid)
    return kvcache_attention_torch(q, r, k_cache, v_cache, cache_seqlens + new_tokens, block_table, scale,
                                   window_size, cache_leftpad, valid)
