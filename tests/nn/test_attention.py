"""ParallaxAttention: shapes, init, RoPE/qk_norm placement, KV-cache decoding, varlen."""
import pytest
import torch

import parallax.nn.attention as layer_module
from parallax import ParallaxAttention
from parallax.nn.rope import RotaryEmbedding, apply_rope

DIM, HEADS, KV_HEADS = 32, 4, 2


def make_layer(kind="parallax", seed=0, probe_std=0.1, **kw):
    torch.manual_seed(seed)
    layer = ParallaxAttention(DIM, HEADS, num_kv_heads=KV_HEADS, kind=kind, **kw).double()
    if kind == "parallax":  # a trained-looking probe, so the correction is non-zero
        torch.nn.init.normal_(layer.r_proj.weight, std=probe_std)
        if layer.r_norm is not None:
            torch.nn.init.ones_(layer.r_norm.weight)
    return layer


def test_shapes_and_the_one_extra_projection():
    p, s = ParallaxAttention(DIM, HEADS), ParallaxAttention(DIM, HEADS, kind="softmax")
    x = torch.randn(2, 7, DIM)
    assert p(x).shape == s(x).shape == (2, 7, DIM)
    extra = sum(t.numel() for t in p.parameters()) - sum(t.numel() for t in s.parameters())
    assert extra == DIM * DIM == p.r_proj.weight.numel()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_starts_as_softmax_attention_and_probe_learns(qk_norm):
    torch.manual_seed(0)
    p = ParallaxAttention(DIM, HEADS, num_kv_heads=KV_HEADS, qk_norm=qk_norm).double()
    s = ParallaxAttention(DIM, HEADS, num_kv_heads=KV_HEADS, qk_norm=qk_norm, kind="softmax").double()
    s.load_state_dict(p.state_dict(), strict=False)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    assert torch.allclose(p(x), s(x), atol=1e-12)
    p(x).pow(2).sum().backward()
    probe_grad = p.r_norm.weight.grad if qk_norm else p.r_proj.weight.grad
    assert probe_grad.abs().max() > 1e-6


def test_rope_rotates_q_k_and_r_with_the_same_angles(monkeypatch):
    layer = make_layer()
    seen = {}

    def capture(q, r, k, v, **kw):
        seen.update(q=q, r=r, k=k)
        return q

    monkeypatch.setattr(layer_module, "parallax_attn", capture)
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    layer(x)
    cos, sin = RotaryEmbedding(DIM // HEADS)(torch.arange(6))
    heads = lambda proj: proj(x).unflatten(-1, (-1, DIM // HEADS))  # noqa: E731
    for name, proj in (("q", layer.q_proj), ("r", layer.r_proj), ("k", layer.k_proj)):
        assert torch.allclose(seen[name], apply_rope(heads(proj), cos, sin), atol=1e-12), name
    # Rotated scores depend on relative position only.
    a, b = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    rope = RotaryEmbedding(8)

    def score(i, j):
        (ci, si), (cj, sj) = rope(torch.tensor([i])), rope(torch.tensor([j]))
        return (apply_rope(a, ci, si) * apply_rope(b, cj, sj)).sum()

    assert torch.allclose(score(7, 3), score(14, 10)) and not torch.allclose(score(7, 3), score(7, 4))


def test_apply_rope_is_a_complex_rotation_of_the_half_pairs():
    # (x[i], x[i + D/2]) as the complex number x[i] + 1j x[i + D/2], times e^(1j angle)
    x = torch.randn(2, 5, 3, 8)
    cos, sin = RotaryEmbedding(8)(torch.arange(5))
    z = torch.complex(*x.chunk(2, dim=-1)) * torch.complex(cos, sin)
    assert torch.allclose(apply_rope(x, cos, sin), torch.cat((z.real, z.imag), dim=-1), atol=1e-6)


def test_qk_norm_normalises_q_r_and_k_per_head(monkeypatch):
    layer = make_layer(qk_norm=True)
    seen = {}
    monkeypatch.setattr(layer_module, "parallax_attn", lambda q, r, k, v, **kw: seen.update(q=q, r=r, k=k) or q)
    layer(torch.randn(2, 5, DIM, dtype=torch.float64))
    for name in "qrk":  # RoPE is a rotation, so the per-head RMS stays 1
        rms = seen[name].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4), name


CHUNKINGS = [[19], [1] * 19, [5, 1, 7, 6], [10, 9]]


@pytest.mark.parametrize("kind", ["parallax", "softmax"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("window", [None, 4])
def test_chunked_decoding_through_cache_equals_one_call(kind, qk_norm, window):
    layer = make_layer(kind, qk_norm=qk_norm, window_size=window)
    x = torch.randn(2, 19, DIM, dtype=torch.float64)
    full = layer(x)
    for chunks in CHUNKINGS:
        cache = layer.new_cache(2, 24)
        outs, start = [], 0
        for n in chunks:
            outs.append(layer(x[:, start:start + n], cache=cache))
            start += n
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-12), chunks
        assert cache.seqlens.tolist() == [19, 19]


@pytest.mark.parametrize("cache_batch,x_batch", [(2, 3), (3, 1), (1, 2)])
def test_a_cache_of_another_batch_is_refused_naming_the_cache(cache_batch, x_batch):
    layer = make_layer()
    cache = layer.new_cache(cache_batch, 8)
    before = cache.k.clone()
    with pytest.raises(ValueError, match=rf"cache holds {cache_batch} sequences but x has batch {x_batch}; make the "
                                         rf"cache with new_cache\({x_batch}, max_seqlen\)"):
        layer(torch.randn(x_batch, 3, DIM, dtype=torch.float64), cache=cache)
    assert cache.seqlens.tolist() == [0] * cache_batch and torch.equal(cache.k, before)


@pytest.mark.parametrize("kind", ["parallax", "softmax"])
@pytest.mark.parametrize("window", [None, 3])
def test_left_padded_cache_equals_each_sequence_alone(kind, window):
    """KVCache.leftpad hides each row's left padding (what parallax.hf sets for padded batches): a prefill
    of [padding, tokens] and decoding steps after it give each row's outputs on its tokens alone, RoPE
    positions not counting the padding; positions= given explicitly is the same rotation."""
    layer = make_layer(kind, window_size=window)
    lengths, steps = [6, 2, 4], 3
    width = max(lengths)
    x = torch.randn(3, width + steps, DIM, dtype=torch.float64)
    cache = layer.new_cache(3, 16)
    cache.leftpad = torch.tensor([width - n for n in lengths], dtype=torch.int32)
    outs = [layer(x[:, :width], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(width, width + steps)]
    padded = torch.cat(outs, 1)
    for row, n in enumerate(lengths):
        tokens = x[row:row + 1, width - n:]
        alone = layer(tokens)
        assert torch.allclose(padded[row:row + 1, width - n:], alone, atol=1e-12)
        assert torch.allclose(layer(tokens, positions=torch.arange(n + steps)), alone, atol=1e-12)
    assert cache.seqlens.tolist() == [width + steps] * 3


def test_packed_sequences_equal_separate_calls():
    layer = make_layer()
    a, b = torch.randn(1, 5, DIM, dtype=torch.float64), torch.randn(1, 8, DIM, dtype=torch.float64)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 13], dtype=torch.int32))
    assert torch.allclose(packed, torch.cat([layer(a), layer(b)], 1), atol=1e-12)


@pytest.mark.parametrize("kind", ["parallax", "softmax"])
@pytest.mark.parametrize("scale", [0.7, -0.2])
def test_scale_multiplies_q_k_in_every_path(kind, scale):
    """A layer with scale s computes what the default layer computes with W_Q
    times s / head_dim ** -0.5 (q enters only through q.k): in one call,
    packed, and decoding through the cache."""
    layer = make_layer(kind, scale=scale)
    default = make_layer(kind)
    with torch.no_grad():
        default.q_proj.weight.mul_(scale / (DIM // HEADS) ** -0.5)
    x = torch.randn(1, 9, DIM, dtype=torch.float64)
    expected = default(x)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    packed = layer(torch.cat([x, x], 1), cu_seqlens=torch.tensor([0, 9, 18], dtype=torch.int32))
    assert torch.allclose(packed, torch.cat([expected, expected], 1), atol=1e-12)
    cache = layer.new_cache(1, 9)
    assert torch.allclose(torch.cat([layer(x[:, :4], cache=cache), layer(x[:, 4:], cache=cache)], 1), expected,
                          atol=1e-12)
    assert not torch.allclose(make_layer(kind)(x), expected, atol=1e-3)  # the scale matters here


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        ParallaxAttention(DIM, HEADS, kind="linear")
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a positive multiple of num_kv_heads \(3\)"):
        ParallaxAttention(DIM, HEADS, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        ParallaxAttention(30, HEADS)
    with pytest.raises(ValueError, match="head_dim must be even"):
        ParallaxAttention(DIM, HEADS, head_dim=7)
    with pytest.raises(ValueError, match=rf"x must have shape \[batch, seq, {DIM}\], got \(4, {DIM}\)"):
        ParallaxAttention(DIM, HEADS)(torch.randn(4, DIM))


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=0), "head_dim must be an int >= 1"),
    (dict(head_dim=-2), "head_dim must be an int >= 1"),
    (dict(rope_theta=0.0), "rope_theta must be a finite number > 0"),
    (dict(rope_theta=-10000.0), "rope_theta must be a finite number > 0"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number > 0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0"),
    (dict(window_size=0), "window_size must be >= 1"),
])
def test_bad_layer_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallaxAttention(DIM, HEADS, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_on_cuda_matches_cpu(dtype):
    layer = make_layer().float()
    x = torch.randn(2, 64, DIM)
    expected = layer(x)
    got = layer.to("cuda", dtype)(x.to("cuda", dtype))
    assert got.dtype == dtype
    assert (got.float().cpu() - expected).abs().max() < 5e-2


def test_compiled_layer_with_triton_op_has_no_graph_breaks():
    """torch.compile(fullgraph=True) traces the whole layer around the custom
    op (the Triton interpreter runs it on CPU) and matches eager."""
    torch.manual_seed(0)
    layer = ParallaxAttention(DIM, HEADS, num_kv_heads=KV_HEADS, window_size=5, backend="triton")
    torch.nn.init.normal_(layer.r_proj.weight, std=0.1)
    x = torch.randn(1, 13, DIM)

    def loss(x):
        return layer(x).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_loss, compiled_loss = loss(x), compiled(x)
    eager_grads = torch.autograd.grad(eager_loss, list(layer.parameters()))
    compiled_grads = torch.autograd.grad(compiled_loss, list(layer.parameters()))
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    for c, e in zip(compiled_grads, eager_grads):
        assert torch.allclose(c, e, rtol=1e-4, atol=1e-6)
