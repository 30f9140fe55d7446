"""Param-group options of MuonWithAdamW, each written once: the optimizer's own
in the dataclasses here, each update rule's in its options dataclass (rules/).
Defaults, checks, and the keys a group may set all come from these: a key a
group sets but does not read (another rule's option, a Muon option in an AdamW
group, ns_steps under orthogonalizer="svd", ...) is refused with its reason."""

import dataclasses
from dataclasses import dataclass

from .coefficients import NEWTON_SCHULZ_COEFFICIENTS, coefficient_schedule
from .layer_steps import layer_aware_ns_steps
from .muon_update import ADJUST_LR_FNS
from .orthogonalize import ORTHOGONALIZERS, orthogonalize, polynomial_schedule
from .rules import UPDATE_RULES
from .rules.registry import rule_owning
from .validation import (
    check_at_least,
    check_choice,
    check_count,
    check_flag,
    check_learning_rate,
    check_positive,
    check_unit_interval,
    frozen,
)


@dataclass(frozen=True)
class MuonOptions:
    """What every Muon group reads, whatever its rule (MuonWithAdamW's defaults)."""

    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0
    adjust_lr_fn: str | None = "original"
    flatten: bool = False
    update_rule: str = "orthogonalize"

    def __post_init__(self):
        check_learning_rate(self.lr)
        check_unit_interval("momentum", self.momentum)
        check_flag("nesterov", self.nesterov)
        check_at_least("weight_decay", self.weight_decay, 0.0)
        check_choice("adjust_lr_fn", self.adjust_lr_fn, ADJUST_LR_FNS)
        check_flag("flatten", self.flatten)
        check_choice("update_rule", self.update_rule, UPDATE_RULES)


@dataclass(frozen=True)
class PolarOptions:
    """The orthogonalizer of the rules that take a polar factor (`polar`)."""

    orthogonalizer: str = "newton_schulz"
    ns_steps: int = 5
    ns_coefficients: tuple = NEWTON_SCHULZ_COEFFICIENTS
    eps: float = 1e-7
    compile: bool = False
    layer_aware_steps: bool = False
    max_ns_steps: int = 10
    spectrum_every: int = 100

    def __post_init__(self):
        object.__setattr__(self, "ns_coefficients", frozen(self.ns_coefficients))  # hashable: plans key batches
        check_choice("orthogonalizer", self.orthogonalizer, ORTHOGONALIZERS)
        check_count("ns_steps", self.ns_steps)
        try:
            coefficient_schedule(self.ns_coefficients, self.ns_steps)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ns_coefficients: {error}") from None
        check_positive("eps", self.eps)
        check_flag("compile", self.compile)
        check_flag("layer_aware_steps", self.layer_aware_steps)
        check_count("max_ns_steps", self.max_ns_steps)
        check_count("spectrum_every", self.spectrum_every)

    @property
    def coefficients(self):
        """The group's quintic; Polar Express brings its own schedule."""
        return None if self.orthogonalizer == "polar_express" else self.ns_coefficients

    def polar(self, X, steps=None):
        return orthogonalize(X, self.orthogonalizer, steps or self.ns_steps, coefficients=self.coefficients,
                             eps=self.eps, compiled=self.compile)

    def measured_steps(self, M):
        """The layer-aware step count of M, counted with this orthogonalizer's own polynomials."""
        schedule, norm_scale = polynomial_schedule(self.orthogonalizer, self.max_ns_steps, self.coefficients)
        return layer_aware_ns_steps(M, coefficients=schedule, norm_scale=norm_scale, max_steps=self.max_ns_steps)

    def reads(self):
        """The options that change the result under this orthogonalizer."""
        if self.orthogonalizer == "svd":
            return {"orthogonalizer"}
        reads = {"orthogonalizer", "eps", "compile", "layer_aware_steps"}
        reads |= {"max_ns_steps", "spectrum_every"} if self.layer_aware_steps else {"ns_steps"}
        return reads if self.orthogonalizer == "polar_express" else reads | {"ns_coefficients"}


@dataclass(frozen=True)
class AdamWOptions:
    """What AdamW groups read; the optimizer's adamw_* arguments are their defaults."""

    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        check_adamw(self.lr, self.betas, self.eps, self.weight_decay)


def check_adamw(lr, betas, eps, weight_decay, prefix=""):
    """AdamW's options, named `prefix` + field (the optimizer's arguments are adamw_*)."""
    check_learning_rate(lr, prefix + "lr")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{prefix}betas must be a pair (beta1, beta2), got {betas!r}")
    check_unit_interval(f"{prefix}betas[0]", betas[0])
    check_unit_interval(f"{prefix}betas[1]", betas[1])
    check_positive(prefix + "eps", eps)
    check_at_least(prefix + "weight_decay", weight_decay, 0.0)


def names(options_class):
    return tuple(field.name for field in dataclasses.fields(options_class))


def pick(options_class, group):
    return options_class(**{name: group[name] for name in names(options_class)})


# AdamW groups may spell their options as the optimizer's arguments do.
ADAMW_ALIASES = {f"adamw_{name}": name for name in names(AdamWOptions)}
# Keys torch and its schedulers put in groups; nothing to check.
BOOKKEEPING = frozenset({"params", "param_names", "use_muon", "initial_lr"})
OPTIMIZER_ONLY = ("adamw_foreach", "process_group", "comm_dtype")


def muon_defaults():
    """Every Muon-side option and its default: the optimizer's, the
    orthogonalizer's and every registered rule's."""
    defaults = {field.name: field.default for cls in (MuonOptions, PolarOptions) for field in dataclasses.fields(cls)}
    for rule in UPDATE_RULES.values():
        defaults.update(rule.defaults())
    return defaults


def read_options(group):
    """The keys whose values change what a group's step does."""
    if not group["use_muon"]:
        return set(names(AdamWOptions))
    rule = UPDATE_RULES[group["update_rule"]]
    reads = set(names(MuonOptions)) | set(rule.option_names())
    if rule.uses_polar:
        reads |= pick(PolarOptions, group).reads()
    return reads


def unread_reason(key, group):
    """Why `key` has no effect on `group`, which does not read it."""
    if key in OPTIMIZER_ONLY:
        return f"{key} is an argument of the optimizer, not a param group option"
    if not group["use_muon"]:
        known = key in muon_defaults() or key in ADAMW_ALIASES
        if not known:
            return f"unknown param group option {key!r}"
        return f"{key} applies to Muon groups (use_muon=True); AdamW groups take {', '.join(names(AdamWOptions))}"
    rule = group["update_rule"]
    if key in ADAMW_ALIASES or key == "betas":
        return f"{key} applies to AdamW groups (use_muon=False)"
    owner = rule_owning(key)
    if owner is not None:
        return f"{key} is an option of update_rule={owner.name!r}, but this group's update_rule is {rule!r}"
    if key not in names(PolarOptions):
        return f"unknown param group option {key!r}"
    if not UPDATE_RULES[rule].uses_polar:
        return f"{key} has no effect with update_rule={rule!r}, which takes no polar factor"
    if group["orthogonalizer"] == "svd":
        return f"{key} has no effect with orthogonalizer='svd' (exact)"
    if key == "ns_coefficients":
        return "ns_coefficients has no effect with orthogonalizer='polar_express' (it brings its own schedule)"
    if key == "ns_steps":
        return "ns_steps has no effect with layer_aware_steps=True (the measured count, up to max_ns_steps, is used)"
    return f"{key} has no effect without layer_aware_steps=True"


def normalize_group(group, adamw_defaults):
    """Fill an AdamW group's defaults from adamw_* (and its adamw_* spellings).
    Returns the keys the caller set."""
    explicit = set(group) - BOOKKEEPING
    if group.get("use_muon") is False:
        for alias, name in ADAMW_ALIASES.items():
            if alias in group:
                if name in group:
                    raise ValueError(f"an AdamW group sets both {name} and {alias}; keep one")
                group[name] = group.pop(alias)
                explicit = (explicit - {alias}) | {name}
        for name, value in adamw_defaults.items():
            group.setdefault(name, value)
    return explicit


def check_group(group, explicit=()):
    """Raise ValueError/TypeError for the first bad option of a (defaults-filled)
    group, or for an `explicit` key the group does not read."""
    if not isinstance(group.get("use_muon"), bool):
        raise ValueError(
            "every param group must carry use_muon: bool (True: Muon matrices, False: AdamW), "
            f"got {group.get('use_muon')!r}"
        )
    if group["use_muon"]:
        pick(MuonOptions, group)
        pick(PolarOptions, group)
        UPDATE_RULES[group["update_rule"]].read_options(group)
    else:
        pick(AdamWOptions, group)
    reads = read_options(group)
    for key in sorted(explicit):
        if key not in reads:
            raise ValueError(unread_reason(key, group))
