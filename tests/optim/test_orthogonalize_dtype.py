"""orthogonalize refuses integer and bool tensors with a TypeError naming G."""
import pytest
import torch

from parallax import orthogonalize


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_integer_and_bool_inputs_raise_type_error(dtype, method):
    with pytest.raises(TypeError, match=f"G must be a floating-point tensor, got dtype {dtype}"):
        orthogonalize(torch.ones(3, 4, dtype=dtype), method=method)
