"""Muon's own rule (Jordan et al., 2024): the polar factor U V^T of the momentum,
by the group's orthogonalizer (`parallax.optim.orthogonalize`)."""

from dataclasses import dataclass

from .registry import UpdateRule, register_update_rule


@dataclass(frozen=True)
class PolarRuleOptions:
    """No options of its own: the orthogonalizer options of the group apply."""


def direction(M, options, polar, step):
    return polar(M)


register_update_rule(UpdateRule("orthogonalize", PolarRuleOptions, direction, uses_polar=True))
