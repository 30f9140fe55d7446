"""parallax_attn / softmax_attention on the torch path (blockwise, exact backward)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from parallax import parallax_attn, parallax_reference, softmax_attention
from parallax.kernels.torch_path import blockwise

from .oracle import assert_within_rule, max_err, parallax_f64, parallax_jvp_f64
from .test_reference import CASES, make_inputs


def grads(fn, inputs, grad_out):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


def block_rows(monkeypatch, rows):
    """Make the torch path cut queries into blocks of `rows` rows."""
    monkeypatch.setattr(blockwise, "SCORE_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(blockwise, "MIN_BLOCK_ROWS", rows)


@pytest.fixture(params=["kept", "recomputed"])
def score_state(request, monkeypatch):
    """Run a test with the forward keeping its scores for the backward, or not."""
    monkeypatch.setattr(blockwise, "KEPT_SCORE_BYTES", 1 << 40 if request.param == "kept" else 0)
    return request.param


@pytest.mark.parametrize("case", CASES)
def test_torch_path_forward_backward_match_float64(case, score_state, monkeypatch):
    B, T, S, HQ, HK, D, causal, window = CASES[case]
    block_rows(monkeypatch, 3)  # several blocks, exercising the block bounds
    x64 = make_inputs(B, T, S, HQ, HK, D)
    x32 = [x.float() for x in x64]
    do = torch.randn(B, T, HQ, D, dtype=torch.float64)
    kw = dict(causal=causal, window_size=window)

    out64, grads64 = grads(lambda *a: parallax_reference(*a, **kw), x64, do)
    out, got = grads(lambda *a: parallax_attn(*a, backend="torch", **kw), x32, do.float())
    ref32, grads32 = grads(lambda *a: parallax_reference(*a, **kw), x32, do.float())

    assert max_err(out64, parallax_f64(*x64, **kw)) < 1e-12
    assert_within_rule("o", max_err(out, out64), max_err(ref32, out64), 1e-6)
    for name, g, g32, g64 in zip("qrkv", got, grads32, grads64):
        assert_within_rule(f"d{name}", max_err(g, g64), max_err(g32, g64), 1e-5)


def test_torch_path_float64_is_exact_and_passes_gradcheck(score_state, monkeypatch):
    block_rows(monkeypatch, 2)
    q, r, k, v = (x.requires_grad_(True) for x in make_inputs(1, 6, 8, 4, 2, 4))
    for kw in (dict(), dict(window_size=3), dict(causal=False)):
        assert torch.autograd.gradcheck(lambda *a: parallax_attn(*a, backend="torch", **kw), (q, r, k, v))


@pytest.mark.parametrize("case", CASES)
def test_torch_path_equals_softmax_attention_minus_its_derivative_along_the_probe(case):
    """o = A(q) - dA(q)[r / scale], A = masked softmax attention: an oracle that
    shares no code with the Parallax formula, gradients included."""
    B, T, S, HQ, HK, D, causal, window = CASES[case]
    x = make_inputs(B, T, S, HQ, HK, D)
    do = torch.randn(B, T, HQ, D, dtype=torch.float64)
    kw = dict(scale=0.4, causal=causal, window_size=window)
    out, got = grads(lambda *a: parallax_attn(*a, backend="torch", **kw), x, do)
    ref, expected = grads(lambda *a: parallax_jvp_f64(*a, **kw), x, do)
    assert max_err(out, ref) < 1e-12
    for g, e in zip(got, expected):
        assert max_err(g, e) < 1e-12


def test_kept_scores_survive_a_second_backward():
    """The backward must not overwrite scores the graph still holds (retain_graph)."""
    q, r, k, v = (x.float().requires_grad_(True) for x in make_inputs(2, 16, 16, 4, 2, 8))
    out = parallax_attn(q, r, k, v, backend="torch")
    first = torch.autograd.grad(out, (q, r, k, v), torch.ones_like(out), retain_graph=True)
    second = torch.autograd.grad(out, (q, r, k, v), torch.ones_like(out))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_inputs_are_not_modified():
    """One head of one sequence makes the head-major layout a view of the input."""
    x = [t.requires_grad_(True) for t in make_inputs(1, 5, 5, 1, 1, 8)]
    before = [t.detach().clone() for t in x]
    parallax_attn(*x, backend="torch").sum().backward()
    assert all(torch.equal(t, b) for t, b in zip(x, before))


def test_varlen_matches_separate_sequences():
    lengths = [5, 1, 9, 0, 4]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, r, k, v = make_inputs(1, sum(lengths), sum(lengths), 4, 2, 8)
    do = torch.randn_like(q)
    for window in (None, 3):
        out, got = grads(lambda *a: parallax_attn(*a, cu_seqlens=cu, window_size=window), (q, r, k, v), do)
        pieces, expected = [], [torch.zeros_like(x) for x in (q, r, k, v)]
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            if a == b:
                continue  # an empty sequence contributes no rows and no gradient
            seq = [x[:, a:b] for x in (q, r, k, v)]
            piece, g = grads(lambda *s: parallax_f64(*s, window_size=window), seq, do[:, a:b])
            pieces.append(piece)
            for e, gi in zip(expected, g):
                e[:, a:b] = gi
        assert max_err(out, torch.cat(pieces, 1)) < 1e-12
        for g, e in zip(got, expected):
            assert max_err(g, e) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_zero_probe_equals_softmax_attention_and_sdpa(causal):
    q, _, k, v = (x.float() for x in make_inputs(2, 9, 9, 4, 2, 16))
    out = parallax_attn(q, torch.zeros_like(q), k, v, causal=causal)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    assert max_err(out, sdpa) < 1e-5
    assert max_err(softmax_attention(q, k, v, causal=causal), sdpa) < 1e-5


def test_softmax_attention_blockwise_cases_match_reference():
    q, _, k, v = make_inputs(1, 7, 11, 4, 1, 8)
    zero = torch.zeros_like(q)
    for kw in (dict(window_size=4), dict(causal=True)):  # T != S avoids SDPA
        assert max_err(softmax_attention(q, k, v, **kw), parallax_reference(q, zero, k, v, **kw)) < 1e-12
    _, got = grads(lambda q, k, v: softmax_attention(q, k, v, window_size=4), (q, k, v), torch.ones_like(q))
    _, ref = grads(lambda q, k, v: parallax_reference(q, zero, k, v, window_size=4), (q, k, v), torch.ones_like(q))
    for g, e in zip(got, ref):
        assert max_err(g, e) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_in_and_out(dtype):
    q, r, k, v = (x.to(dtype).requires_grad_(True) for x in make_inputs(1, 8, 8, 2, 2, 16))
    out = parallax_attn(q, r, k, v)
    out.float().sum().backward()
    assert out.dtype == dtype and all(x.grad.dtype == dtype for x in (q, r, k, v))
    exact = parallax_f64(q.detach(), r.detach(), k.detach(), v.detach())
    assert max_err(out, exact) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_long_sequence_stays_within_memory():
    """T=8192, 4 heads of D=32, forward and backward: the scores are recomputed
    and peak RSS stays near one block's temporaries. Walking the blocks smallest
    first instead grew glibc's heap to 380-530 MB here."""
    code = textwrap.dedent("""
        import resource, torch
        from parallax import parallax_attn
        torch.manual_seed(0)
        q, r, k, v = (torch.randn(1, 8192, 4, 32, requires_grad=True) for _ in range(4))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = parallax_attn(q, r, k, v)
        out.sum().backward()
        assert torch.isfinite(q.grad).all()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.split()[-1])
    dense_mb = 4 * 8192 * 8192 * 4 // 2**20  # one float32 [H, T, T] score matrix
    assert peak_mb < 200 < dense_mb, f"peak {peak_mb} MB"


def test_torch_path_compiles_at_batch_above_one(traceable_empty):
    """torch.compile traces the torch path forward and backward at batch > 1 and GQA (it once failed there:
    a tensor written through out= came back with other strides); aot_eager traces what inductor does,
    without its slow CPU code generation."""
    torch.manual_seed(0)
    inputs = [torch.randn(3, 7, 4, 8), torch.randn(3, 7, 4, 8) * 0.3, torch.randn(3, 7, 2, 8), torch.randn(3, 7, 2, 8)]
    grad_out = torch.randn(3, 7, 4, 8)

    def attend(q, r, k, v):
        return parallax_attn(q, r, k, v, window_size=3, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out, grads_ = grads(compiled, inputs, grad_out)
    ref, ref_grads = grads(attend, inputs, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads_, ref_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
