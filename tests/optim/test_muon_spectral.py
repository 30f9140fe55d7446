import math

import pytest
import torch

from parallax.optim import (
    clip_by_polar,
    clip_singular_values,
    dynmuon_direction,
    dynmuon_power,
    mucon,
    freon,
    kaon,
    neuron_normalize,
    nuclear_scaled_polar,
    orthogonalize,
    spectral_direction,
    spectral_power,
)
from parallax.optim.rules.kaon import KAON_GAIN, KAON_SCALE
from parallax.optim.rules.mucon import spectral_norm_estimate

SPECTRUM = [4.0, 2.0, 1.0, 0.5, 0.1]


def singular_values(M, rank):
    return torch.linalg.svdvals(M.double())[:rank]


def assert_same_singular_vectors(result, U, V):
    # result = U diag(d) V^T  <=>  U^T result V is diagonal and the rest is empty.
    inner = U.mT @ result.double() @ V
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-9)
    assert torch.allclose(U @ inner @ V.mT, result.double(), atol=1e-9)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_clip_singular_values_clips_only_above_threshold(matrix_with_spectrum, shape):
    M, U, V = matrix_with_spectrum(*shape, SPECTRUM)
    result = clip_singular_values(M, threshold=1.5)
    expected = torch.tensor([min(s, 1.5) for s in SPECTRUM], dtype=torch.float64)
    assert torch.allclose(singular_values(result, 5), expected, atol=1e-10)
    assert_same_singular_vectors(result, U, V)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_polar_formula_equals_svd_clip(matrix_with_spectrum, shape):
    M, _, _ = matrix_with_spectrum(*shape, SPECTRUM)
    exact = lambda X: orthogonalize(X, "svd")
    for threshold in (0.3, 1.5, 5.0):
        assert torch.allclose(clip_by_polar(M, exact, threshold), clip_singular_values(M, threshold), atol=1e-10)
    # With Polar Express instead of an SVD the formula stays close.
    approximate = lambda X: orthogonalize(X, "polar_express", 8, compute_dtype=torch.float32)
    result = clip_by_polar(M.float(), approximate, 1.5).double()
    assert (result - clip_singular_values(M, 1.5)).norm() / clip_singular_values(M, 1.5).norm() < 1e-3


def test_mucon_threshold_is_relative_to_the_spectral_norm(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(12, 20, SPECTRUM)
    for scale in (1e-4, 1.0, 1e3):  # gradient scale does not matter
        result = mucon(M * scale, threshold=0.3)
        expected = torch.tensor([min(s / (0.3 * 4.0), 1.0) for s in SPECTRUM], dtype=torch.float64)
        assert torch.allclose(torch.diagonal(U.mT @ result @ V), expected, atol=1e-8)
        assert_same_singular_vectors(result, U, V)


def test_absolute_mucon_is_the_papers_clip(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(12, 20, SPECTRUM)
    for threshold in (0.3, 1.5, 5.0):
        assert torch.allclose(mucon(M, threshold, relative=False), clip_singular_values(M, threshold), atol=1e-12)
    with pytest.raises(ValueError, match="threshold"):
        mucon(M, 0.0, relative=False)
    mucon(M, 7.0, relative=False)  # any tau > 0: only the relative tau is a fraction


def test_default_mucon_clips_at_ordinary_gradient_scales():
    # Gradients have spectral norms far below 1: MuCon must neither be momentum SGD nor Muon.
    G = torch.randn(64, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-3
    direction = spectral_direction(G, "mucon", clip_method="svd")
    S = torch.linalg.svdvals(direction)
    assert S.max() == pytest.approx(1.0, abs=1e-6)  # clipped: Muon's spectral norm, not G's
    assert S.min() < 0.8  # small directions keep their (smaller) size: not Muon either
    assert not torch.allclose(direction, G / torch.linalg.matrix_norm(G, 2), atol=1e-3)


def gaussian_and_log_spectrum_matrices():
    generator = torch.Generator().manual_seed(0)
    for rows, cols in [(48, 160), (160, 48)]:
        yield torch.randn(rows, cols, generator=generator)
        rank = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator))
        V, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator))
        yield (U * torch.logspace(0, -3, rank)) @ V.mT


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_default_mucon_is_the_svd_clip_within_one_percent(relative, fraction):
    for M in gaussian_and_log_spectrum_matrices():  # float32, as the optimizer sees them
        s1 = torch.linalg.matrix_norm(M.double(), 2).item()
        threshold = fraction if relative else fraction * s1
        direction = spectral_direction(M, "mucon", clip_threshold=threshold, clip_relative=relative).double()
        exact = clip_singular_values(M.double(), fraction * s1) / (fraction * s1 if relative else 1.0)
        target = 1.0 if relative else threshold  # the spectral norm the clip must give
        assert abs(torch.linalg.matrix_norm(direction, 2).item() - target) <= 0.01 * target
        assert (direction - exact).norm() <= 0.01 * exact.norm()


def test_spectral_norm_estimate_is_accurate_where_power_iteration_stalls():
    # Gaussian matrices: the top singular values cluster (gap s2/s1 ~ 0.994 at 1024 x 1024).
    M = torch.randn(512, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    estimate = spectral_norm_estimate(M)
    exact = torch.linalg.matrix_norm(M, 2)
    assert exact * (1 - 1e-5) <= estimate <= exact * (1 + 1e-12)
    assert spectral_norm_estimate(torch.zeros(3, 5)) == 0
    low_rank = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 70, dtype=torch.float64)
    assert spectral_norm_estimate(low_rank) == pytest.approx(torch.linalg.matrix_norm(low_rank, 2).item(), rel=1e-10)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0, -0.25])
def test_spectral_power_is_u_s_to_the_p_v_without_rescaling(matrix_with_spectrum, power):
    # DynMuon's U S^p V^T (paper and released code): no extra RMS rescale.
    M, U, V = matrix_with_spectrum(10, 16, SPECTRUM)
    result = spectral_power(M, power)
    expected = torch.tensor(SPECTRUM, dtype=torch.float64) ** power
    assert torch.allclose(torch.diagonal(U.mT @ result @ V), expected, atol=1e-10)
    assert_same_singular_vectors(result, U, V)


def test_dynmuon_power_zero_is_exact_polar_factor(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(10, 16, SPECTRUM)
    assert torch.allclose(spectral_power(M, 0.0), U @ V.mT, atol=1e-10)


def test_dynmuon_schedule_follows_the_released_logistic_schedule():
    # fzwark/DynMuon, Logistic_Scheduler with train_gpt.py's defaults
    # (p_max 1, p_min -0.25, tau 0.04, width 0.04), evaluated at the 1-based step.
    total = 1000
    values = [dynmuon_power(step, total) for step in range(1, total + 1)]
    for step in (1, 40, 95, 200, 1000):
        released = -0.25 + 1.25 / (1 + math.exp((step / total - 0.04) / 0.04))
        assert values[step - 1] == pytest.approx(released, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))
    # Positive early, mildly negative from ~10% of training on, not around the midpoint.
    assert values[0] > 0.6 and dynmuon_power(50, total) > 0 and dynmuon_power(150, total) < 0
    assert dynmuon_power(total // 2, total) == pytest.approx(-0.25, abs=1e-4)
    assert dynmuon_power(10 * total, total) == pytest.approx(-0.25)  # no overflow past the end


def test_dynmuon_direction_switches_like_the_released_code(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(10, 16, SPECTRUM)
    polar = lambda X: orthogonalize(X, "svd")
    assert torch.equal(dynmuon_direction(M, 0.6, polar), M)  # p >= 0.25: the momentum itself
    assert torch.allclose(dynmuon_direction(M, 0.1, polar), U @ V.mT, atol=1e-10)  # 0 <= p < 0.25: Muon
    assert torch.allclose(dynmuon_direction(M, -0.2, polar), spectral_power(M, -0.2))


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
def test_freon_schatten_spectrum_at_muon_scale(matrix_with_spectrum, q):
    M, U, V = matrix_with_spectrum(14, 11, SPECTRUM)
    result = freon(M, schatten_q=q)
    S = torch.tensor(SPECTRUM, dtype=torch.float64)
    shape = (S / S.pow(q).sum().pow(1 / q)).pow(q - 1)
    expected = shape * (len(SPECTRUM) / shape.square().sum()).sqrt()
    assert torch.allclose(torch.diagonal(U.mT @ result @ V), expected, atol=1e-10)
    assert_same_singular_vectors(result, U, V)


def test_freon_special_cases_muon_sgd_and_inversion(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(14, 11, SPECTRUM)
    assert torch.allclose(freon(M, 1.0), U @ V.mT, atol=1e-10)
    assert torch.allclose(freon(M, 2.0), M / M.norm() * len(SPECTRUM) ** 0.5, atol=1e-10)
    inverted = U.mT @ freon(M, 0.5) @ V
    assert torch.all(torch.diff(torch.diagonal(inverted)) > 0)  # smallest sigma, largest step


def test_freon_update_has_muons_rms_on_a_gradient_sized_matrix():
    # Raw (S / ||S||_q)^(q-1) at q = 0.5 is ~rank^1.5 times Muon's scale: ~1000x at 768 x 768.
    G = torch.randn(768, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-3
    muon_rms = orthogonalize(G, "svd").square().mean().sqrt()
    assert freon(G, 0.5).square().mean().sqrt() / muon_rms == pytest.approx(1.0, rel=1e-6)


def kaon_scalar(x, iterations):
    """The Kaon map on one normalised singular value."""
    for _ in range(iterations):
        x = KAON_GAIN * x * (1.0 - x * x) ** 2
    return x / KAON_SCALE


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
    (mucon, {"threshold": 1.5}, "threshold"),
    (freon, {"schatten_q": -1.0}, "schatten_q"),
    (kaon, {"iterations": 0}, "iterations"),
])
def test_bad_rule_arguments_raise(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(torch.randn(3, 4), **kwargs)
