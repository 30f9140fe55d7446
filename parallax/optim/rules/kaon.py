"""Kaon (Shumaylov et al., arXiv:2605.11181): a chaotic map of the singular
values ("random spectrum") that keeps the singular vectors."""

from dataclasses import dataclass

from ..validation import check_count
from .registry import UpdateRule, register_update_rule
from .spectrum import work_dtype

KAON_GAIN = 4.1
KAON_SCALE = 1.175


@dataclass(frozen=True)
class KaonOptions:
    """kaon_iterations: T, the number of map iterations (5 is parallax's choice)."""

    kaon_iterations: int = 5

    def __post_init__(self):
        check_count("kaon_iterations", self.kaon_iterations)


def kaon(M, iterations=5):
    """X_0 = M / ||M||_F, X_k = 4.1 (I - X X^T)^2 X, output X_T / 1.175: each
    singular value follows x -> 4.1 x (1 - x^2)^2."""
    check_count("iterations", iterations)
    X = M.to(work_dtype(M))
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-30)
    for _ in range(iterations):
        residual = -(X @ X.mT)
        residual.diagonal(dim1=-2, dim2=-1).add_(1.0)
        X = KAON_GAIN * (residual @ (residual @ X))
    return (X / KAON_SCALE).to(M.dtype)


def direction(M, options, polar, step):
    return kaon(M, options.kaon_iterations)


register_update_rule(UpdateRule("kaon", KaonOptions, direction))
