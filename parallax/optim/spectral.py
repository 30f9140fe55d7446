"""Spectral update rules: maps M = U S V^T -> U f(S) V^T that replace Muon's
U V^T. Each function takes [..., m, n] and keeps the singular vectors of M."""

import math

import torch

from .orthogonalize import orthogonalize


def _svd(M):
    work_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    return torch.linalg.svd(M.to(work_dtype), full_matrices=False)


def _nonzero(S):
    """Mask of singular values above rounding level; the null space stays null."""
    tolerance = S.amax(dim=-1, keepdim=True) * max(S.size(-1), 1) * torch.finfo(S.dtype).eps
    return S > tolerance


def _rebuild(U, new_S, Vh, like):
    return ((U * new_S.unsqueeze(-2)) @ Vh).to(like.dtype)


def clip_singular_values(M, threshold=1.0):
    """MuCon (Yi, arXiv:2605.26459): U min(S, tau) V^T, the Frobenius projection
    of M onto the spectral-norm ball of radius tau."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    U, S, Vh = _svd(M)
    return _rebuild(U, S.clamp(max=threshold), Vh, M)


def spectral_power(M, power):
    """DynMuon's spectral shaping (Wu et al., arXiv:2605.17109): U S^p V^T.

    The result is rescaled to the Frobenius norm of U V^T (sqrt(rank)), so p = 0
    is exactly Muon and the learning rate keeps its meaning for every p; zero
    singular values stay zero for negative p.
    """
    U, S, Vh = _svd(M)
    keep = _nonzero(S)
    shaped = torch.where(keep, S.clamp(min=torch.finfo(S.dtype).tiny).pow(power), torch.zeros_like(S))
    rank = keep.sum(dim=-1, keepdim=True).clamp(min=1)
    rms = (shaped.square().sum(dim=-1, keepdim=True) / rank).sqrt().clamp(min=torch.finfo(S.dtype).tiny)
    return _rebuild(U, shaped / rms, Vh, M)


def dynmuon_power(step, total_steps, start=1.0, end=-0.25, sharpness=10.0):
    """Sigmoid schedule of DynMuon's exponent: exactly `start` at step 0, exactly
    `end` at `total_steps`, and the midpoint of the two at total_steps / 2."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1 for DynMuon, got {total_steps!r}")
    if not sharpness > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness!r}")
    progress = min(max(step / total_steps, 0.0), 1.0)

    def sigmoid(x):
        return 1.0 / (1.0 + math.exp(-x))

    low, high = sigmoid(-sharpness / 2), sigmoid(sharpness / 2)
    remaining = (sigmoid(sharpness * (0.5 - progress)) - low) / (high - low)
    return end + (start - end) * remaining


def nuclear_scaled_polar(M):
    """Steepest descent under the spectral norm: argmax_{||D||_2 <= ||M||_*} <M, D>
    - ||D||_2^2 / 2 = ||M||_* U V^T ("A Note on the Convergence of Muon and
    Further", arXiv:2502.02900). The exact polar factor variant is
    orthogonalize(M, "svd")."""
    U, S, Vh = _svd(M)
    nuclear = S.sum(dim=-1, keepdim=True)
    return _rebuild(U, _nonzero(S).to(S.dtype) * nuclear, Vh, M)


def freon(M, schatten_q=0.5):
    """Freon (Shumaylov et al., arXiv:2605.11181): steepest descent under the
    Schatten-q (quasi-)norm, (G G^T)^(-c) G with G = M / ||M||_{S_q}, c = 1 - q/2,
    i.e. U (S / ||S||_q)^(q - 1) V^T. q = 1 is Muon, q = 2 normalised SGD, and
    q < 1 inverts the spectrum (small singular values get the largest steps)."""
    if not schatten_q > 0:
        raise ValueError(f"schatten_q must be > 0, got {schatten_q!r}")
    U, S, Vh = _svd(M)
    keep = _nonzero(S)
    safe = torch.where(keep, S, torch.ones_like(S))
    schatten_norm = (safe.pow(schatten_q) * keep).sum(dim=-1, keepdim=True).pow(1.0 / schatten_q)
    shaped = (safe / schatten_norm.clamp(min=torch.finfo(S.dtype).tiny)).pow(schatten_q - 1.0) * keep
    return _rebuild(U, shaped, Vh, M)


KAON_GAIN = 4.1
KAON_SCALE = 1.175


def kaon_scalar(x, iterations):
    """The Kaon map on one normalised singular value, for checking `kaon`."""
    for _ in range(iterations):
        x = KAON_GAIN * x * (1.0 - x * x) ** 2
    return x / KAON_SCALE


def kaon(M, iterations=5):
    """Kaon (Shumaylov et al., arXiv:2605.11181): X_0 = M / ||M||_F,
    X_k = 4.1 (I - X X^T)^2 X, output X_T / 1.175. The chaotic scalar map
    x -> 4.1 x (1 - x^2)^2 scrambles the singular values ("random spectrum")
    while keeping the singular vectors."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    work_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    X = M.to(work_dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-30)
    for _ in range(iterations):
        residual = -(X @ X.mT)
        residual.diagonal(dim1=-2, dim2=-1).add_(1.0)
        X = KAON_GAIN * (residual @ (residual @ X))
    return (X / KAON_SCALE).to(M.dtype)


def neuron_normalize(O, second_moment, beta2=0.95, eps=1e-8):
    """NorMuon (Li et al., arXiv:2510.05491): per-row (output neuron) second
    moment v <- beta2 v + (1 - beta2) mean_cols(O^2), O_hat = O / (sqrt(v) + eps),
    rescaled to the Frobenius norm of O so Muon's learning-rate scaling (and
    match_rms_adamw's 0.2 sqrt(max(m, n))) applies unchanged. Updates
    `second_moment` (shape [..., m]) in place."""
    second_moment.lerp_(O.square().mean(dim=-1).to(second_moment.dtype), 1 - beta2)
    normalized = O / (second_moment.sqrt().unsqueeze(-1) + eps)
    scale = O.norm(dim=(-2, -1), keepdim=True) / normalized.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    return normalized * scale


UPDATE_RULES = ("orthogonalize", "mucon", "dynmuon", "nuclear", "freon", "kaon", "normuon")


def spectral_direction(M, rule="orthogonalize", *, orthogonalizer="newton_schulz", ns_steps=5,
                       coefficients=None, eps=1e-7, clip_threshold=1.0, power=0.0,
                       schatten_q=0.5, kaon_iterations=5):
    """The update direction of one matrix (or a batch) under `rule`.

    "orthogonalize" and "normuon" use `orthogonalize(M, orthogonalizer, ns_steps)`
    (NorMuon's row normalisation is stateful and applied by the optimizer),
    "mucon" clips at `clip_threshold`, "dynmuon" raises S to `power`, "nuclear"
    is ||M||_* U V^T, "freon" uses `schatten_q`, "kaon" `kaon_iterations`.
    """
    if rule in ("orthogonalize", "normuon"):
        return orthogonalize(M, orthogonalizer, ns_steps, coefficients=coefficients, eps=eps)
    if rule == "mucon":
        return clip_singular_values(M, clip_threshold)
    if rule == "dynmuon":
        return spectral_power(M, power)
    if rule == "nuclear":
        return nuclear_scaled_polar(M)
    if rule == "freon":
        return freon(M, schatten_q)
    if rule == "kaon":
        return kaon(M, kaon_iterations)
    raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {rule!r}")
