"""The fused Triton training kernels (`backend="triton"`) against float64.

On CPU they run in the Triton interpreter (see conftest.py), so shapes stay
small and odd: partial tiles, windows that are not multiples of the 16-row
interpreter tile, GQA, rows that see no key, packed sequences. Tolerance is
FlashAttention's rule (`oracle.assert_within_rule`): the kernel's error is at
most twice that of the same-precision PyTorch computation, plus a small floor.
bfloat16 needs a GPU: the interpreter's bf16 tl.dot is wrong.
"""
import pytest
import torch
import triton
import triton.language as tl

from parallax.kernels import parallax_attn, parallax_reference, softmax_attention
from parallax.kernels.triton.op import attn_bwd, attn_fwd
from parallax.kernels.triton.common import heavy_first

from .oracle import assert_within_rule, max_err

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dense_parallax(q, r, k, v, scale, causal, window_size):
    """Dense Parallax computed in the inputs' own dtype (the same-precision
    PyTorch computation of the tolerance rule)."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(T, device=q.device)[:, None] + S - T
    j = torch.arange(S, device=q.device)[None, :]
    keep = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= i
    if window_size is not None:
        keep &= j > i - window_size
    has_key = keep.any(-1, keepdim=True)
    s1 = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s1 = s1.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s1, dim=-1).masked_fill(~keep, 0.0)
    s2 = torch.einsum("bthd,bshd->bhts", r, k).masked_fill(~keep, 0.0)
    sbar = (p * s2).sum(-1, keepdim=True)
    return torch.einsum("bhts,bshd->bthd", p * (1 + sbar - s2), v)


def _per_sequence(fn, q, r, k, v, cu_seqlens, **kwargs):
    if cu_seqlens is None:
        return fn(q, r, k, v, **kwargs)
    bounds = cu_seqlens.tolist()
    return torch.cat([fn(q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b], **kwargs) for a, b in zip(bounds, bounds[1:])], 1)


def _output_and_grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def _inputs(B, T, S, HQ, HK, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, r, do = (torch.randn(B, T, HQ, D, generator=gen) for _ in range(3))
    k, v = (torch.randn(B, S, HK, D, generator=gen) for _ in range(2))
    return [x.to(DEVICE, dtype) for x in (q, r, k, v)], do.to(DEVICE, dtype)


def _check_against_float64(B, T, S, HQ, HK, D, causal, window_size, cu_seqlens, dtype, deterministic=False):
    (q, r, k, v), grad_out = _inputs(B, T, S, HQ, HK, D, dtype)
    scale = D**-0.5
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=DEVICE)
    mask = dict(causal=causal, window_size=window_size)

    def kernel(*x):
        return parallax_attn(*x, scale=scale, cu_seqlens=cu, backend="triton", deterministic=deterministic, **mask)

    def exact(*x):
        return _per_sequence(parallax_reference, *x, cu, scale=scale, **mask)

    def same_precision(*x):
        if dtype == torch.float32:
            return parallax_attn(*x, scale=scale, cu_seqlens=cu, backend="torch", **mask)
        return _per_sequence(_dense_parallax, *x, cu, scale=scale, **mask)

    got = _output_and_grads(kernel, (q, r, k, v), grad_out)
    ref = _output_and_grads(exact, [x.double() for x in (q, r, k, v)], grad_out)
    torch_same = _output_and_grads(same_precision, (q, r, k, v), grad_out)
    for name, g, t, e in zip(("o", "dq", "dr", "dk", "dv"), got, torch_same, ref):
        assert g.dtype == dtype and g.shape == e.shape
        assert_within_rule(name, max_err(g, e), max_err(t, e), FLOOR[dtype])


# (B, T, S, HQ, HK, D, causal, window, cu_seqlens)
CASES = {
    "causal_gqa4:2_d16": (2, 37, 37, 4, 2, 16, True, None, None),
    "causal_gqa4:1_d24_window5": (1, 64, 64, 4, 1, 24, True, 5, None),
    "causal_gqa4:2_d24_window17": (1, 37, 37, 4, 2, 24, True, 17, None),
    "noncausal_gqa4:1_d16_T<S": (1, 37, 64, 4, 1, 16, False, None, None),
    "noncausal_gqa4:2_d16_window17": (1, 37, 37, 4, 2, 16, False, 17, None),
    "causal_d16_T<S": (1, 37, 64, 2, 2, 16, True, None, None),
    "causal_d24_T>S_empty_rows_window5": (1, 64, 37, 2, 1, 24, True, 5, None),
    # Windows one short of / one past two tiles put a tile edge on the unmasked-run boundary.
    "causal_gqa4:2_d16_window31": (1, 64, 64, 4, 2, 16, True, 31, None),
    "noncausal_gqa4:1_d16_window33": (1, 64, 64, 4, 1, 16, False, 33, None),
    "varlen3_causal_gqa4:2_d16": (1, 64, 64, 4, 2, 16, True, None, (0, 11, 40, 64)),
    "varlen3_causal_gqa4:1_d24_window17": (1, 64, 64, 4, 1, 24, True, 17, (0, 27, 30, 64)),
}


# float16 on a subset that still spans every feature, to keep the interpreter's time in budget.
FLOAT16_CASES = [
    "causal_gqa4:2_d16", "causal_gqa4:1_d24_window5", "noncausal_gqa4:2_d16_window17",
    "causal_d24_T>S_empty_rows_window5", "varlen3_causal_gqa4:1_d24_window17",
]


# The three-launch deterministic backward on cases that still span GQA,
# windows, T != S, empty rows and varlen.
DETERMINISTIC_CASES = [
    "causal_gqa4:2_d16", "causal_gqa4:1_d24_window5", "noncausal_gqa4:1_d16_T<S",
    "causal_d24_T>S_empty_rows_window5", "varlen3_causal_gqa4:1_d24_window17",
]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_float32_matches_float64(case):
    _check_against_float64(*CASES[case], dtype=torch.float32)


@pytest.mark.parametrize("case", FLOAT16_CASES, ids=FLOAT16_CASES)
def test_float16_matches_float64(case):
    _check_against_float64(*CASES[case], dtype=torch.float16)


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=DETERMINISTIC_CASES)
def test_deterministic_float32_matches_float64(case):
    _check_against_float64(*CASES[case], dtype=torch.float32, deterministic=True)


@pytest.mark.parametrize("case", ["causal_gqa4:2_d24_window17", "varlen3_causal_gqa4:2_d16"])
def test_deterministic_float16_matches_float64(case):
    _check_against_float64(*CASES[case], dtype=torch.float16, deterministic=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
@pytest.mark.parametrize("case", ["causal_gqa4:1_d24_window5", "varlen3_causal_gqa4:1_d24_window17"])
def test_dkdv_column_halves_match_float64(monkeypatch, case, deterministic, dtype):
    """The dK/dV kernel's column split (head dim 256 on a GPU: 4 or 8 programs
    per key tile) forced at D=24 in two: columns [0, 16) and [16, 24) of the padded 32."""
    from parallax.kernels.triton import backward as triton_parallel_bwd

    monkeypatch.setattr(triton_parallel_bwd, "dkdv_column_split", lambda block_d: 2)
    _check_against_float64(*CASES[case], dtype=dtype, deterministic=deterministic)

def test_deterministic_flag_type():
    (q, r, k, v), _ = _inputs(1, 4, 4, 1, 1, 16, torch.float32)
    with pytest.raises(TypeError, match="deterministic"):
        parallax_attn(q, r, k, v, backend="triton", deterministic="yes")


def test_no_probe_is_softmax_attention():
    """softmax_attention's Triton path: the kernel with a zero probe."""
    (q, _, k, v), grad_out = _inputs(1, 37, 37, 4, 2, 16, torch.float32)
    got = _output_and_grads(lambda *x: softmax_attention(*x, window_size=17, backend="triton"), (q, k, v), grad_out)
    ref = _output_and_grads(lambda *x: parallax_reference(x[0], torch.zeros_like(x[0]), *x[1:], window_size=17),
                            [x.double() for x in (q, k, v)], grad_out)
    for g, e in zip(got, ref):
        assert max_err(g, e) < 1e-5


def test_saved_row_statistics():
    """lse and sbar (float32 [B, HQ, T]) and mu are what the backward relies on;
    a row that sees no key gets o = mu = 0, sbar = 0 and lse = +inf."""
    (q, r, k, v), _ = _inputs(1, 20, 16, 2, 1, 16, torch.float32)
    o, lse, sbar, mu = attn_fwd(q, r, k, v, 0.3, True, 3, None)
    qd, rd, kd, vd = (x.double().repeat_interleave(2 // x.shape[2], dim=2) for x in (q, r, k, v))
    i = torch.arange(20)[:, None] - 4
    keep = (torch.arange(16)[None, :] <= i) & (torch.arange(16)[None, :] > i - 3)
    s1 = (0.3 * torch.einsum("bthd,bshd->bhts", qd, kd)).masked_fill(~keep, float("-inf"))
    p = torch.softmax(s1, -1).nan_to_num(0.0)
    s2 = torch.einsum("bthd,bshd->bhts", rd, kd)
    seen = keep.any(-1)
    assert torch.isinf(lse[:, :, ~seen]).all() and (lse[:, :, ~seen] > 0).all()
    assert max_err(lse[:, :, seen], torch.logsumexp(s1, -1)[:, :, seen]) < 1e-5
    assert max_err(sbar, (p * s2).sum(-1)) < 1e-5
    assert max_err(mu, torch.einsum("bhts,bshd->bthd", p, vd)) < 1e-5
    assert (o[:, ~seen] == 0).all() and (mu[:, ~seen] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_keys_outside_every_window_are_never_read(deterministic):
    """Keys outside every window are never read: NaN there cannot reach the
    output, dQ / dR, or the gradients of the keys that are seen."""
    (q, r, k, v), grad_out = _inputs(1, 16, 64, 2, 1, 16, torch.float32)
    unseen = 64 - 16 - 5 + 1  # keys 0 .. S - T - W never fall in a window of 5
    poisoned = [x.clone() for x in (k, v)]
    for x in poisoned:
        x[:, :unseen] = float("nan")
    got = _output_and_grads(
        lambda *x: parallax_attn(*x, window_size=5, backend="triton", deterministic=deterministic),
        (q, r, *poisoned), grad_out)
    ref = _output_and_grads(lambda *x: parallax_reference(*x, window_size=5),
                            [x.double() for x in (q, r, k, v)], grad_out)
    for g, e in zip(got[:3], ref[:3]):
        assert max_err(g, e) < 1e-5
    assert max_err(got[3][:, unseen:], ref[3][:, unseen:]) < 1e-5


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_torch_compile_fullgraph_matches_eager(deterministic):
    (q, r, k, v), grad_out = _inputs(1, 21, 21, 2, 1, 24, torch.float32)

    def loss(q, r, k, v):
        return parallax_attn(q, r, k, v, window_size=17, backend="triton", deterministic=deterministic)

    compiled = torch.compile(loss, fullgraph=True)
    eager_out = _output_and_grads(loss, (q, r, k, v), grad_out)
    compiled_out = _output_and_grads(compiled, (q, r, k, v), grad_out)
    # The fused backward's atomics may sum in another order on a GPU.
    tolerance = 0 if deterministic or DEVICE == "cpu" else 1e-6
    for e, c in zip(eager_out, compiled_out):
        torch.testing.assert_close(c, e, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_opcheck(deterministic):
    (q, r, k, v), grad_out = _inputs(1, 9, 9, 2, 1, 16, torch.float32)
    q, r, k, v = (x.requires_grad_() for x in (q, r, k, v))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(attn_fwd, (q, r, k, v, 0.25, True, 3, cu, deterministic))
    saved = attn_fwd(q, r, k, v, 0.25, False, None, None)
    plain = [x.detach() for x in (grad_out, q, r, k, v, *saved)]
    torch.library.opcheck(attn_bwd, (*plain, 0.25, False, None, None, deterministic))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["default", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    (2, 1024, 1024, 8, 2, 128, True, None, None),
    (1, 777, 777, 4, 4, 80, True, 100, None),
    (1, 600, 900, 6, 2, 96, False, None, None),
    (1, 513, 513, 4, 1, 256, True, None, None),
    (1, 1500, 1500, 4, 2, 64, True, 128, (0, 300, 301, 1000, 1500)),
], ids=["d128_gqa4", "d80_window100", "d96_noncausal", "d256", "varlen4_window128"])
def test_gpu_shapes_match_float64(case, dtype, deterministic):
    """Both backwards on the autotuned GPU tilings: D = 64 to 256 (256: the
    dK/dV column split), GQA, windows, T != S, varlen."""
    _check_against_float64(*case, dtype=dtype, deterministic=deterministic)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    (q, r, k, v), grad_out = _inputs(2, 1024, 1024, 8, 2, 128, torch.bfloat16)

    def run():
        return _output_and_grads(lambda *x: parallax_attn(*x, backend="triton", deterministic=True),
                                 (q, r, k, v), grad_out)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_grid_beyond_65535_heads():
    """batch * heads > 65535 sits on grid axis 0, which has no such limit."""
    _check_against_float64(70, 20, 20, 1024, 1024, 16, True, None, None, dtype=torch.float16)


@triton.jit
def _order_kernel(out, num_tiles, num_heads, group_heads):
    pid = tl.program_id(0)
    rank, head = heavy_first(pid, num_tiles, num_heads, group_heads)
    tl.store(out + 2 * pid, rank)
    tl.store(out + 2 * pid + 1, head)


@pytest.mark.parametrize("num_tiles,num_heads,group_heads", [(5, 7, 3), (4, 8, 8), (3, 2, 16), (1, 5, 2)])
def test_heavy_first_order_covers_every_tile_once(num_tiles, num_heads, group_heads):
    """Programs of a group of heads start with every head's rank-0 (heaviest)
    tile, then rank 1, ...; each (tile, head) is visited exactly once, a last
    group with fewer heads included."""
    programs = num_tiles * num_heads
    out = torch.full((programs, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(programs,)](out, num_tiles, num_heads, group_heads)
    order = [tuple(x) for x in out.tolist()]
    assert sorted(order) == [(t, h) for t in range(num_tiles) for h in range(num_heads)]
    start = 0
    for first_head in range(0, num_heads, group_heads):
        heads = min(group_heads, num_heads - first_head)
        group = order[start:start + heads * num_tiles]
        assert [rank for rank, _ in group] == sorted(rank for rank, _ in group)
        assert {head for _, head in group} == set(range(first_head, first_head + heads))
        start += heads * num_tiles


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_heads_in_several_l2_groups_match_float64(monkeypatch, deterministic):
    """With an L2 budget of one head, every head is its own group (and with
    GQA 4:2 the query kernels' groups hold one K/V head's two query heads)."""
    from parallax.kernels.triton import common as triton_parallel

    monkeypatch.setattr(triton_parallel, "L2_GROUP_BYTES", 1)
    _check_against_float64(2, 37, 37, 4, 2, 16, True, 17, None, dtype=torch.float32, deterministic=deterministic)
