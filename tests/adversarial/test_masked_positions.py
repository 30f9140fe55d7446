"""Non-finite values at positions a row does not see never reach it, on every
path: the float32 oracle, the blockwise torch path (scores kept and
recomputed, packed sequences), softmax_attention (SDPA included), the Triton
kernels in the interpreter, and decode (torch and Triton, cached and new
tokens). NaN and +-inf are placed in keys and values at random positions,
and NaN in whole query / probe rows. Every row that sees none of them
returns what it returns without them (and, through the torch path and the
Triton backward, the same dq and dr); every row that sees one is not finite.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parallax import parallax_attn, parallax_attn_with_kvcache, parallax_reference, softmax_attention
from parallax.kernels.torch_path import blockwise
from parallax.kernels.reference import end_aligned_positions, visible_keys

from ..layouts import packed_lengths
from .budget import budget

POISONS = (float("nan"), float("inf"), -float("inf"))


@st.composite
def case(draw, head_dims=(1, 2, 5, 8), max_len=24, packed_ok=True, max_batch=2):
    HK, G = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    D = draw(st.sampled_from(head_dims))
    packed = packed_ok and draw(st.booleans())
    if packed:
        lengths, T = packed_lengths(draw, 9)
        B = 1
        S = T
    else:
        lengths = None
        B, T = draw(st.integers(1, max_batch)), draw(st.integers(1, max_len))
        S = draw(st.integers(T, max_len + 8))  # end-aligned: every causal row sees a key
    causal = draw(st.booleans())
    window = draw(st.none() | st.integers(1, S + 2))
    keys = st.tuples(st.integers(0, B - 1), st.integers(0, S - 1), st.integers(0, HK - 1), st.sampled_from("kv"),
                     st.integers(0, D - 1), st.sampled_from(POISONS))
    bad_keys = draw(st.lists(keys, min_size=1, max_size=3))
    rows = st.tuples(st.integers(0, B - 1), st.integers(0, T - 1), st.integers(0, HK * G - 1), st.sampled_from("qr"))
    bad_rows = draw(st.lists(rows, max_size=2))
    return dict(B=B, T=T, S=S, HK=HK, G=G, D=D, lengths=lengths, causal=causal, window=window, bad_keys=bad_keys,
                bad_rows=bad_rows, seed=draw(st.integers(0, 2**16)))


def inputs(c, dtype):
    gen = torch.Generator().manual_seed(c["seed"])
    B, T, S, HQ, HK, D = c["B"], c["T"], c["S"], c["HK"] * c["G"], c["HK"], c["D"]
    q, r = (torch.randn(B, T, HQ, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, S, HK, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, r * D**-0.5, k, v


def poisoned(c, q, r, k, v):
    q, r, k, v = (x.clone() for x in (q, r, k, v))
    for b, j, h, which, d, value in c["bad_keys"]:
        (k if which == "k" else v)[b, j, h, d] = value
    for b, i, h, which in c["bad_rows"]:
        (q if which == "q" else r)[b, i, h] = float("nan")
    return q, r, k, v


def mask(c) -> torch.Tensor:
    """Bool [T, S]: query i sees key j (per packed sequence when packed)."""
    def seen(T, S):
        return visible_keys(*end_aligned_positions(T, S), causal=c["causal"], window_size=c["window"])

    if c["lengths"] is None:
        return seen(c["T"], c["S"])
    out = torch.zeros(c["T"], c["S"], dtype=torch.bool)
    start = 0
    for n in c["lengths"]:
        out[start:start + n, start:start + n] = seen(n, n)
        start += n
    return out


def affected(c, probe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that see a poisoned position or hold a poisoned q / r, rows that see any key), bool [B, T, HQ]."""
    seen = mask(c)
    B, T, HQ, G = c["B"], c["T"], c["HK"] * c["G"], c["G"]
    hit = torch.zeros(B, T, HQ, dtype=torch.bool)
    for b, j, h, _, _, _ in c["bad_keys"]:
        hit[b, seen[:, j], h * G:(h + 1) * G] = True
    for b, i, h, which in c["bad_rows"]:
        if which == "q" or probe:
            hit[b, i, h] = True
    has_key = seen.any(-1)[None, :, None].expand(B, T, HQ)
    return hit & has_key, has_key


def check(c, out_clean, out_bad, probe=True, tolerance=1e-5):
    hit, _ = affected(c, probe)
    clean = ~hit
    assert torch.allclose(out_bad[clean], out_clean[clean], rtol=tolerance, atol=tolerance), \
        (out_bad[clean] - out_clean[clean]).abs().max()
    assert (~torch.isfinite(out_bad[hit])).any(-1).all(), "a row that sees a non-finite value came out finite"


def cu_seqlens(c):
    if c["lengths"] is None:
        return None
    return torch.tensor([0, *torch.tensor(c["lengths"]).cumsum(0).tolist()], dtype=torch.int32)


def torch_path(c, q, r, k, v):
    return parallax_attn(q, r, k, v, causal=c["causal"], window_size=c["window"], cu_seqlens=cu_seqlens(c),
                         backend="torch")


@budget(25)
@given(c=case(), dtype=st.sampled_from((torch.float32, torch.float64)), recompute=st.booleans())
def test_torch_path_forward_and_backward(c, dtype, recompute, monkeypatch_scores):
    monkeypatch_scores(0 if recompute else blockwise.KEPT_SCORE_BYTES)
    clean = inputs(c, dtype)
    bad = poisoned(c, *clean)
    hit, _ = affected(c, probe=True)
    grads = []
    for x in (clean, bad):
        x = [t.clone().requires_grad_() for t in x]
        out = torch_path(c, *x)
        torch.where(hit[..., None], 0.0, out).sum().backward()
        grads.append((out.detach(), x[0].grad, x[1].grad))
    check(c, grads[0][0], grads[1][0])
    for g_clean, g_bad in zip(grads[0][1:], grads[1][1:]):  # dq, dr of the rows that see nothing bad
        assert torch.allclose(g_bad[~hit], g_clean[~hit], rtol=1e-5, atol=1e-6)


@pytest.fixture
def monkeypatch_scores(monkeypatch):
    return lambda limit: monkeypatch.setattr(blockwise, "KEPT_SCORE_BYTES", limit)


@budget(30)
@given(c=case(packed_ok=False), dtype=st.sampled_from((torch.float32, torch.float64)))
def test_reference(c, dtype):
    clean = inputs(c, dtype)
    args = dict(causal=c["causal"], window_size=c["window"])
    check(c, parallax_reference(*clean, **args), parallax_reference(*poisoned(c, *clean), **args))


@budget(30)
@given(c=case(), sdpa_shapes=st.booleans())
def test_softmax_attention(c, sdpa_shapes):
    """With T == S and no window, the clean inputs take PyTorch SDPA."""
    if sdpa_shapes and c["lengths"] is None:
        c = {**c, "S": c["T"], "window": None, "bad_keys": [(b, j % c["T"], *rest) for b, j, *rest in c["bad_keys"]]}
    c = {**c, "bad_rows": [row for row in c["bad_rows"] if row[3] == "q"]}
    clean = inputs(c, torch.float32)
    q, _, k, v = clean
    args = dict(causal=c["causal"], window_size=c["window"], cu_seqlens=cu_seqlens(c))
    bad = poisoned(c, *clean)
    check(c, softmax_attention(q, k, v, **args), softmax_attention(bad[0], bad[2], bad[3], **args), probe=False)


@budget(4)
@given(c=case(head_dims=(16, 24), max_len=36, max_batch=1), deterministic=st.booleans())
def test_triton_kernels_in_the_interpreter(c, deterministic):
    clean = inputs(c, torch.float32)
    bad = poisoned(c, *clean)
    hit, _ = affected(c, probe=True)
    results = []
    for x in (clean, bad):
        x = [t.clone().requires_grad_() for t in x]
        out = parallax_attn(*x, causal=c["causal"], window_size=c["window"], cu_seqlens=cu_seqlens(c),
                            backend="triton", deterministic=deterministic)
        torch.where(hit[..., None], 0.0, out).sum().backward()
        results.append((out.detach(), x[0].grad, x[1].grad))
    check(c, results[0][0], results[1][0], tolerance=1e-5)
    for g_clean, g_bad in zip(results[0][1:], results[1][1:]):
        assert torch.allclose(g_bad[~hit], g_clean[~hit], rtol=1e-4, atol=1e-5)


@st.composite
def decode_case(draw):
    """Tq new tokens appended to caches of L tokens; keys are the L + Tq positions."""
    c = draw(case(head_dims=(16,), max_len=6, packed_ok=False, max_batch=2))
    L = draw(st.integers(0, 20))
    c.update(causal=True, S=L + c["T"], L=L, capacity=L + c["T"] + draw(st.integers(0, 5)))
    c["window"] = draw(st.none() | st.integers(1, c["S"] + 2))
    c["bad_keys"] = [(b, j % c["S"], *rest) for b, j, *rest in c["bad_keys"]]
    return c


@budget(10)
@given(c=decode_case(), backend=st.sampled_from(("torch", "triton")))
def test_decode(c, backend):
    """Positions in the cache (hidden by the window) and among the new tokens
    (hidden by the causal mask) may hold NaN / inf; past the sequence they
    always may (tests/kernels cover that)."""
    q, r, k, v = inputs(c, torch.float32)
    outs = []
    for q_, r_, k_, v_ in ((q, r, k, v), poisoned(c, q, r, k, v)):
        L, cap = c["L"], c["capacity"]
        k_cache = torch.full((c["B"], cap, c["HK"], c["D"]), float("nan"))
        v_cache = torch.full_like(k_cache, float("nan"))
        k_cache[:, :L], v_cache[:, :L] = k_[:, :L], v_[:, :L]
        outs.append(parallax_attn_with_kvcache(
            q_, r_, k_cache, v_cache, k=k_[:, L:].contiguous(), v=v_[:, L:].contiguous(),
            cache_seqlens=torch.full((c["B"],), L, dtype=torch.int32), window_size=c["window"], backend=backend))
    check(c, *outs)
