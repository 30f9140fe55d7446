"""Orthogonalization of matrices: the map G = U S V^T  ->  U V^T (or a close
approximation of it) that Muon applies to every momentum matrix."""

import functools
import sys

import torch

from .coefficients import (
    MAX_STEPS,
    NEWTON_SCHULZ_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    POLAR_EXPRESS_SAFETY,
    coefficient_schedule,
)

ORTHOGONALIZERS = ("svd", "newton_schulz", "polar_express", "gram_newton_schulz")
# Gram Newton-Schulz iterates in float16 when half precision is asked for:
# bfloat16's 8-bit mantissa lets X X^T drift until restarts cannot save it
# (Dao-AILab/gram-newton-schulz casts to float16 after a float32 normalisation).
GRAM_HALF_DTYPE = torch.float16


def polynomial_schedule(method, steps, coefficients=None):
    """(per-step (a, b, c) tuples, input scale) of a polynomial orthogonalizer.

    The input scale multiplies ||X||_F in the normalisation: Polar Express
    divides by 1.01 ||X||_F (Amsel et al., Algorithm 1), the others by ||X||_F.
    Layer-aware step counts use this too, so they follow the group's own schedule.
    """
    if method == "polar_express":
        return coefficient_schedule(coefficients or POLAR_EXPRESS_COEFFICIENTS, steps), POLAR_EXPRESS_SAFETY
    return coefficient_schedule(coefficients or NEWTON_SCHULZ_COEFFICIENTS, steps), 1.0


def orthogonalize(
    G,
    method="newton_schulz",
    steps=5,
    *,
    coefficients=None,
    eps=1e-7,
    compute_dtype=torch.bfloat16,
    gram_restarts=None,
    compiled=False,
):
    """Approximate the polar factor U V^T of G (shape [..., m, n]).

    method: "svd" (exact), "newton_schulz" (quintic iteration of torch.optim.Muon),
        "polar_express" (per-step optimal coefficients, arXiv:2505.16932) or
        "gram_newton_schulz" (the same iteration run on X X^T, Dao AI Lab 2026).
    steps: iterations of the polynomial methods (ignored by "svd").
    coefficients: one (a, b, c) tuple or one per step; defaults to the method's own.
    eps: floor of the Frobenius norm used to scale G, so a zero matrix maps to zeros.
    compute_dtype: dtype of the iterations (bf16 as torch.optim.Muon; None keeps G's).
        Gram Newton-Schulz normalises in float32 and runs half precision as float16.
    gram_restarts: iterations after which Gram Newton-Schulz rebuilds X X^T from X
        (default: after iteration 2, then every 3rd).
    compiled: run the Newton-Schulz iteration through torch.compile.
    Returns a tensor of G's shape and dtype.
    """
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(f"G must have shape [..., m, n] with at least 2 dims, got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
    if method not in ORTHOGONALIZERS:
        raise ValueError(f"method must be one of {ORTHOGONALIZERS}, got {method!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS}], got {steps!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= sys.float_info.max:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    eps = float(eps)  # an int past int64 would not reach torch
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype must be None or a floating-point torch.dtype, got {compute_dtype!r}")
    if G.numel() == 0:  # an empty matrix (or batch) has an empty polar factor
        return torch.zeros_like(G)

    # Iterate on the wide orientation so X X^T is the smaller Gram matrix.
    transposed = G.size(-2) > G.size(-1)
    X = G.mT if transposed else G
    batch_shape = X.shape[:-2]
    if X.ndim > 3:
        X = X.flatten(0, -3)

    if method == "svd":
        O = _svd_polar(X)
    else:
        dtype = compute_dtype or G.dtype
        schedule, norm_scale = polynomial_schedule(method, steps, coefficients)
        restarts = frozenset(range(2, steps, 3) if gram_restarts is None else gram_restarts)
        if method == "gram_newton_schulz" and _gram_is_cheaper(X.size(-2), X.size(-1), steps, restarts):
            half = dtype in (torch.float16, torch.bfloat16)
            X = _normalize(X.float() if half else X.to(dtype), eps, norm_scale)
            O = _gram_newton_schulz(X.to(GRAM_HALF_DTYPE) if half else X, schedule, restarts)
        else:
            iterate = _compiled_newton_schulz() if compiled else newton_schulz
            O = iterate(_normalize(X.to(dtype), eps, norm_scale), schedule)

    O = O.reshape(*batch_shape, *O.shape[-2:])
    return (O.mT if transposed else O).to(G.dtype)


def _frobenius_norm(X):
    # The plain 2-D reduction is the one torch.optim.Muon uses; keep it for bit-exactness.
    return X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)


def _normalize(X, eps, scale):
    """Scale X so its spectral norm is at most 1 (Frobenius norm bounds it)."""
    norm = _frobenius_norm(X)
    if scale != 1.0:
        norm = norm * scale
    return X.div(norm.clamp(min=eps))


def _fused_matmul(bias, left, right, *, beta, alpha=1.0):
    """beta * bias + alpha * left @ right in one kernel, 2-D or batched."""
    if left.ndim == 2:
        return torch.addmm(bias, left, right, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, left, right, beta=beta, alpha=alpha)


def newton_schulz_step(X, a, b, c):
    """X <- a X + b (X X^T) X + c (X X^T)^2 X on an already normalised X (2-D or
    batched), in the exact operation order of torch.optim.Muon."""
    gram = X @ X.mT
    gram_update = _fused_matmul(gram, gram, gram, beta=b, alpha=c)
    return _fused_matmul(X, gram_update, X, beta=a)


def newton_schulz(X, schedule):
    """Run newton_schulz_step once per (a, b, c) of `schedule`."""
    for a, b, c in schedule:
        X = newton_schulz_step(X, a, b, c)
    return X


@functools.cache
def _compiled_newton_schulz():
    # Built on first use: importing the optimizer must not start the compiler.
    return torch.compile(newton_schulz, fullgraph=True, dynamic=False)


def _gram_newton_schulz(X, schedule, restarts):
    """Newton-Schulz on R = X X^T (m x m) instead of X (m x n).

    Each step is X <- W X with W = a I + b R + c R^2, a polynomial in R, so the
    product Q of all W is accumulated on the small matrix and applied to X once;
    R follows as W R W. In half precision R drifts from Q X (Q X)^T, so at the
    `restarts` iterations X is rebuilt as Q X and R recomputed from it.
    """
    R = X @ X.mT
    Q = None
    last = len(schedule)
    for t, (a, b, c) in enumerate(schedule, start=1):
        W = _fused_matmul(R, R, R, beta=b, alpha=c)
        W.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = W if Q is None else Q @ W
        if t == last:
            break
        if t in restarts:
            X = Q @ X
            R = X @ X.mT
            Q = None
        else:
            R = W @ (R @ W)
    return X if Q is None else Q @ X


def _gram_is_cheaper(rows, cols, steps, restarts):
    """Compare matmul flops of the two equal iterations (rows <= cols).

    Newton-Schulz: per step X X^T and (.) X cost rows^2 cols each, the square
    product rows^3. Gram: X X^T and the final Q X, plus two rows^2 cols products
    per restart; per step one rows^3 for R^2, one for Q W (none right after a
    (re)start) and two for W R W (none before a restart or at the end). For
    near-square matrices the extra rows^3 products outweigh the savings.
    """
    plain = steps * (2 * rows * rows * cols + rows**3)
    gram = (2 + 2 * len([t for t in restarts if t < steps])) * rows * rows * cols
    fresh = True
    for t in range(1, steps + 1):
        gram += rows**3 * (1 + (not fresh))
        fresh = t in restarts
        if t < steps and not fresh:
            gram += 2 * rows**3
    return gram < plain


def _svd_polar(X):
    """Exact U V^T; singular values at rounding level count as zero, so rank-
    deficient inputs (and the zero matrix) keep their null space at zero."""
    work_dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(X.to(work_dtype), full_matrices=False)
    tolerance = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(work_dtype).eps
    keep = (S > tolerance).to(work_dtype)
    return (U * keep.unsqueeze(-2)) @ Vh
