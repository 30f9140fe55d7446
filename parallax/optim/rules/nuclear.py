"""The steepest-descent step under the spectral norm, ||M||_* U V^T ("A Note on
the Convergence of Muon and Further", Li and Hong, arXiv:2502.02900). The note's
other version, the exact polar factor, is update_rule="orthogonalize" with
orthogonalizer="svd"."""

from dataclasses import dataclass

from .registry import UpdateRule, register_update_rule
from .spectrum import nonzero, rebuild, svd


@dataclass(frozen=True)
class NuclearOptions:
    """No options: the step size is part of the rule (use a small lr)."""


def nuclear_scaled_polar(M):
    """argmax_{||D||_2 <= ||M||_*} <M, D> - ||D||_2^2 / 2 = ||M||_* U V^T, exact by SVD."""
    U, S, Vh = svd(M)
    nuclear = S.sum(dim=-1, keepdim=True)
    return rebuild(U, nonzero(S).to(S.dtype) * nuclear, Vh, M)


def direction(M, options, polar, step):
    return nuclear_scaled_polar(M)


register_update_rule(UpdateRule("nuclear", NuclearOptions, direction))
