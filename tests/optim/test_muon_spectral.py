import math

import pytest
import torch

from parallax.optim import (
    clip_singular_values,
    dynmuon_power,
    freon,
    kaon,
    neuron_normalize,
    nuclear_scaled_polar,
    orthogonalize,
    spectral_power,
)
from parallax.optim.spectral import kaon_scalar

SPECTRUM = [4.0, 2.0, 1.0, 0.5, 0.1]


def singular_values(M, rank):
    return torch.linalg.svdvals(M.double())[:rank]


def assert_same_singular_vectors(result, U, V):
    # result = U diag(d) V^T  <=>  U^T result V is diagonal and the rest is empty.
    inner = U.mT @ result.double() @ V
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-9)
    assert torch.allclose(U @ inner @ V.mT, result.double(), atol=1e-9)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_mucon_clips_only_singular_values_above_threshold(matrix_with_spectrum, shape):
    M, U, V = matrix_with_spectrum(*shape, SPECTRUM)
    result = clip_singular_values(M, threshold=1.5)
    expected = torch.tensor([min(s, 1.5) for s in SPECTRUM], dtype=torch.float64)
    assert torch.allclose(singular_values(result, 5), expected, atol=1e-10)
    assert_same_singular_vectors(result, U, V)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0, -0.25])
def test_dynmuon_raises_singular_values_to_power_at_polar_scale(matrix_with_spectrum, power):
    M, U, V = matrix_with_spectrum(10, 16, SPECTRUM)
    result = spectral_power(M, power)
    shaped = torch.tensor(SPECTRUM, dtype=torch.float64) ** power
    expected = shaped / shaped.square().mean().sqrt()
    assert torch.allclose(torch.diagonal(U.mT @ result @ V), expected, atol=1e-10)
    assert torch.allclose(result.norm(), torch.tensor(math.sqrt(5.0), dtype=torch.float64))
    assert_same_singular_vectors(result, U, V)


def test_dynmuon_power_zero_is_exact_polar_factor(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(10, 16, SPECTRUM)
    assert torch.allclose(spectral_power(M, 0.0), U @ V.mT, atol=1e-10)


def test_dynmuon_schedule_goes_from_start_to_end_through_midpoint_by_sigmoid():
    total = 1000
    values = [dynmuon_power(step, total) for step in range(total + 1)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(-0.25)
    assert values[total // 2] == pytest.approx((1.0 - 0.25) / 2)
    assert all(a >= b for a, b in zip(values, values[1:]))
    # A sigmoid moves slowly at both ends and fastest in the middle.
    assert values[0] - values[100] < values[450] - values[550]
    assert dynmuon_power(5000, total) == pytest.approx(-0.25)


def test_dynmuon_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        dynmuon_power(3, None)


def test_exact_polar_variant_of_convergence_note(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(9, 15, SPECTRUM)
    assert torch.allclose(orthogonalize(M, "svd"), U @ V.mT, atol=1e-10)


def test_nuclear_scaled_steepest_descent(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(9, 15, SPECTRUM)
    result = nuclear_scaled_polar(M)
    assert torch.allclose(singular_values(result, 5), torch.full((5,), sum(SPECTRUM), dtype=torch.float64))
    assert_same_singular_vectors(result, U, V)
    # It maximises <M, D> - ||D||_2^2 / 2: beats nearby scalings of the polar factor.
    objective = lambda D: (M * D).sum() - torch.linalg.matrix_norm(D, ord=2) ** 2 / 2
    assert objective(result) > objective(1.1 * result) and objective(result) > objective(0.9 * result)


@pytest.mark.parametrize("q", [2.0, 1.0, 0.5, 0.25])
def test_freon_schatten_spectrum(matrix_with_spectrum, q):
    M, U, V = matrix_with_spectrum(14, 11, SPECTRUM)
    result = freon(M, schatten_q=q)
    S = torch.tensor(SPECTRUM, dtype=torch.float64)
    expected = (S / S.pow(q).sum().pow(1 / q)).pow(q - 1)
    assert torch.allclose(torch.diagonal(U.mT @ result @ V), expected, atol=1e-10)
    assert_same_singular_vectors(result, U, V)


def test_freon_special_cases_muon_sgd_and_inversion(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(14, 11, SPECTRUM)
    assert torch.allclose(freon(M, 1.0), U @ V.mT, atol=1e-10)
    assert torch.allclose(freon(M, 2.0), M / M.norm(), atol=1e-10)
    inverted = U.mT @ freon(M, 0.5) @ V
    assert torch.all(torch.diff(torch.diagonal(inverted)) > 0)  # smallest sigma, largest step


def test_kaon_scrambles_singular_values_by_chaotic_map(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(12, 18, SPECTRUM)
    result = kaon(M, iterations=5)
    spectrum = torch.tensor(SPECTRUM, dtype=torch.float64)
    normalized = spectrum / spectrum.norm()
    expected = torch.tensor([kaon_scalar(x.item(), 5) for x in normalized], dtype=torch.float64)
    assert torch.allclose(torch.diagonal(U.mT @ result @ V), expected, atol=1e-9)
    assert_same_singular_vectors(result, U, V)
    # Not monotone in sigma any more: the ordering of the spectrum is lost.
    assert not torch.all(torch.diff(expected.abs()) <= 0)


def test_normuon_equalises_row_norms_and_keeps_frobenius_norm():
    torch.manual_seed(0)
    O = orthogonalize(torch.randn(8, 32), "svd") * torch.linspace(0.2, 3.0, 8).unsqueeze(1)
    second_moment = torch.zeros(8)
    normalized = neuron_normalize(O, second_moment, beta2=0.0, eps=0.0)
    row_norms = normalized.norm(dim=1)
    assert torch.allclose(row_norms, row_norms.mean().expand(8), rtol=1e-5)
    assert torch.allclose(normalized.norm(), O.norm(), rtol=1e-5)
    assert torch.allclose(second_moment, O.square().mean(dim=1))


def test_normuon_second_moment_is_exponential_average():
    O1, O2 = torch.randn(4, 6), torch.randn(4, 6)
    v = torch.zeros(4)
    neuron_normalize(O1, v, beta2=0.9)
    neuron_normalize(O2, v, beta2=0.9)
    expected = 0.9 * 0.1 * O1.square().mean(1) + 0.1 * O2.square().mean(1)
    assert torch.allclose(v, expected)


@pytest.mark.parametrize("fn, kwargs, name", [
    (clip_singular_values, {"threshold": 0.0}, "threshold"),
    (freon, {"schatten_q": -1.0}, "schatten_q"),
    (kaon, {"iterations": 0}, "iterations"),
])
def test_bad_rule_arguments_raise(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(torch.randn(3, 4), **kwargs)
