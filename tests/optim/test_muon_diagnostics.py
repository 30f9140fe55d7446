import pytest
import torch
from torch import nn

from parallax.optim import (
    MuonWithAdamW,
    muon_diagnostics,
    normalized_directional_sharpness,
    orthogonality_error,
    orthogonalize,
    singular_value_quantiles,
    update_rms,
)


def test_update_rms():
    assert update_rms(torch.full((3, 4), -2.0)).item() == pytest.approx(2.0)


def test_orthogonality_error_is_zero_for_polar_factor_and_grows_with_distortion(matrix_with_spectrum):
    M, U, V = matrix_with_spectrum(6, 10, [3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    assert orthogonality_error(U @ V.mT).item() == pytest.approx(0.0, abs=1e-6)
    assert orthogonality_error((U @ V.mT).mT).item() == pytest.approx(0.0, abs=1e-6)
    ns_error = orthogonality_error(orthogonalize(M, "newton_schulz", 5, compute_dtype=torch.float64))
    assert 0 < ns_error < orthogonality_error(M / M.norm())


def test_singular_value_quantiles_of_known_spectrum(matrix_with_spectrum):
    M, _, _ = matrix_with_spectrum(5, 9, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert torch.allclose(singular_value_quantiles(M, (0.0, 0.5, 1.0)), torch.tensor([1.0, 3.0, 5.0]), atol=1e-5)


def test_nds_of_quadratic_is_rayleigh_quotient():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A @ A.mT
    x = nn.Parameter(torch.randn(6, dtype=torch.float64))
    d = torch.randn(6, dtype=torch.float64)
    nds = normalized_directional_sharpness(lambda: 0.5 * x @ A @ x, [x], [d])
    assert nds.item() == pytest.approx((d @ A @ d / (d @ d)).item())
    with pytest.raises(ValueError, match="directions"):
        normalized_directional_sharpness(lambda: x.sum(), [x], [])


def test_muon_diagnostics_reports_every_muon_matrix(tiny_lm, token_batches, loss_of):
    model = tiny_lm()
    optimizer = MuonWithAdamW.from_model(model, lr=0.02, adjust_lr_fn="match_rms_adamw", orthogonalizer="svd")
    (tokens,) = token_batches(1)
    loss_of(model, tokens).backward()
    optimizer.step()
    report = muon_diagnostics(optimizer, loss_fn=lambda: loss_of(model, tokens))
    shapes = [entry["shape"] for entry in report["matrices"]]
    assert shapes == [tuple(model.up.weight.shape), tuple(model.down.weight.shape)]
    for entry, p in zip(report["matrices"], (model.up.weight, model.down.weight)):
        # Exact U V^T of rank r scaled by match_rms_adamw: RMS 0.2 lr sqrt(r / min(m, n)).
        rank = torch.linalg.matrix_rank(optimizer.state[p]["momentum_buffer"]).item()
        assert entry["update_rms"] == pytest.approx(0.2 * 0.02 * (rank / min(p.shape)) ** 0.5, rel=1e-4)
        # Its O O^T is the identity on the rank-r range only: error sqrt((k - r) / k).
        assert entry["orthogonality_error"] == pytest.approx(((min(p.shape) - rank) / min(p.shape)) ** 0.5, abs=1e-5)
        assert entry["singular_value_quantiles"] == sorted(entry["singular_value_quantiles"])
    assert isinstance(report["nds"], float)
