"""The registry of update rules. A rule is an options dataclass and a direction
function; `register_update_rule` adds it under its name, and the optimizer reads everything
else (defaults, checks, which param-group keys a group may set, state kept
float32 and on a matrix's owner) from the `UpdateRule`."""

import dataclasses
from typing import Callable, NamedTuple

# Param-group keys and arguments of the optimizer itself (options.py, which
# imports the rules, so cannot be imported here; tests/optim/test_muon_rules.py
# checks the two agree); a rule may not declare them.
RESERVED_OPTIONS = frozenset({
    "params", "param_names", "use_muon", "initial_lr", "lr", "momentum", "nesterov", "weight_decay",
    "adjust_lr_fn", "flatten", "update_rule", "orthogonalizer", "ns_steps", "ns_coefficients", "eps", "compile",
    "layer_aware_steps", "max_ns_steps", "spectrum_every", "betas",
    "adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay", "adamw_foreach", "process_group", "comm_dtype",
})


class UpdateRule(NamedTuple):
    """One update rule.

    options: a frozen dataclass; its fields are param-group keys (each with its
        default), and its __post_init__ raises ValueError/TypeError naming a bad one.
    direction(M, options, polar, step): the direction of a batch M [..., m, n]
        (same shape and dtype). `polar(X)` is the group's orthogonalizer and
        `step` the 1-based step count of the matrices in M.
    uses_polar: whether `direction` calls `polar`, so the group's orthogonalizer
        options (orthogonalizer, ns_steps, ...) apply to this rule.
    transform(D, options, state): an optional per-parameter second stage that
        keeps its own tensors in the parameter's optimizer `state`.
    state_keys: the keys `transform` keeps in `state` (float32; under a process
        group only the matrix's owner holds them).
    """

    name: str
    options: type
    direction: Callable
    uses_polar: bool = False
    transform: Callable | None = None
    state_keys: tuple = ()

    def option_names(self):
        return tuple(field.name for field in dataclasses.fields(self.options))

    def defaults(self):
        return {field.name: field.default for field in dataclasses.fields(self.options)}

    def read_options(self, group):
        """The rule's options from a param group (checked by the dataclass)."""
        return self.options(**{name: group[name] for name in self.option_names()})


UPDATE_RULES = {}


def register_update_rule(rule):
    """Add `rule` to UPDATE_RULES; its option names must be its own."""
    if not (dataclasses.is_dataclass(rule.options) and rule.options.__dataclass_params__.frozen):
        raise TypeError(f"rule {rule.name!r}: options must be a frozen dataclass")
    if rule.name in UPDATE_RULES:
        raise ValueError(f"update rule {rule.name!r} is already registered")
    for name in rule.option_names():
        owner = next((other.name for other in UPDATE_RULES.values() if name in other.option_names()), None)
        if name in RESERVED_OPTIONS or owner is not None:
            raise ValueError(f"rule {rule.name!r}: option {name!r} already belongs to "
                             f"{'the optimizer' if owner is None else f'rule {owner!r}'}")
    UPDATE_RULES[rule.name] = rule
    return rule


def rule_owning(option):
    """The registered rule that declares `option`, or None."""
    return next((rule for rule in UPDATE_RULES.values() if option in rule.option_names()), None)
