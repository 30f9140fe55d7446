"""`parallax_attn_with_kvcache`: the split-KV Triton kernel and the torch path
against a float64 recomputation, capacity far above the filled length, one
split (no merge) == many, paged == contiguous, in-place append, decode == the
last rows of `parallax_attn`, bad input that must leave the cache alone, and
the kernel's own guard when values are not checked on the host.

On CPU the kernel runs in the Triton interpreter, in float32 and float16 (its
bfloat16 `tl.dot` is wrong); bfloat16, long caches and CUDA graphs are `gpu`.
"""

import pytest
import torch

from parallax import ParallaxAttention, parallax_attn, parallax_attn_with_kvcache, parallax_reference
from parallax.kernels import decode as decode_module
from parallax.kernels.triton import decode as triton_decode_module
from parallax.kernels.triton.decode import triton_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = (torch.float32, torch.float16)


def make_inputs(B, S, HQ, HK, D, Tq, dtype, device=DEVICE, seed=0):
    """Random q, r, caches. r is scaled by D**-0.5 so s2 = r.k is O(1), as a
    trained probe's would be."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    q, r = rand(B, Tq, HQ, D), rand(B, Tq, HQ, D, std=D**-0.5)
    return q, r, rand(B, S, HK, D), rand(B, S, HK, D)


def float64_oracle(q, r, k_cache, v_cache, lengths, window_size=None, scale=None):
    """Each sequence's first `lengths[b]` cached keys through `parallax_reference` in float64."""
    rows = [
        parallax_reference(q[b : b + 1].double(), r[b : b + 1].double(), k_cache[b : b + 1, :L].double(),
                           v_cache[b : b + 1, :L].double(), scale=scale, window_size=window_size)
        for b, L in enumerate(lengths)
    ]
    return torch.cat(rows)


def assert_matches_oracle(out, baseline, ref):
    """FlashAttention's rule: the kernel's error is at most twice that of the
    torch path in the same dtype, plus a floor of two ulps at the output's scale."""
    assert out.dtype == baseline.dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    base_err = (baseline.double() - ref).abs().max().item()
    floor = 2 * torch.finfo(out.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * base_err + floor, f"kernel error {err:.3e} vs torch {base_err:.3e} (floor {floor:.1e})"


def to_paged(cache, block_size, gen):
    """A paged copy of a contiguous cache: blocks shuffled, plus unused ones."""
    B, S = cache.shape[:2]
    per_seq = S // block_size
    num_blocks = B * per_seq + 3
    order = torch.randperm(num_blocks, generator=gen)[: B * per_seq].to(cache.device)
    paged = torch.zeros(num_blocks, block_size, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    paged[order] = cache.reshape(B * per_seq, block_size, *cache.shape[2:])
    return paged, order.view(B, per_seq).to(torch.int32)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("HQ,HK", [(8, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("window_size", [None, 7])
def test_kernel_matches_float64(dtype, HQ, HK, Tq, window_size):
    S, D = 96, 64
    lengths = [0, 1, 90]  # empty, shorter than Tq (rows without keys), long
    q, r, k_cache, v_cache = make_inputs(len(lengths), S, HQ, HK, D, Tq, dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    kwargs = dict(cache_seqlens=seqlens, window_size=window_size)
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, backend="triton", **kwargs)
    baseline = parallax_attn_with_kvcache(q, r, k_cache, v_cache, backend="torch", **kwargs)
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_cache, v_cache, lengths, window_size))
    assert (out[0] == 0).all() and (out[1, : Tq - 1] == 0).all()  # no visible key: exactly 0


@pytest.mark.parametrize("num_splits,window_size", [(2, None), (3, 20), (20, None)])
def test_splits_merge_to_the_same_result(num_splits, window_size):
    """Partials of several splits (some past the sequence, some before the
    window) merge by their log-sum-exp; 20 splits take two merge blocks."""
    S, D, Tq = 160, 32, 3
    lengths = [2, 77, 157]
    q, r, k_cache, v_cache = make_inputs(len(lengths), S, 2, 1, D, Tq, torch.float32)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = triton_decode(q, r, k_cache, v_cache, seqlens, None, scale=0.3, window_size=window_size,
                        num_splits=num_splits)
    baseline = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens, scale=0.3,
                                          window_size=window_size, backend="torch")
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_cache, v_cache, lengths, window_size, scale=0.3))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_splits", [None, 4])
def test_capacity_far_above_the_filled_length(dtype, num_splits):
    """A cache of capacity 512 filled to at most 45: every split shares the
    filled keys (the ranges come from cache_seqlens on the device), slots past
    the length hold NaN that must never reach the output, and the new tokens
    come from k, v although their slots hold NaN too."""
    S, HQ, HK, D, Tq = 512, 4, 2, 32, 3
    lengths = [0, 1, 45]
    q, r, k_cache, v_cache = make_inputs(len(lengths), S, HQ, HK, D, Tq, dtype)
    _, _, k_new, v_new = make_inputs(len(lengths), Tq, HQ, HK, D, Tq, dtype, seed=1)
    for b, L in enumerate(lengths):
        k_cache[b, L:], v_cache[b, L:] = float("nan"), float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = triton_decode(q, r, k_cache, v_cache, seqlens, None, k=k_new, v=v_new, scale=D**-0.5, window_size=None,
                        num_splits=num_splits)
    grown = [L + Tq for L in lengths]
    assert all(torch.equal(k_cache[b, L : L + Tq], k_new[b]) for b, L in enumerate(lengths))
    k_filled, v_filled = k_cache.nan_to_num(), v_cache.nan_to_num()  # the dense torch path multiplies 0 * NaN
    baseline = parallax_attn_with_kvcache(q, r, k_filled, v_filled, cache_seqlens=seqlens + Tq, backend="torch")
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_cache, v_cache, grown))


class CountingLaunches:
    """Wraps a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("paged", [False, True])
def test_one_split_skips_the_merge_and_agrees_with_many(monkeypatch, paged):
    """With one split the split kernel writes the output and the merge is not
    launched; with many, the merge combines them to the same result."""
    gen = torch.Generator().manual_seed(4)
    S, HQ, HK, D, Tq = 96, 4, 1, 32, 2
    lengths = [3, 93]
    q, r, k_cache, v_cache = make_inputs(len(lengths), S, HQ, HK, D, Tq, torch.float32)
    _, _, k_new, v_new = make_inputs(len(lengths), Tq, HQ, HK, D, Tq, torch.float32, seed=1)
    table = None
    if paged:
        k_cache, table = to_paged(k_cache, 16, gen)
        v_cache, _ = to_paged(v_cache, 16, torch.Generator().manual_seed(4))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    merge = CountingLaunches(triton_decode_module._merge_kernel)
    monkeypatch.setattr(triton_decode_module, "_merge_kernel", merge)
    outs, caches = [], []
    for num_splits, launches in ((1, 0), (3, 1)):
        k_c, v_c = k_cache.clone(), v_cache.clone()
        outs.append(triton_decode(q, r, k_c, v_c, seqlens, table, k=k_new, v=v_new, scale=0.2, window_size=50,
                                  num_splits=num_splits))
        caches.append((k_c, v_c))
        assert merge.launches == launches
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for one, many in zip(*caches):
        assert torch.equal(one, many)


@pytest.mark.parametrize("D,HQ,HK,Tq", [(16, 2, 1, 1), (32, 4, 4, 3), (128, 4, 1, 1), (256, 8, 1, 3)])
def test_head_dims(D, HQ, HK, Tq):
    """Every supported head_dim; D=256 with 8 heads x 3 queries needs two row blocks."""
    lengths = [5, 40]
    q, r, k_cache, v_cache = make_inputs(len(lengths), 48, HQ, HK, D, Tq, torch.float16)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens, backend="triton")
    baseline = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens, backend="torch")
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_cache, v_cache, lengths))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_paged_equals_contiguous(backend, Tq):
    """Same tokens, same result: a shuffled block table, appends that cross
    block boundaries, and several splits."""
    gen = torch.Generator().manual_seed(1)
    S, D, block_size = 96, 64, 16
    q, r, k_cache, v_cache = make_inputs(3, S, 4, 2, D, Tq, torch.float16)
    _, _, k_new, v_new = make_inputs(3, Tq, 4, 2, D, Tq, torch.float16, seed=1)
    seqlens = torch.tensor([0, 15, S - Tq], dtype=torch.int32, device=DEVICE)
    k_paged, table = to_paged(k_cache, block_size, gen)
    v_paged = torch.zeros_like(k_paged)
    v_paged[table.flatten().long()] = v_cache.reshape(-1, block_size, *v_cache.shape[2:])

    common = dict(k=k_new, v=v_new, cache_seqlens=seqlens, window_size=40, backend=backend)
    contiguous = parallax_attn_with_kvcache(q, r, k_cache, v_cache, **common)
    paged = parallax_attn_with_kvcache(q, r, k_paged, v_paged, block_table=table, **common)
    torch.testing.assert_close(paged, contiguous, rtol=0, atol=0)
    torch.testing.assert_close(k_paged[table.long()].flatten(1, 2), k_cache, rtol=0, atol=0)
    torch.testing.assert_close(v_paged[table.long()].flatten(1, 2), v_cache, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,window_size,num_splits", [
    (torch.float32, None, None), (torch.float16, 1, 3), (torch.float32, 2, 2)])
def test_append_writes_in_place_then_attends(dtype, window_size, num_splits):
    """The kernel writes the new tokens while it attends: each lands in the
    cache (also when the window hides it from all but its own query, or it
    straddles two splits) and nothing else changes."""
    B, S, HQ, HK, D, Tq = 3, 160, 4, 2, 32, 3
    q, r, k_cache, v_cache = make_inputs(B, S, HQ, HK, D, Tq, dtype)
    _, _, k_new, v_new = make_inputs(B, Tq, HQ, HK, D, Tq, dtype, seed=1)
    lengths = [0, 63, S - Tq]  # the second sequence's tokens go to 63, 64, 65
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()

    if num_splits is None:
        out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                         window_size=window_size, backend="triton")
    else:
        out = triton_decode(q, r, k_cache, v_cache, seqlens, None, k=k_new, v=v_new, scale=D**-0.5,
                            window_size=window_size, num_splits=num_splits)

    assert seqlens.tolist() == lengths  # the caller advances it
    k_expected, v_expected = k_before.clone(), v_before.clone()
    for b, L in enumerate(lengths):
        k_expected[b, L : L + Tq] = k_new[b]
        v_expected[b, L : L + Tq] = v_new[b]
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0)
    grown = [L + Tq for L in lengths]
    baseline = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens + Tq,
                                          window_size=window_size, backend="torch")
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_cache, v_cache, grown, window_size))


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("window_size", [None, 6])
def test_decode_equals_last_rows_of_parallax_attn(Tq, window_size):
    """Cache the first T - Tq tokens, decode the last Tq with append: the rows
    of `parallax_attn` on the whole sequence."""
    B, T, HQ, HK, D = 2, 37, 4, 2, 64
    q, r, k, v = make_inputs(B, T, HQ, HK, D, T, torch.float32)
    full = parallax_attn(q, r, k, v, window_size=window_size, backend="torch")
    k_cache = torch.zeros(B, 48, HK, D, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, : T - Tq], v_cache[:, : T - Tq] = k[:, : T - Tq], v[:, : T - Tq]
    seqlens = torch.full((B,), T - Tq, dtype=torch.int32, device=DEVICE)
    out = parallax_attn_with_kvcache(q[:, -Tq:], r[:, -Tq:], k_cache, v_cache, k=k[:, -Tq:], v=v[:, -Tq:],
                                     cache_seqlens=seqlens, window_size=window_size, backend="triton")
    torch.testing.assert_close(out, full[:, -Tq:], rtol=1e-5, atol=1e-5)


def padded_oracle(q, r, k_cache, v_cache, lengths, leftpads, window_size=None):
    """Row b: its queries against cached positions [leftpad, length) only, in
    float64; queries at padded positions see no key (0)."""
    rows = []
    for b, (L, pad) in enumerate(zip(lengths, leftpads)):
        row = torch.zeros(q[b : b + 1].shape, dtype=torch.float64, device=q.device)
        real = min(q.shape[1], L - pad)  # the last `real` queries sit at unpadded positions
        if real > 0:
            row[:, q.shape[1] - real:] = float64_oracle(q[b : b + 1, -real:], r[b : b + 1, -real:],
                                                        k_cache[b : b + 1, pad:], v_cache[b : b + 1, pad:],
                                                        [L - pad], window_size)
        rows.append(row)
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("Tq,window_size,num_splits", [(1, None, None), (3, 7, None), (3, None, 3), (1, 5, 2)])
def test_leftpad_hides_the_padding(dtype, Tq, window_size, num_splits):
    """cache_leftpad: each sequence attends only to its positions from its
    left offset on, as if the padding were not there (the float64 oracle on
    the unpadded keys), in the kernel with one split or many and in the torch
    path. The padding holds NaN (in the cache and in the appended tokens) and
    never reaches the output; queries at padded positions give 0."""
    B, S, HQ, HK, D = 5, 64, 4, 2, 32
    q, r, k_cache, v_cache = make_inputs(B, S, HQ, HK, D, Tq, dtype)
    _, _, k_new, v_new = make_inputs(B, Tq, HQ, HK, D, Tq, dtype, seed=1)
    lengths = [40, 40, 9, 0, 20]
    leftpads = [0, 13, 9 + Tq - 1, Tq, 20 + Tq]  # none, some, all but the last query, all but ... , everything
    for b, (L, pad) in enumerate(zip(lengths, leftpads)):
        k_cache[b, :min(pad, L)] = float("nan")
        v_cache[b, :min(pad, L)] = float("nan")
        k_new[b, :max(0, pad - L)] = float("nan")
        v_new[b, :max(0, pad - L)] = float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(leftpads, dtype=torch.int32, device=DEVICE)

    def run(backend):
        kc, vc = k_cache.clone(), v_cache.clone()
        kwargs = dict(k=k_new, v=v_new, scale=D**-0.5, window_size=window_size, cache_leftpad=leftpad)
        if backend == "triton" and num_splits is not None:
            return triton_decode(q, r, kc, vc, seqlens, None, num_splits=num_splits, **kwargs), kc
        return parallax_attn_with_kvcache(q, r, kc, vc, cache_seqlens=seqlens, backend=backend, **kwargs), kc

    (out, k_after), (baseline, k_torch) = run("triton"), run("torch")
    assert torch.equal(k_after.nan_to_num(), k_torch.nan_to_num())  # both append the same, padding included
    grown = [L + Tq for L in lengths]
    full_k, full_v = k_cache.clone(), v_cache.clone()
    for b, L in enumerate(lengths):
        full_k[b, L:L + Tq], full_v[b, L:L + Tq] = k_new[b], v_new[b]
    ref = padded_oracle(q, r, full_k, full_v, grown, leftpads, window_size)
    assert_matches_oracle(out, baseline, ref)
    assert (out[2, :-1] == 0).all() and (out[4] == 0).all()


@pytest.mark.parametrize("Tq", [1, 4])
def test_leftpad_decode_equals_last_rows_of_parallax_attn(Tq):
    """Left-padded sequences decoded through the cache give the last rows of
    `parallax_attn` on each sequence without its padding."""
    B, T, HQ, HK, D, window = 3, 37, 4, 2, 16, 11
    q, r, k, v = make_inputs(B, T, HQ, HK, D, T, torch.float32)
    pads = [0, 5, 30]
    k_cache = torch.zeros(B, 40, HK, D, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, : T - Tq], v_cache[:, : T - Tq] = k[:, : T - Tq], v[:, : T - Tq]
    seqlens = torch.full((B,), T - Tq, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    for backend in ("triton", "torch"):
        out = parallax_attn_with_kvcache(q[:, -Tq:], r[:, -Tq:], k_cache.clone(), v_cache.clone(), k=k[:, -Tq:],
                                         v=v[:, -Tq:], cache_seqlens=seqlens, cache_leftpad=leftpad,
                                         window_size=window, backend=backend)
        for b, pad in enumerate(pads):
            alone = parallax_attn(q[b:b + 1, pad:], r[b:b + 1, pad:], k[b:b + 1, pad:], v[b:b + 1, pad:],
                                  window_size=window, backend="torch")
            torch.testing.assert_close(out[b:b + 1], alone[:, -Tq:], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_kernel_guards_itself_against_a_bad_leftpad():
    """Unchecked left offsets outside [0, length] give that sequence NaN rows
    and no append; the others are unaffected."""
    q, r, k_cache, v_cache = make_inputs(3, 16, 2, 1, 16, 2, torch.float32)
    _, _, k_new, v_new = make_inputs(3, 2, 2, 1, 16, 2, torch.float32, seed=1)
    seqlens = torch.tensor([5, 5, 5], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor([-1, 8, 2], dtype=torch.int32, device=DEVICE)
    before = k_cache.clone()
    out = triton_decode(q, r, k_cache, v_cache, seqlens, None, k=k_new, v=v_new, scale=0.25, window_size=None,
                        cache_leftpad=leftpad)
    assert out[:2].isnan().all() and not out[2].isnan().any()
    assert torch.equal(k_cache[:2], before[:2]) and torch.equal(k_cache[2, 5:7], k_new[2])


def test_torch_path_prefill_in_row_chunks(monkeypatch):
    """A long chunk through the cache (prefill) is computed a few query rows
    at a time by the torch path; the rows agree with one block for all."""
    q, r, k_cache, v_cache = make_inputs(2, 40, 4, 2, 16, 13, torch.float32)
    seqlens = torch.tensor([27, 20], dtype=torch.int32, device=DEVICE)
    kwargs = dict(cache_seqlens=seqlens, window_size=9, backend="torch")
    whole = parallax_attn_with_kvcache(q, r, k_cache, v_cache, **kwargs)
    monkeypatch.setattr(decode_module, "SCORE_BLOCK_ELEMENTS", 2 * 4 * 40 * 3)  # 3 rows per block
    torch.testing.assert_close(parallax_attn_with_kvcache(q, r, k_cache, v_cache, **kwargs), whole,
                               rtol=1e-6, atol=1e-6)


def test_layer_decoding_chunk_by_chunk_equals_one_call():
    """ParallaxAttention through its KVCache with the kernel: chunks of 1 and 3
    tokens give the rows of the layer run on the whole sequence."""
    torch.manual_seed(0)
    layer = ParallaxAttention(64, 4, num_kv_heads=2, window_size=9).to(DEVICE)
    torch.nn.init.normal_(layer.r_proj.weight, std=0.02)  # a non-zero probe
    x = torch.randn(2, 11, 64, device=DEVICE)
    layer.backend = "torch"
    full = layer(x)
    cache = layer.new_cache(2, 16)
    layer.backend = "triton"
    chunks = [layer(x[:, a:b], cache=cache) for a, b in [(0, 1), (1, 4), (4, 8), (8, 11)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.seqlens.tolist() == [11, 11]


def bad_input_cases():
    """(backend, name, change to a valid call, exception, message fragment)."""
    def seqlens(values):
        return lambda a: a.update(cache_seqlens=torch.tensor(values, dtype=torch.int32, device=DEVICE))

    def leftpad(values):
        return lambda a: a.update(cache_leftpad=torch.tensor(values, dtype=torch.int32, device=DEVICE))

    def table(fn):
        return lambda a: a.update(block_table=fn(a["block_table"]))

    def all_float64(a):
        a.update({n: a[n].double() for n in ("q", "r", "k", "v", "k_cache", "v_cache")})

    both = [
        ("overflow", seqlens([0, 62]), ValueError, "cache overflow"),
        ("negative length", seqlens([-1, 0]), ValueError, "cache_seqlens must be >= 0"),
        ("int64 lengths", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), ValueError, "cache_seqlens"),
        ("lengths per batch", seqlens([1, 2, 3]), ValueError, "cache_seqlens"),
        ("k without v", lambda a: a.update(v=None), ValueError, "k and v"),
        ("k dtype", lambda a: a.update(k=a["k"].double()), TypeError, "k must have the dtype"),
        ("v shape", lambda a: a.update(v=a["v"][:, :1]), ValueError, "v must have shape"),
        ("r shape", lambda a: a.update(r=a["r"][..., :32]), ValueError, "r must have the shape"),
        ("v_cache dtype", lambda a: a.update(v_cache=a["v_cache"].half()), TypeError, "v_cache must have the dtype"),
        ("head groups", lambda a: a.update(q=a["q"][:, :, :3], r=a["r"][:, :, :3]), ValueError, "multiple of k_cache"),
        ("block out of range", table(lambda t: t.masked_fill(t == t[1, 1], 99)), ValueError, "block_table entries"),
        ("negative block", table(lambda t: t.masked_fill(t == t[0, 0], -1)), ValueError, "block_table entries"),
        ("block_table dtype", table(lambda t: t.long()), ValueError, "block_table must be an int32"),
        ("window", lambda a: a.update(window_size=0), ValueError, "window_size"),
        ("backend name", lambda a: a.update(backend="cuda"), ValueError, "backend"),
        ("leftpad past the length", leftpad([0, 34]), ValueError, "cache_leftpad must lie in"),
        ("negative leftpad", leftpad([-1, 0]), ValueError, "cache_leftpad must lie in"),
        ("leftpad dtype", lambda a: a.update(cache_leftpad=torch.zeros(2, dtype=torch.int64)), ValueError,
         "cache_leftpad must be an int32"),
        ("leftpad type", lambda a: a.update(cache_leftpad=[0, 0]), TypeError, "cache_leftpad must be a torch.Tensor"),
    ]
    cases = [(backend, *case) for backend in ("triton", "torch") for case in both]
    return cases + [("triton", "float64", all_float64, TypeError, "backend='triton' needs q of dtype")]


@pytest.mark.parametrize("backend,name,change,error,match", bad_input_cases(),
                         ids=[f"{c[0]}-{c[1]}" for c in bad_input_cases()])
def test_bad_input_raises_and_leaves_cache_untouched(backend, name, change, error, match):
    """Every check runs before the append: a failed call writes nothing.
    The valid call appends 3 tokens to sequences of 0 and 30 in a paged cache."""
    gen = torch.Generator().manual_seed(2)
    q, r, k_cache, v_cache = make_inputs(2, 64, 4, 2, 64, 3, torch.float32)
    _, _, k_new, v_new = make_inputs(2, 3, 4, 2, 64, 3, torch.float32, seed=1)
    k_paged, table = to_paged(k_cache, 16, gen)
    v_paged, _ = to_paged(v_cache, 16, torch.Generator().manual_seed(2))
    args = dict(q=q, r=r, k_cache=k_paged, v_cache=v_paged, k=k_new, v=v_new,
                cache_seqlens=torch.tensor([0, 30], dtype=torch.int32, device=DEVICE), block_table=table,
                backend=backend)
    change(args)
    caches = [k_paged, v_paged, args["k_cache"], args["v_cache"]]
    snapshots = [c.clone() for c in caches]
    with pytest.raises(error, match=match):
        parallax_attn_with_kvcache(**args)
    for cache, snapshot in zip(caches, snapshots):
        assert torch.equal(cache, snapshot)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("num_splits", [1, 3, "torch path"])
@pytest.mark.parametrize("paged", [False, True])
def test_kernel_guards_itself_when_values_are_not_checked(paged, num_splits):
    """What the kernel does with values nobody checked (the default for CUDA
    tensors): a length below 0 or past the capacity, or a block table entry
    out of range where the sequence reads or appends, gives NaN rows and no
    append for that sequence, touching nothing outside the cache; valid
    sequences of the same call are exact and appended. The torch path does
    the same under check_values=False (it wrote at index -1)."""
    gen = torch.Generator().manual_seed(5)
    S, HQ, HK, D, Tq, block_size = 64, 2, 1, 16, 2, 16
    lengths = [-1, 63, 30, 48, 10]  # bad, overflow, (paged: block 0 bad, append block bad), valid
    bad = [0, 1, 2, 3] if paged else [0, 1]
    q, r, k_cache, v_cache = make_inputs(len(lengths), S, HQ, HK, D, Tq, torch.float32)
    _, _, k_new, v_new = make_inputs(len(lengths), Tq, HQ, HK, D, Tq, torch.float32, seed=1)
    table = None
    if paged:
        k_cache, table = to_paged(k_cache, block_size, gen)
        v_cache, _ = to_paged(v_cache, block_size, torch.Generator().manual_seed(5))
        table[2, 0], table[3, 3] = 99, -5
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    if num_splits == "torch path":
        out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                         block_table=table, scale=0.25, backend="torch", check_values=False)
    else:
        out = triton_decode(q, r, k_cache, v_cache, seqlens, table, k=k_new, v=v_new, scale=0.25, window_size=None,
                            num_splits=num_splits)

    good = [b for b in range(len(lengths)) if b not in bad]
    assert out[bad].isnan().all() and not out[good].isnan().any()
    k_expected, v_expected = k_before.clone(), v_before.clone()
    for b in good:
        for t in range(Tq):
            pos = lengths[b] + t
            slot = (b, pos) if table is None else (table[b, pos // block_size], pos % block_size)
            k_expected[slot], v_expected[slot] = k_new[b, t], v_new[b, t]
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    good_table = None if table is None else table[good]
    baseline = parallax_attn_with_kvcache(q[good], r[good], k_cache if paged else k_cache[good],
                                          v_cache if paged else v_cache[good], block_table=good_table,
                                          cache_seqlens=seqlens[good] + Tq, scale=0.25, backend="torch")
    torch.testing.assert_close(out[good], baseline, rtol=1e-5, atol=1e-6)


def test_check_values_policy():
    """CPU tensors are checked by default (free); check_values=False hands
    unchecked values to the kernel, which guards itself; True checks always."""
    q, r, k_cache, v_cache = make_inputs(1, 8, 2, 1, 16, 1, torch.float32)
    overflow = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    call = dict(k=k_cache[:, :1], v=v_cache[:, :1], cache_seqlens=overflow, backend="triton")
    with pytest.raises(ValueError, match="cache overflow"):
        parallax_attn_with_kvcache(q, r, k_cache, v_cache, **call)
    with pytest.raises(ValueError, match="cache overflow"):
        parallax_attn_with_kvcache(q, r, k_cache, v_cache, check_values=True, **call)
    before = k_cache.clone()
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, check_values=False, **call)
    assert out.isnan().all() and torch.equal(k_cache, before)
    with pytest.raises(TypeError, match="check_values must be None, True or False"):
        parallax_attn_with_kvcache(q, r, k_cache, v_cache, check_values="yes", **call)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("HQ,HK", [(8, 1), (4, 2), (8, 8)])
@pytest.mark.parametrize("Tq,window_size", [(1, None), (3, None), (3, 300)])
def test_gpu_long_caches(dtype, D, HQ, HK, Tq, window_size):
    lengths = [0, 1, 777, 2500]
    q, r, k_cache, v_cache = make_inputs(len(lengths), 2560, HQ, HK, D, Tq, dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens, window_size=window_size)
    baseline = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens, window_size=window_size,
                                          backend="torch")
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_cache, v_cache, lengths, window_size))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tq,num_splits", [(1, None), (5, None), (1, 6)])
def test_gpu_leftpad_long_caches(dtype, Tq, num_splits):
    """cache_leftpad on the GPU in bf16 / fp16 (the interpreter's bf16 dot is wrong), long caches, many splits."""
    lengths, pads = [1500, 1500, 40, 2000], [0, 700, 40 + Tq - 1, 1999]
    q, r, k_cache, v_cache = make_inputs(len(lengths), 2048, 8, 2, 128, Tq, dtype)
    _, _, k_new, v_new = make_inputs(len(lengths), Tq, 8, 2, 128, Tq, dtype, seed=1)
    for b, (L, pad) in enumerate(zip(lengths, pads)):
        k_cache[b, :min(pad, L)] = float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    kwargs = dict(k=k_new, v=v_new, scale=128**-0.5, window_size=None, cache_leftpad=leftpad)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = triton_decode(q, r, kc, vc, seqlens, None, num_splits=num_splits, **kwargs)
    baseline = parallax_attn_with_kvcache(q, r, k_cache.clone(), v_cache.clone(), cache_seqlens=seqlens,
                                          backend="torch", **kwargs)
    grown = [L + Tq for L in lengths]
    assert_matches_oracle(out, baseline, padded_oracle(q, r, kc, vc, grown, pads))


@pytest.mark.gpu
def test_gpu_paged_bf16_equals_contiguous():
    gen = torch.Generator().manual_seed(3)
    q, r, k_cache, v_cache = make_inputs(4, 4096, 32, 8, 128, 1, torch.bfloat16)
    seqlens = torch.tensor([0, 100, 2049, 4095], dtype=torch.int32, device=DEVICE)
    k_paged, table = to_paged(k_cache, 256, gen)
    v_paged = torch.zeros_like(k_paged)
    v_paged[table.flatten().long()] = v_cache.reshape(-1, 256, 8, 128)
    contiguous = parallax_attn_with_kvcache(q, r, k_cache, v_cache, cache_seqlens=seqlens)
    paged = parallax_attn_with_kvcache(q, r, k_paged, v_paged, cache_seqlens=seqlens, block_table=table)
    torch.testing.assert_close(paged, contiguous, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [4, 32])
def test_gpu_cuda_graph_replay_matches_eager(B):
    """Capture one decode step (append + attend), replay it with new tokens and
    advanced lengths, and compare with eager calls on a copy of the cache;
    B=32 runs one split (no merge), B=4 several."""
    S, HQ, HK, D = 1024, 32, 8, 128
    q, r, k_cache, v_cache = make_inputs(B, S, HQ, HK, D, 1, torch.bfloat16)
    _, _, k_new, v_new = make_inputs(B, 1, HQ, HK, D, 1, torch.bfloat16, seed=1)
    seqlens = torch.tensor([0, 5, 300, 1000] * (B // 4), dtype=torch.int32, device=DEVICE)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()

    def step():
        return parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for i in range(5):
        fresh = make_inputs(B, 1, HQ, HK, D, 1, torch.bfloat16, seed=10 + i)
        for static, new in zip((q, r, k_new, v_new), fresh):
            static.copy_(new)
        graph.replay()
        expected = parallax_attn_with_kvcache(q, r, eager_k, eager_v, k=k_new, v=v_new, cache_seqlens=seqlens)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(k_cache, eager_k, rtol=0, atol=0)
        seqlens += 1


@pytest.mark.gpu
@pytest.mark.parametrize("B,HQ,HK", [(2, 32, 8), (32, 8, 8)])
def test_gpu_capacity_32k_filled_4k(B, HQ, HK):
    """Serving shapes: capacity 32768, about 4096 filled (ragged), bf16; B=32
    with 8 KV heads fills the device with one split (no merge)."""
    S, D = 32768, 128
    lengths = [4096 - 37 * b for b in range(B)]
    q, r, _, _ = make_inputs(B, 1, HQ, HK, D, 1, torch.bfloat16)
    _, _, k_new, v_new = make_inputs(B, 1, HQ, HK, D, 1, torch.bfloat16, seed=1)
    gen = torch.Generator(device=DEVICE).manual_seed(7)  # GiBs of cache: drawn on the device
    k_cache, v_cache = (torch.randn(B, S, HK, D, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in "kv")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens)
    grown = [L + 1 for L in lengths]
    k_used, v_used = k_cache[:, : max(grown)], v_cache[:, : max(grown)]  # the reference need not see the rest
    baseline = parallax_attn_with_kvcache(q, r, k_used, v_used, cache_seqlens=seqlens + 1, backend="torch")
    assert_matches_oracle(out, baseline, float64_oracle(q, r, k_used, v_used, grown))


@pytest.mark.gpu
@pytest.mark.parametrize("B,HK,paged", [(1, 8, False), (32, 8, False), (4, 8, True)])
def test_gpu_decode_never_waits_for_the_device(B, HK, paged):
    """The default CUDA call reads no value on the host (sync debug mode turns
    any synchronisation into an error), with one split (B=32) and several."""
    gen = torch.Generator().manual_seed(6)
    q, r, k_cache, v_cache = make_inputs(B, 2048, 4 * HK, HK, 128, 1, torch.bfloat16)
    _, _, k_new, v_new = make_inputs(B, 1, 4 * HK, HK, 128, 1, torch.bfloat16, seed=1)
    table = None
    if paged:
        k_cache, table = to_paged(k_cache, 256, gen)
        v_cache, _ = to_paged(v_cache, 256, torch.Generator().manual_seed(6))
    seqlens = torch.full((B,), 1000, dtype=torch.int32, device=DEVICE)

    def step():
        return parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                          block_table=table)

    step()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_unchecked_bad_length_gives_nan_and_leaves_the_cache():
    """On CUDA an overflowing length is not read on the host: the kernel
    returns NaN rows for that sequence and appends nothing there; with
    check_values=True the call raises before writing."""
    q, r, k_cache, v_cache = make_inputs(2, 256, 8, 2, 128, 1, torch.bfloat16)
    _, _, k_new, v_new = make_inputs(2, 1, 8, 2, 128, 1, torch.bfloat16, seed=1)
    seqlens = torch.tensor([256, 10], dtype=torch.int32, device=DEVICE)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="cache overflow"):
        parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                   check_values=True)
    assert torch.equal(k_cache, before)
    out = parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens)
    assert out[0].isnan().all() and not out[1].isnan().any()
    assert torch.equal(k_cache[0], before[0]) and torch.equal(k_cache[1, 10], k_new[1, 0])
