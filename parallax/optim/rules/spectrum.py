"""Shared pieces of the rules that work on singular values directly: M = U S V^T
by SVD in float32 (float64 stays float64), and U f(S) V^T back in M's dtype."""

import torch


def work_dtype(M):
    return torch.float64 if M.dtype == torch.float64 else torch.float32


def svd(M):
    return torch.linalg.svd(M.to(work_dtype(M)), full_matrices=False)


def nonzero(S):
    """Mask of singular values above rounding level; the null space stays null."""
    tolerance = S.amax(dim=-1, keepdim=True) * max(S.size(-1), 1) * torch.finfo(S.dtype).eps
    return S > tolerance


def rebuild(U, new_S, Vh, like):
    return ((U * new_S.unsqueeze(-2)) @ Vh).to(like.dtype)
