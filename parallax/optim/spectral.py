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
    """MuCon's operator MClip_tau (Yi, arXiv:2605.26459): U min(S, tau) V^T, the
    Frobenius projection of M onto the spectral-norm ball of radius tau."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    U, S, Vh = _svd(M)
    return _rebuild(U, S.clamp(max=threshold), Vh, M)


def clip_by_polar(M, polar, threshold=1.0):
    """MClip_tau(M) without an SVD, from two polar factors (the paper's
    polar/absolute-value identity): with P = polar(M), min(s, tau) =
    (s + tau - |tau - s|) / 2 becomes (M + tau P - |tau P - M|) / 2, where
    |tau P - M| := U |tau - S| V^T = ((tau P - M) P^T) polar(tau P - M).
    `polar` maps [..., m, n] to its polar factor; near-threshold singular values
    make polar(tau P - M) inexact, but their error is at most |tau - s|."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    transposed = M.size(-2) > M.size(-1)
    X = M.mT if transposed else M  # wide: (tau P - M) P^T is the small Gram side
    P = polar(X)
    gap = threshold * P - X
    clipped = (X + threshold * P - (gap @ P.mT) @ polar(gap)) / 2
    return clipped.mT if transposed else clipped


def spectral_norm_estimate(M, iterations=30):
    """Largest singular value of each matrix of M by power iteration on the
    smaller Gram matrix (no SVD); a lower bound that converges like
    (s2 / s1)^(2 iterations)."""
    X = M.mT if M.size(-2) > M.size(-1) else M
    gram = X @ X.mT
    # A fixed, non-symmetric start: generic inputs are not orthogonal to it.
    v = torch.linspace(1.0, 2.0, gram.size(-1), dtype=gram.dtype, device=gram.device).expand(*gram.shape[:-1]).unsqueeze(-1)
    for _ in range(iterations):
        v = gram @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp(min=torch.finfo(gram.dtype).tiny)
    return (v.mT @ gram @ v).clamp(min=0).sqrt()[..., 0, 0]


def mucon(M, threshold=0.5, polar=None):
    """MuCon with a relative threshold: D = MClip_tau(M / s1) / tau, s1 = ||M||_2.

    The absolute tau of the paper depends on the gradient scale (at tau = 1 a
    momentum of spectral norm < 1 is returned unchanged: momentum SGD), so tau
    here is a fraction of s1: singular values below tau s1 keep their ratios,
    the larger ones are clipped, and the result has spectral norm 1 like Muon's
    U V^T (so the learning rate keeps its meaning). tau -> 0 is Muon, tau = 1 is
    M / s1. `polar`: None computes the clip by SVD; a polar-factor function
    (e.g. an orthogonalizer) uses the SVD-free `clip_by_polar`.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1] (a fraction of the spectral norm), got {threshold!r}")
    work_dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    X = M.to(work_dtype)
    scale = spectral_norm_estimate(X).clamp(min=torch.finfo(work_dtype).tiny)[..., None, None] * threshold
    X = X / scale
    clipped = clip_singular_values(X, 1.0) if polar is None else clip_by_polar(X, polar, 1.0)
    return clipped.to(M.dtype)


def spectral_power(M, power):
    """DynMuon's spectral shaping (Wu et al., arXiv:2605.17109): U S^p V^T,
    without rescaling (the paper's and its code's definition). Zero singular
    values stay zero for negative p."""
    U, S, Vh = _svd(M)
    keep = _nonzero(S)
    shaped = torch.where(keep, S.clamp(min=torch.finfo(S.dtype).tiny).pow(power), torch.zeros_like(S))
    return _rebuild(U, shaped, Vh, M)


# DynMuon's released code (github.com/fzwark/DynMuon, dynmuon/dynmuon.py):
# Logistic_Scheduler(p_max, p_min, tau_ratio, width_ratio) and the defaults of
# train_gpt.py / README (dynmuon_pmax=1.0, dynmuon_pmin=-0.25, dynmuon_tau=0.04,
# dynmuon_w=0.04).
DYNMUON_P_MAX = 1.0
DYNMUON_P_MIN = -0.25
DYNMUON_CENTER = 0.04
DYNMUON_WIDTH = 0.04
# dynmuon_spectral_transform in the same file: p >= 0.25 returns the momentum
# itself, 0 <= p < 0.25 its polar factor, p < 0 the shaped U S^p V^T.
DYNMUON_RAW_ABOVE = 0.25


def dynmuon_power(step, total_steps, p_max=DYNMUON_P_MAX, p_min=DYNMUON_P_MIN, center=DYNMUON_CENTER,
                  width=DYNMUON_WIDTH):
    """DynMuon's logistic schedule of the exponent at (1-based) `step`:
    p = p_min + (p_max - p_min) / (1 + exp((step / total_steps - center) / width)).
    With the defaults p is 0.66 at the start, crosses 0 at 9.5% of training and
    is within 1e-3 of p_min from 34% on."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1 for DynMuon, got {total_steps!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    u = (step / total_steps - center) / width
    anneal = 0.0 if u > 700 else 1.0 / (1.0 + math.exp(u))  # exp overflows past ~709
    return p_min + (p_max - p_min) * anneal


def dynmuon_direction(M, power, polar):
    """DynMuon's update for exponent `power` as its released code computes it:
    M itself for power >= 0.25, polar(M) for 0 <= power < 0.25, U S^power V^T
    (exact, by SVD; the code uses a second-order expansion) below 0."""
    if power >= DYNMUON_RAW_ABOVE:
        return M
    if power >= 0:
        return polar(M)
    return spectral_power(M, power)


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
    i.e. U (S / ||S||_q)^(q - 1) V^T, rescaled to the Frobenius norm sqrt(rank)
    of Muon's U V^T. q = 1 is Muon, q = 2 normalised SGD (times sqrt(rank)), and
    q < 1 inverts the spectrum (small singular values get the largest steps)."""
    if not schatten_q > 0:
        raise ValueError(f"schatten_q must be > 0, got {schatten_q!r}")
    U, S, Vh = _svd(M)
    keep = _nonzero(S)
    safe = torch.where(keep, S, torch.ones_like(S))
    schatten_norm = (safe.pow(schatten_q) * keep).sum(dim=-1, keepdim=True).pow(1.0 / schatten_q)
    shaped = (safe / schatten_norm.clamp(min=torch.finfo(S.dtype).tiny)).pow(schatten_q - 1.0) * keep
    # Muon's U V^T has Frobenius norm sqrt(rank); match it so one learning rate
    # means one step size (for q = 0.5 the raw scale grows like rank^1.5).
    rank = keep.sum(dim=-1, keepdim=True).to(S.dtype)
    shaped = shaped * (rank / shaped.square().sum(dim=-1, keepdim=True).clamp(min=torch.finfo(S.dtype).tiny)).sqrt()
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
                       coefficients=None, eps=1e-7, clip_threshold=0.5, power=0.0,
                       schatten_q=0.5, kaon_iterations=5, compiled=False):
    """The update direction of one matrix (or a batch [..., m, n]) under `rule`.

    "orthogonalize" and "normuon" use `orthogonalize(M, orthogonalizer, ns_steps)`
    (NorMuon's row normalisation is stateful and applied by the optimizer),
    "mucon" clips at `clip_threshold` times the spectral norm with the SVD-free
    polar formula (orthogonalizer "svd": exact), "dynmuon" shapes by `power`,
    "nuclear" is ||M||_* U V^T, "freon" uses `schatten_q`, "kaon" `kaon_iterations`.
    """
    def polar(X):
        return orthogonalize(X, orthogonalizer, ns_steps, coefficients=coefficients, eps=eps, compiled=compiled)

    if M.numel() == 0:  # an empty matrix (or batch) has an empty direction under every rule
        return torch.zeros_like(M)
    if rule in ("orthogonalize", "normuon"):
        return polar(M)
    if rule == "mucon":
        # The identity needs true polar factors, which Jordan's quintic does not
        # converge to (its singular values stay in ~[0.7, 1.2]): Polar Express
        # unless "svd" is asked for, in float32 since the clip subtracts.
        method = "svd" if orthogonalizer == "svd" else "polar_express"
        return mucon(M, clip_threshold, lambda X: orthogonalize(X, method, ns_steps, eps=eps,
                                                                compute_dtype=torch.float32))
    if rule == "dynmuon":
        return dynmuon_direction(M, power, polar)
    if rule == "nuclear":
        return nuclear_scaled_polar(M)
    if rule == "freon":
        return freon(M, schatten_q)
    if rule == "kaon":
        return kaon(M, kaon_iterations)
    raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {rule!r}")
