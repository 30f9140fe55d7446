"""Every bad input raises ValueError/TypeError naming the argument."""
import pytest
import torch

from parallax import parallax_attn, parallax_reference, softmax_attention
from parallax.kernels.checks import assert_cu_seqlens_async


def inputs(B=1, T=6, S=6, HQ=4, HK=2, D=8, dtype=torch.float32):
    return (torch.randn(B, T, HQ, D, dtype=dtype), torch.randn(B, T, HQ, D, dtype=dtype),
            torch.randn(B, S, HK, D, dtype=dtype), torch.randn(B, S, HK, D, dtype=dtype))


def replace(args, i, x):
    args = list(args)
    args[i] = x
    return args


q, r, k, v = inputs()
BAD = [
    # (args, kwargs, error, message pattern)
    (replace((q, r, k, v), 0, q[0]), {}, ValueError, r"q must have 4 dims"),
    (replace((q, r, k, v), 2, k[..., 0]), {}, ValueError, r"k must have 4 dims"),
    (replace((q, r, k, v), 1, r[:, :5]), {}, ValueError, r"r must have the shape of q"),
    (inputs(HQ=3, HK=2), {}, ValueError, r"q heads \(3\) must be a multiple of k heads \(2\)"),
    (replace((q, r, k, v), 2, torch.randn(1, 6, 2, 16)), {}, ValueError, r"v must have the shape of k"),
    (replace(replace((q, r, k, v), 2, torch.randn(1, 6, 2, 16)), 3, torch.randn(1, 6, 2, 16)), {},
     ValueError, r"k must have the head_dim of q \(8\)"),
    (replace((q, r, k, v), 3, v[:, :4]), {}, ValueError, r"v must have the shape of k"),
    (replace((q, r, k, v), 2, torch.randn(2, 6, 2, 8)), {}, ValueError, r"v must have the shape of k"),
    (tuple(x.to(torch.int64) for x in (q, r, k, v)), {}, TypeError, r"q must be a floating-point tensor"),
    (replace((q, r, k, v), 3, v.double()), {}, TypeError, r"v must have the dtype of q"),
    (replace((q, r, k, v), 1, "r"), {}, TypeError, r"r must be a torch.Tensor"),
    ((q, r, k, v), {"window_size": 0}, ValueError, r"window_size must be >= 1"),
    ((q, r, k, v), {"window_size": 2.5}, TypeError, r"window_size must be None or an int"),
    ((q, r, k, v), {"scale": "big"}, TypeError, r"scale must be None or a number"),
]


@pytest.mark.parametrize("args, kwargs, error, pattern", BAD)
def test_bad_inputs_name_the_argument(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        parallax_attn(*args, **kwargs)
    with pytest.raises(error, match=pattern):
        parallax_reference(*args, **kwargs)


def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend must be one of None, 'torch', 'triton', got 'cuda'"):
        parallax_attn(q, r, k, v, backend="cuda")


def test_mixed_devices():
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\), got meta"):
        parallax_attn(q, r, k.to("meta"), v)


CU = torch.tensor([0, 2, 6], dtype=torch.int32)
BAD_CU = [
    (inputs(B=2), CU, ValueError, r"cu_seqlens needs q packed into batch 1, got batch 2"),
    (inputs(), torch.tensor([0, 2, 5], dtype=torch.int32), ValueError, r"cu_seqlens must start at 0 and end at the total length 6"),
    (inputs(), torch.tensor([1, 2, 6], dtype=torch.int32), ValueError, r"cu_seqlens must start at 0"),
    (inputs(), torch.tensor([0, 4, 2, 6], dtype=torch.int32), ValueError, r"cu_seqlens must be non-decreasing"),
    (inputs(), CU.long(), ValueError, r"cu_seqlens must be an int32 tensor"),
    (inputs(), [0, 2, 6], TypeError, r"cu_seqlens must be a torch.Tensor"),
    (inputs(S=8), CU, ValueError, r"cu_seqlens needs k with the sequence length of q"),
]


@pytest.mark.parametrize("args, cu, error, pattern", BAD_CU)
def test_bad_cu_seqlens(args, cu, error, pattern):
    with pytest.raises(error, match=pattern):
        parallax_attn(*args, cu_seqlens=cu)
    with pytest.raises(error, match=pattern):
        softmax_attention(args[0], args[2], args[3], cu_seqlens=cu)



@pytest.mark.parametrize("bounds, pattern", [
    ((0, 2, 5), r"cu_seqlens must start at 0 and end at the total length 6"),
    ((1, 2, 6), r"cu_seqlens must start at 0"),
    ((0, 4, 2, 6), r"cu_seqlens must be non-decreasing"),
])
def test_device_side_cu_seqlens_checks(bounds, pattern):
    """The checks CUDA tensors get instead of reading the values on the host
    (a device-side assert there); on CPU the same assert raises at once."""
    with pytest.raises(RuntimeError, match=pattern):
        assert_cu_seqlens_async(torch.tensor(bounds, dtype=torch.int32), 6)
    assert_cu_seqlens_async(CU, 6)


@pytest.mark.gpu
def test_gpu_varlen_call_never_waits_for_the_device():
    """parallax_attn with cu_seqlens on CUDA checks the offsets without a host
    synchronisation (sync debug mode turns any into an error)."""
    q, r, k, v = (x.cuda() for x in inputs(T=6, S=6))
    cu = CU.cuda()
    parallax_attn(q, r, k, v, cu_seqlens=cu)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        parallax_attn(q, r, k, v, cu_seqlens=cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
