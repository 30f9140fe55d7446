"""Property-based tests (hypothesis) of the torch path on CPU against the
float64 oracle: random shapes, dtypes, scales, windows, GQA groups, packed
sequences (`cu_seqlens`, empty ones included) and KV caches (ragged lengths,
appends, paged tables with garbage in unused slots and NaN past the cached
tokens). Derandomized with a fixed example budget, so CI sees the same cases
every run and they take seconds.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallax import parallax_attn, parallax_attn_with_kvcache, parallax_reference

from ..layouts import packed_lengths
from .oracle import parallax_f64

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float64)


# Absolute error allowed, relative to max(1, |oracle|): float32's rounding over
# these few-key sums stays near 1e-6. (Not a same-precision baseline through
# `parallax_reference`: it shares the torch path's mask code, so a mask bug in
# both would widen its own bound.)
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}


def assert_close_to(out, ref):
    assert out.dtype in RELATIVE_TOLERANCE and torch.isfinite(out).all()
    if ref.numel():
        err = (out.double() - ref).abs().max().item()
        bound = RELATIVE_TOLERANCE[out.dtype] * max(1.0, ref.abs().max().item())
        assert err <= bound, f"error {err:.3g} > {bound:.3g}"


def random_tensor(gen, shape, dtype, std=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


@st.composite
def attention_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    HK, G = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = draw(st.integers(1, 8))
    packed = draw(st.booleans())
    if packed:
        lengths, T = packed_lengths(draw, 5)
        B = 1
        S = T
    else:
        lengths = None
        B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    causal = draw(st.booleans())
    window = draw(st.none() | st.integers(1, S + 1))
    scale = draw(st.none() | st.floats(-2.0, 2.0, allow_nan=False))
    seed = draw(st.integers(0, 2**16))
    return dtype, B, T, S, HK * G, HK, D, lengths, causal, window, scale, seed


def packed_oracle(q, r, k, v, lengths, **kw):
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    pieces = [parallax_f64(q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b], **kw) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(pieces, dim=1)


@PROPERTY
@given(attention_case())
def test_parallax_attn_matches_the_float64_oracle(case):
    dtype, B, T, S, HQ, HK, D, lengths, causal, window, scale, seed = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (random_tensor(gen, s, dtype) for s in ((B, T, HQ, D), (B, S, HK, D), (B, S, HK, D)))
    r = random_tensor(gen, (B, T, HQ, D), dtype, std=D**-0.5)
    kw = dict(scale=scale, causal=causal, window_size=window)
    if lengths is None:
        out = parallax_attn(q, r, k, v, backend="torch", **kw)
        ref = parallax_f64(q, r, k, v, **kw)
    else:
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
        out = parallax_attn(q, r, k, v, cu_seqlens=cu, backend="torch", **kw)
        ref = packed_oracle(q, r, k, v, lengths, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to(out, ref)


@PROPERTY
@given(attention_case())
def test_parallax_attn_gradients_match_autograd_through_the_reference(case):
    _, B, T, S, HQ, HK, D, lengths, causal, window, scale, seed = case
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, T, HQ, D), (B, T, HQ, D), (B, S, HK, D), (B, S, HK, D))
    inputs = [random_tensor(gen, s, torch.float64, std=D**-0.5 if i == 1 else 1.0).requires_grad_()
              for i, s in enumerate(shapes)]
    kw = dict(scale=scale, causal=causal, window_size=window)
    grad_out = random_tensor(gen, shapes[0], torch.float64)
    if lengths is None:
        out = parallax_attn(*inputs, backend="torch", **kw)
        ref = parallax_reference(*inputs, **kw)
    else:
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
        out = parallax_attn(*inputs, cu_seqlens=cu, backend="torch", **kw)
        bounds = cu.tolist()
        ref = torch.cat([parallax_reference(*(x[:, a:b] for x in inputs), **kw)
                         for a, b in zip(bounds, bounds[1:])], dim=1)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(ref, inputs, grad_out)
    for name, g, e in zip("qrkv", grads, expected):
        assert torch.allclose(g, e, atol=1e-10, rtol=1e-9), name


@st.composite
def decode_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    HK, G, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    Tq = draw(st.integers(1, 3))
    append = draw(st.booleans())
    block = draw(st.none() | st.sampled_from([1, 2, 4]))
    capacity = draw(st.integers(Tq, 12))
    if block is not None:
        capacity = -(-capacity // block) * block
    low = 0 if append else 1
    lengths = draw(st.lists(st.integers(low, capacity - (Tq if append else 0)), min_size=1, max_size=3))
    window = draw(st.none() | st.integers(1, capacity + 1))
    scale = draw(st.none() | st.floats(-2.0, 2.0, allow_nan=False))
    return dtype, HK * G, HK, D, Tq, append, block, capacity, lengths, window, scale, draw(st.integers(0, 2**16))


def to_paged(cache, block, gen):
    """Blocks of each sequence at shuffled places of a larger pool whose spare blocks hold NaN."""
    B, capacity = cache.shape[:2]
    per_seq = capacity // block
    num_blocks = B * per_seq + 2
    order = torch.randperm(num_blocks, generator=gen)[: B * per_seq]
    pool = torch.full((num_blocks, block, *cache.shape[2:]), float("nan"), dtype=cache.dtype)
    pool[order] = cache.reshape(B * per_seq, block, *cache.shape[2:])
    return pool, order.view(B, per_seq).to(torch.int32)


@PROPERTY
@given(decode_case())
def test_kvcache_decoding_matches_the_float64_oracle(case):
    dtype, HQ, HK, D, Tq, append, block, capacity, lengths, window, scale, seed = case
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = random_tensor(gen, (B, Tq, HQ, D), dtype)
    r = random_tensor(gen, (B, Tq, HQ, D), dtype, std=D**-0.5)
    keys = random_tensor(gen, (B, capacity, HK, D), dtype)  # the whole sequences, appended tokens included
    values = random_tensor(gen, (B, capacity, HK, D), dtype)
    total = [L + (Tq if append else 0) for L in lengths]
    k_cache, v_cache = keys.clone(), values.clone()
    for b, L in enumerate(lengths):  # past the cached tokens: anything, here NaN
        k_cache[b, L:] = float("nan")
        v_cache[b, L:] = float("nan")
    new = {}
    if append:
        rows = torch.arange(B)[:, None]
        pos = torch.tensor(lengths)[:, None] + torch.arange(Tq)
        new = {"k": keys[rows, pos], "v": values[rows, pos]}
    table = None
    if block is not None:
        k_cache, table = to_paged(k_cache, block, torch.Generator().manual_seed(seed))
        v_cache, _ = to_paged(v_cache, block, torch.Generator().manual_seed(seed))
        used = torch.arange(table.shape[1])[None, :] < torch.tensor([-(-t // block) for t in total])[:, None]
        table = table.masked_fill(~used, -7)  # unused slots: any id
    before = (k_cache.clone(), v_cache.clone())
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                     block_table=table, window_size=window, scale=scale, backend="torch", **new)
    ref = torch.cat([parallax_f64(q[b:b + 1], r[b:b + 1], keys[b:b + 1, :t], values[b:b + 1, :t], scale=scale,
                                  window_size=window) for b, t in enumerate(total)])
    assert_close_to(out, ref)
    # The append wrote exactly the new tokens; every other byte of the cache is as it was.
    if block is None:
        written = torch.zeros(B, capacity, dtype=torch.bool)
        for b, L in enumerate(lengths):
            written[b, L:total[b]] = True
        for cache, source, old in ((k_cache, keys, before[0]), (v_cache, values, before[1])):
            assert torch.equal(cache[written], source[written])
            assert torch.equal(cache[~written].view(-1).view(torch.uint8), old[~written].view(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_that_see_no_key_are_zero(dtype):
    """An edge the strategies reach rarely: a window of 1 that excludes every key but the query's own."""
    q, r, k, v = (torch.ones(1, 3, 1, 2, dtype=dtype) for _ in range(4))
    out = parallax_attn(q, r, k[:, :1], v[:, :1], causal=True, backend="torch")  # end-aligned: only the last row sees
    assert torch.equal(out[0, :2], torch.zeros(2, 1, 2, dtype=dtype)) and out[0, 2].abs().sum() > 0
