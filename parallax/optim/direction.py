"""The direction of a Muon matrix from its group's options: which rule, with
which options, which orthogonalizer and step count (`DirectionPlan`)."""

import dataclasses
from typing import NamedTuple

import torch

from .muon_update import momentum_step
from .options import PolarOptions, check_group, muon_defaults, pick
from .rules import UPDATE_RULES


class DirectionPlan(NamedTuple):
    """Everything the direction of one matrix depends on; hashable, so the
    optimizer stacks the matrices that share a plan (and a shape) into one call."""

    rule: object
    options: object
    polar: PolarOptions
    step: int

    def direction(self, M):
        if M.numel() == 0:  # an empty matrix (or batch) has an empty direction under every rule
            return torch.zeros_like(M)
        return self.rule.direction(M, self.options, self.polar.polar, self.step)

    def finish(self, direction, state):
        """The rule's per-parameter stage (NorMuon's row normalisation), which
        updates its tensors in `state`."""
        return direction if self.rule.transform is None else self.rule.transform(direction, self.options, state)


def plan_for(group, state):
    """The plan of a Muon parameter with optimizer `state` in `group` (its
    layer-aware step count, when measured, replaces ns_steps)."""
    rule = UPDATE_RULES[group["update_rule"]]
    polar = pick(PolarOptions, group)
    if "ns_steps" in state:
        polar = dataclasses.replace(polar, ns_steps=state["ns_steps"])
    return DirectionPlan(rule, rule.read_options(group), polar, state.get("step", 1))


def spectral_direction(M, rule="orthogonalize", *, step=1, **options):
    """The direction of one matrix (or a batch [..., m, n]) under update rule
    `rule` at the 1-based `step`, as the optimizer computes it; `options` are
    param-group options (orthogonalizer, ns_steps, clip_threshold, ...), the
    rest keep MuonWithAdamW's defaults. A stateful rule's second stage
    (NorMuon's row normalisation) needs optimizer state and is not applied."""
    group = {**muon_defaults(), **options, "update_rule": rule, "use_muon": True}
    check_group(group, explicit=options)
    return plan_for(group, {"step": step}).direction(M)


def muon_update(grad, momentum_buffer, *, momentum=0.95, nesterov=True, rule="orthogonalize", step=1, **options):
    """Momentum (in place on `momentum_buffer`) then `spectral_direction`."""
    return spectral_direction(momentum_step(grad, momentum_buffer, momentum, nesterov), rule, step=step, **options)
