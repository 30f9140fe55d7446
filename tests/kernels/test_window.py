"""`kernel_window`: the one encoding of window_size for the Triton kernels."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from parallax.kernels.reference import visible_keys
from parallax.kernels.window import kernel_window


@given(window=st.none() | st.integers(1, 2**40), keys=st.integers(1, 80))
def test_the_kernels_comparison_draws_the_reference_mask(window, keys):
    """The decode kernel (no window flag) keeps key <= pos and key > pos -
    kernel_window(W, keys) for queries at positions below `keys`; that is the
    reference mask for every window, None and windows past int32 included."""
    pos, key = torch.arange(keys)[:, None], torch.arange(keys)[None, :]
    encoded = kernel_window(window, keys)
    assert 1 <= encoded <= keys < 2**31
    kernel = (key <= pos) & (key > pos - encoded)
    assert torch.equal(kernel, visible_keys(pos, key, causal=True, window_size=window))
