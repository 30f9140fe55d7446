"""Layer-aware Newton-Schulz step counts.

"Spectral Scaling Laws of Muon" (Magakyan, Parrilo, Ozdaglar, arXiv:2606.04058)
finds that the small singular-value quantiles of each layer's momentum settle at
a layer- and size-dependent level, and that a fixed NS step count leaves layers
whose quantiles are small un-orthogonalised. We measure that quantile instead of
extrapolating the paper's power laws: NS first divides M by ||M||_F, so the
quantile enters the iteration as x = sigma_q / ||M||_F (which shrinks like
1/sqrt(min(m, n)) for a flat spectrum: the shape dependence), and we take the
fewest steps whose scalar polynomials carry x up to `target` and the whole
measured spectrum to an RMS of at least RMS_FLOOR (never a silently smaller step).
"""

import torch

from .coefficients import NEWTON_SCHULZ_COEFFICIENTS, apply_polynomial, coefficient_schedule

# Jordan's quintic climbs into its band [0.68, 1.13] from below and then
# oscillates in it, so the first step that lifts the quantile to `target`
# often leaves the whole spectrum near 0.69 (a flat spectrum: 2 steps, a step
# 35% smaller than 5 steps give). A count is enough only when, in addition, the
# RMS of all mapped singular values reaches this fraction of U V^T's (1).
RMS_FLOOR = 0.85


def _fewest_steps(x, spectrum, target, rms_floor, coefficients, min_steps, max_steps):
    """Fewest steps in [min_steps, max_steps] after which the polynomials lift
    x to `target` and the RMS of `spectrum` (a tensor, or None) to `rms_floor`."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    if not isinstance(min_steps, int) or not isinstance(max_steps, int) or not 1 <= min_steps <= max_steps:
        raise ValueError(f"need integers 1 <= min_steps <= max_steps, got {min_steps!r}, {max_steps!r}")
    for steps, triple in enumerate(coefficient_schedule(coefficients, max_steps), start=1):
        x = apply_polynomial(x, triple)
        if spectrum is not None:
            spectrum = apply_polynomial(spectrum, triple)
        if steps >= min_steps and x >= target and (spectrum is None or spectrum.square().mean().sqrt() >= rms_floor):
            return steps
    return max_steps


def steps_to_reach(x, target=0.6, coefficients=NEWTON_SCHULZ_COEFFICIENTS, min_steps=1, max_steps=10):
    """Fewest steps in [min_steps, max_steps] after which the NS polynomials
    lift the normalised singular value x to at least `target`."""
    return _fewest_steps(x, None, target, None, coefficients, min_steps, max_steps)


def layer_aware_ns_steps(M, quantile=0.1, target=0.6, coefficients=NEWTON_SCHULZ_COEFFICIENTS,
                         min_steps=1, max_steps=10, norm_scale=1.0, rms_floor=RMS_FLOOR):
    """NS step count for matrix M (or the most demanding matrix of a batch
    [..., m, n]) from its measured spectrum (see module doc).

    quantile: which singular value must be orthogonalised, as a quantile of the
    nonzero singular values (0.1 = the 10th percentile from the bottom), up to
    `target`; rms_floor: the RMS all mapped singular values must reach (RMS_FLOOR).
    coefficients, norm_scale: the orthogonalizer's own schedule and the factor
    on ||M||_F in its normalisation (`orthogonalize.polynomial_schedule`), so
    Polar Express is counted with Polar Express's polynomials.
    """
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    matrices = M.detach().reshape(-1, *M.shape[-2:]).float()
    steps = min_steps
    for S in torch.linalg.svdvals(matrices).double():
        frobenius = S.norm()
        nonzero = S[S > S.max() * max(M.shape[-2:]) * torch.finfo(torch.float32).eps] if frobenius > 0 else S[:0]
        if nonzero.numel() == 0:
            continue
        spectrum = nonzero / (frobenius * norm_scale)
        x = torch.quantile(spectrum, quantile).item()
        steps = max(steps, _fewest_steps(x, spectrum, target, rms_floor, coefficients, min_steps, max_steps))
    return steps
