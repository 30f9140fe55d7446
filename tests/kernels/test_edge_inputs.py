"""Edge inputs of the attention entry points: non-finite and non-positive
scales, an explicit Triton backend that cannot run, and decode caches whose
unused positions (past `cache_seqlens`, or unused paged slots) hold garbage."""
import math

import pytest
import torch

from parallax import parallax_attn, parallax_attn_with_kvcache, parallax_reference, softmax_attention

from .oracle import parallax_f64


def qkv(T=6, S=6, HQ=4, HK=2, D=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.randn(1, T, HQ, D, generator=gen, dtype=dtype), torch.randn(1, T, HQ, D, generator=gen, dtype=dtype)
    k, v = torch.randn(1, S, HK, D, generator=gen, dtype=dtype), torch.randn(1, S, HK, D, generator=gen, dtype=dtype)
    return q, r * D**-0.5, k, v


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_rejected_everywhere(scale):
    q, r, k, v = qkv()
    for call in (lambda: parallax_attn(q, r, k, v, scale=scale), lambda: softmax_attention(q, k, v, scale=scale),
                 lambda: parallax_reference(q, r, k, v, scale=scale)):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            call()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [0.0, -0.7, -3])
def test_zero_and_negative_scales_are_computed(scale, causal, dtype, atol):
    """scale 0 gives uniform weights over the visible keys; a negative scale
    prefers the least similar keys. SDPA's causal float32 CPU kernel returns
    NaN for both, so softmax_attention must not hand them to it."""
    q, r, k, v = qkv(T=6, S=6, dtype=dtype)  # T == S: where softmax_attention may use SDPA
    expected = parallax_f64(q, torch.zeros_like(q), k, v, scale=scale, causal=causal)
    assert (softmax_attention(q, k, v, scale=scale, causal=causal).double() - expected).abs().max() < atol
    expected = parallax_f64(q, r, k, v, scale=scale, causal=causal)
    assert (parallax_attn(q, r, k, v, scale=scale, causal=causal).double() - expected).abs().max() < atol
    if scale == 0.0 and not causal:  # uniform weights: the mean of v over each query's KV head
        mean = v.mean(dim=1, keepdim=True).repeat_interleave(2, dim=2).expand_as(q)
        assert (softmax_attention(q, k, v, scale=0.0, causal=False) - mean).abs().max() < atol


def test_explicit_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, r, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1\)"):
        parallax_attn(q, r, k, v, backend="triton")
    k_cache, v_cache = torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16)
    q, r = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=torch.ones(1, 1, 2, 16), v=torch.ones(1, 1, 2, 16),
                                   cache_seqlens=torch.zeros(1, dtype=torch.int32), backend="triton")
    assert not k_cache.any() and not v_cache.any()  # rejected before the append


def decode_case(lengths, S=12, HQ=4, HK=2, D=8, Tq=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q, r = torch.randn(B, Tq, HQ, D, generator=gen), torch.randn(B, Tq, HQ, D, generator=gen) * D**-0.5
    k_cache, v_cache = torch.randn(B, S, HK, D, generator=gen), torch.randn(B, S, HK, D, generator=gen)
    return q, r, k_cache, v_cache


def oracle(q, r, k_cache, v_cache, lengths, window_size=None):
    return torch.cat([parallax_f64(q[b:b + 1], r[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L],
                                   window_size=window_size) for b, L in enumerate(lengths)])


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("window_size", [None, 3])
def test_torch_decode_never_reads_past_cache_seqlens(garbage, window_size):
    lengths = [3, 7, 12]
    q, r, k_cache, v_cache = decode_case(lengths)
    expected = oracle(q, r, k_cache, v_cache, lengths, window_size)
    for b, L in enumerate(lengths):
        k_cache[b, L:] = garbage
        v_cache[b, L:] = garbage
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                     window_size=window_size, backend="torch")
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 1e-5


def test_paged_unused_slots_may_hold_anything():
    """Only the blocks a sequence reads must be valid ids; the rest of the
    table holds out-of-range and negative ids, and unused blocks hold NaN."""
    lengths, bs = [2, 9], 4
    q, r, k_cache, v_cache = decode_case(lengths, S=12)
    expected = oracle(q, r, k_cache, v_cache, lengths)
    num_blocks = 8
    k_paged = torch.full((num_blocks, bs, 2, 8), float("nan"))
    v_paged = torch.full((num_blocks, bs, 2, 8), float("nan"))
    table = torch.tensor([[5, -1, 10**6], [1, 6, 3]], dtype=torch.int32)
    for b, L in enumerate(lengths):
        for slot in range(-(-L // bs)):
            block = int(table[b, slot])
            n = min(bs, L - slot * bs)
            k_paged[block, :n] = k_cache[b, slot * bs:slot * bs + n]
            v_paged[block, :n] = v_cache[b, slot * bs:slot * bs + n]
    out = parallax_attn_with_kvcache(q, r, k_paged, v_paged, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                     block_table=table, backend="torch")
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("change,error,match", [
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(scale=math.inf), ValueError, "scale must be a finite number"),
    (dict(window_size=0), ValueError, "window_size"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(cache_seqlens=torch.tensor([11, 0], dtype=torch.int32)), ValueError, "cache overflow"),
])
def test_rejected_decode_call_leaves_cache_byte_for_byte_unchanged(change, error, match):
    q, r, k_cache, v_cache = decode_case([4, 0], S=12)
    k_cache[:, 6:] = float("nan")  # NaN payloads compare by bytes, not by ==
    before = [k_cache.clone().view(torch.int32), v_cache.clone().view(torch.int32)]
    args = {"k": torch.ones(2, 2, 2, 8), "v": torch.ones(2, 2, 2, 8),
            "cache_seqlens": torch.tensor([4, 0], dtype=torch.int32), "backend": "torch", **change}
    with pytest.raises(error, match=match):
        parallax_attn_with_kvcache(q, r, k_cache, v_cache, **args)
    assert torch.equal(k_cache.view(torch.int32), before[0]) and torch.equal(v_cache.view(torch.int32), before[1])
