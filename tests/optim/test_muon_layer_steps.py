import pytest
import torch

from parallax.optim import NEWTON_SCHULZ_COEFFICIENTS, layer_aware_ns_steps, orthogonalize, steps_to_reach
from parallax.optim.coefficients import apply_polynomial
from parallax.optim.layer_steps import RMS_FLOOR


def scalar_iterate(x, steps):
    for _ in range(steps):
        x = apply_polynomial(x, NEWTON_SCHULZ_COEFFICIENTS)
    return x


def test_steps_to_reach_is_the_fewest_steps_that_lift_x_to_target():
    for x in (0.3, 0.05, 0.004):
        steps = steps_to_reach(x, target=0.6)
        assert scalar_iterate(x, steps) >= 0.6
        assert steps == 1 or scalar_iterate(x, steps - 1) < 0.6


def test_steps_are_clamped_to_bounds():
    assert steps_to_reach(1e-12, max_steps=7) == 7
    assert steps_to_reach(0.9, min_steps=3) == 3
    with pytest.raises(ValueError, match="target"):
        steps_to_reach(0.1, target=1.5)


@pytest.mark.parametrize("spectrum", [[2.0] * 6 + [0.05] * 2, [1.0] * 8, torch.logspace(0, -2, 8).tolist()])
def test_layer_aware_steps_follow_measured_quantile_and_spectrum_rms(matrix_with_spectrum, spectrum):
    M, _, _ = matrix_with_spectrum(8, 20, spectrum)
    S = torch.tensor(spectrum, dtype=torch.float64)
    normalized = S / S.norm()
    x = torch.quantile(normalized, 0.1).item()

    def enough(steps):
        rms = torch.tensor([scalar_iterate(v.item(), steps) for v in normalized]).square().mean().sqrt()
        return scalar_iterate(x, steps) >= 0.6 and rms >= RMS_FLOOR

    steps = layer_aware_ns_steps(M, quantile=0.1)
    assert enough(steps) and not any(enough(fewer) for fewer in range(1, steps))
    assert steps >= steps_to_reach(x)


@pytest.mark.parametrize("shape", [(256, 256), (512, 256)])  # x = 1/16: 2 steps reach only 0.69
def test_layer_aware_steps_do_not_shrink_the_step_on_a_flat_spectrum(shape):
    generator = torch.Generator().manual_seed(0)
    rows, cols = shape
    columns = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=generator))[0]  # orthonormal
    flat = columns if rows >= cols else columns.mT  # every singular value 1

    def rms(steps):
        O = orthogonalize(flat, "newton_schulz", steps, compute_dtype=torch.float32)
        return torch.linalg.svdvals(O.double()).square().mean().sqrt().item()

    # The first count that lifts the quantile into the band lands near its
    # bottom; the RMS criterion keeps the step at Muon's size.
    steps = layer_aware_ns_steps(flat)
    assert rms(steps) >= RMS_FLOOR and rms(steps) >= 0.8 * rms(5)


def test_chosen_steps_orthogonalize_the_chosen_quantile(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(16, 40, torch.logspace(0, -2, 16).tolist())
    steps = layer_aware_ns_steps(M, quantile=0.25, target=0.6)
    O = orthogonalize(M, "newton_schulz", steps, compute_dtype=torch.float64)
    lifted = torch.diagonal(U.mT @ O @ V)
    assert torch.quantile(lifted, 0.25) >= 0.6 - 1e-9


def test_zero_matrix_needs_minimum_steps():
    assert layer_aware_ns_steps(torch.zeros(4, 6), min_steps=2) == 2


def test_optimizer_counts_polar_express_steps_with_polar_express_polynomials():
    from torch import nn

    from parallax.optim import POLAR_EXPRESS_COEFFICIENTS, MuonWithAdamW
    from parallax.optim.coefficients import POLAR_EXPRESS_SAFETY, coefficient_schedule

    # A matrix whose 10th-percentile singular value is small: the two schedules disagree.
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(40, 16, generator=generator))
    spectrum = torch.logspace(0, -2.5, 16)
    grad = (U * spectrum) @ V.mT
    p = nn.Parameter(torch.zeros(16, 40))
    p.grad = grad
    optimizer = MuonWithAdamW([{"params": [p], "use_muon": True}], orthogonalizer="polar_express",
                              layer_aware_steps=True, nesterov=False, momentum=0.0)
    optimizer.step()
    x = torch.quantile(spectrum, 0.1).item() / spectrum.norm().item()
    expected = steps_to_reach(x / POLAR_EXPRESS_SAFETY, coefficients=coefficient_schedule(POLAR_EXPRESS_COEFFICIENTS, 10))
    assert optimizer.state[p]["ns_steps"] == expected
    assert expected != steps_to_reach(x)  # Newton-Schulz would need a different count
