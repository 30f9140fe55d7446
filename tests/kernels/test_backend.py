"""`resolve_backend`: the one rule by which parallax_attn, softmax_attention and
parallax_attn_with_kvcache (and so every layer and model) pick Triton or torch."""
from types import SimpleNamespace

import pytest
import torch

from parallax import ParallaxAttention, parallax_attn, parallax_attn_with_kvcache, softmax_attention
from parallax.kernels import backend as backend_module
from parallax.kernels.backend import resolve_backend
from parallax.kernels.decode import decode_kernel_refuses


def fake_q(is_cuda=True, dtype=torch.bfloat16, head_dim=128):
    return SimpleNamespace(is_cuda=is_cuda, dtype=dtype, shape=(1, 1, 8, head_dim),
                           device=torch.device("cuda" if is_cuda else "cpu"))


REFUSED = TypeError("the kernel does not take this")

# (backend, q, triton installed, TRITON_INTERPRET=1, kernel's refusal, expected path or (error, message))
TABLE = [
    (None, fake_q(), True, False, None, "triton"),
    (None, fake_q(dtype=torch.float32, head_dim=64), True, False, None, "triton"),
    (None, fake_q(dtype=torch.float32, head_dim=128), True, False, None, "torch"),  # wide float32 spills
    (None, fake_q(dtype=torch.float16, head_dim=256), True, False, None, "triton"),
    (None, fake_q(), False, False, None, "torch"),  # no triton package
    (None, fake_q(is_cuda=False), True, True, None, "torch"),  # the interpreter is never the default
    (None, fake_q(), True, False, REFUSED, "torch"),
    ("torch", fake_q(), True, False, None, "torch"),
    ("torch", fake_q(), False, False, REFUSED, "torch"),
    ("triton", fake_q(dtype=torch.float32, head_dim=256), True, False, None, "triton"),  # an explicit choice is obeyed
    ("triton", fake_q(is_cuda=False), True, True, None, "triton"),
    ("triton", fake_q(), False, False, None, (ValueError, "backend='triton' needs the triton package")),
    ("triton", fake_q(is_cuda=False), True, False, None,
     (ValueError, r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1\), got q on cpu")),
    ("triton", fake_q(), True, False, REFUSED, (TypeError, "the kernel does not take this")),
    ("cuda", fake_q(), True, False, None, (ValueError, "backend must be one of None, 'torch', 'triton', got 'cuda'")),
    (1, fake_q(), True, False, None, (ValueError, "backend must be one of None, 'torch', 'triton', got 1")),
]


@pytest.mark.parametrize("backend,q,installed,interpret,refusal,expected", TABLE)
def test_resolution_table(monkeypatch, backend, q, installed, interpret, refusal, expected):
    monkeypatch.setattr(backend_module, "TRITON_INSTALLED", installed)
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    refuses = lambda q: refusal  # noqa: E731
    if isinstance(expected, str):
        assert resolve_backend(backend, q, refuses) == expected
    else:
        with pytest.raises(expected[0], match=expected[1]):
            resolve_backend(backend, q, refuses)


@pytest.mark.parametrize("dtype,head_dim,refused", [
    (torch.float16, 128, None), (torch.float32, 16, None), (torch.float64, 64, TypeError),
    (torch.bfloat16, 80, ValueError), (torch.bfloat16, 512, ValueError)])
def test_the_decode_kernel_refuses_dtypes_and_head_dims_it_lacks(dtype, head_dim, refused):
    reason = decode_kernel_refuses(fake_q(dtype=dtype, head_dim=head_dim))
    assert reason is None if refused is None else isinstance(reason, refused)


def calls(backend):
    """Every op and layer path on small CPU float32 inputs, with `backend`."""
    q, r, k, v = (torch.randn(1, 5, 2, 16) for _ in range(4))
    cache = (torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16))
    x = torch.randn(1, 5, 32)
    return {
        "parallax_attn": lambda: parallax_attn(q, r, k, v, backend=backend),
        # window_size keeps SDPA (which ignores backend) out of the way
        "softmax_attention": lambda: softmax_attention(q, k, v, window_size=3, backend=backend),
        "parallax_attn_with_kvcache": lambda: parallax_attn_with_kvcache(
            q, r, *cache, k=k, v=v, cache_seqlens=torch.zeros(1, dtype=torch.int32), backend=backend),
        "ParallaxAttention": lambda: ParallaxAttention(32, 2, backend=backend)(x),
        "ParallaxAttention softmax": lambda: ParallaxAttention(32, 2, kind="softmax", window_size=3,
                                                               backend=backend)(x),
        "ParallaxAttention cached": lambda: ParallaxAttention(32, 2, backend=backend)(
            x, cache=ParallaxAttention(32, 2).new_cache(1, 8)),
    }


@pytest.mark.parametrize("name", list(calls(None)))
def test_every_op_and_layer_path_follows_the_rule(monkeypatch, name):
    """Without CUDA or the interpreter an explicit 'triton' fails the same way
    everywhere, and without the triton package too; None runs the torch path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    needs_cuda = r"^backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1\), got q on cpu"
    with pytest.raises(ValueError, match=needs_cuda):
        calls("triton")[name]()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend_module, "TRITON_INSTALLED", False)
    with pytest.raises(ValueError, match=r"^backend='triton' needs the triton package"):
        calls("triton")[name]()
    assert torch.isfinite(calls(None)[name]()).all()
