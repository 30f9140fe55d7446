"""parallax_reference against the independent float64 oracle."""
import pytest
import torch

from parallax import parallax_reference
from parallax.kernels.reference import end_aligned_positions, visible_keys

from .oracle import mask_f64, max_err, parallax_f64

CASES = {
    # name: (B, T, S, HQ, HK, D, causal, window)
    "mha": (2, 9, 9, 2, 2, 8, True, None),
    "gqa_4_2": (1, 11, 11, 4, 2, 8, True, None),
    "gqa_4_1": (2, 7, 7, 4, 1, 16, True, None),
    "t_lt_s": (1, 5, 12, 4, 2, 8, True, None),
    "window_small": (1, 13, 13, 2, 1, 8, True, 3),
    "window_large": (1, 6, 6, 2, 2, 8, True, 40),
    "non_causal": (2, 6, 10, 2, 1, 8, False, None),
    "non_causal_window": (1, 8, 8, 2, 2, 8, False, 3),
    "rows_without_keys": (1, 8, 3, 2, 1, 8, True, None),
}


def make_inputs(B, T, S, HQ, HK, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    r = 0.5 * torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, S, HK, D, generator=g, dtype=dtype)
    v = torch.randn(B, S, HK, D, generator=g, dtype=dtype)
    return q, r, k, v


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64_oracle(case):
    B, T, S, HQ, HK, D, causal, window = CASES[case]
    q, r, k, v = make_inputs(B, T, S, HQ, HK, D)
    out = parallax_reference(q, r, k, v, causal=causal, window_size=window)
    assert out.dtype == torch.float64
    assert max_err(out, parallax_f64(q, r, k, v, causal=causal, window_size=window)) < 1e-12


def test_reference_float32_output_and_accuracy():
    q, r, k, v = make_inputs(2, 10, 10, 4, 2, 16, dtype=torch.float32)
    out = parallax_reference(q, r, k, v, scale=0.3)
    assert out.dtype == torch.float32
    assert max_err(out, parallax_f64(q, r, k, v, scale=0.3)) < 1e-5


def test_rows_without_keys_are_zero_not_nan():
    q, r, k, v = make_inputs(1, 6, 2, 2, 2, 8)
    for x in (q, r, k, v):
        x.requires_grad_(True)
    out = parallax_reference(q, r, k, v)
    assert torch.isfinite(out).all()
    assert (out[:, :4] == 0).all() and (out[:, 4:] != 0).any()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, r, k, v))


def test_scale_applies_to_qk_only():
    q, r, k, v = make_inputs(1, 5, 5, 2, 2, 8)
    # Doubling the scale equals doubling q; it must not touch r.k.
    assert max_err(parallax_reference(q, r, k, v, scale=0.5), parallax_reference(2 * q, r, k, v, scale=0.25)) < 1e-14


def test_zero_probe_is_softmax_attention():
    q, _, k, v = make_inputs(1, 7, 7, 4, 2, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert max_err(parallax_reference(q, torch.zeros_like(q), k, v), sdpa) < 1e-12


def test_visible_keys_draws_the_documented_mask():
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_keys(*end_aligned_positions(3, 5), causal=True, window_size=2), expected)
    for causal in (True, False):
        for window in (None, 1, 4):
            assert torch.equal(visible_keys(*end_aligned_positions(6, 9), causal=causal, window_size=window),
                               mask_f64(6, 9, causal, window))
