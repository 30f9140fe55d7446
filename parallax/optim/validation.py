"""Checks of optimizer hyper-parameters; each error names the argument."""

import math
import numbers

import torch

from .coefficients import coefficient_schedule
from .muon_update import ADJUST_LR_FNS
from .orthogonalize import ORTHOGONALIZERS
from .spectral import UPDATE_RULES


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _at_least(name, value, low):
    _number(name, value)
    if not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _learning_rate(name, value):
    """A number or a 1-element tensor (torch's optimizers accept both)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"a tensor {name} must hold one floating-point value, got shape {tuple(value.shape)}, "
                             f"dtype {value.dtype}")
        value = value.item()
    _at_least(name, value, 0.0)


def _positive(name, value):
    _number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _unit_interval(name, value):
    _number(name, value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _count(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _frozen(value):
    """Nested lists -> nested tuples, so options can key a batch of matrices."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def validate_process_group(process_group, comm_dtype):
    if process_group is not None:
        import torch.distributed as dist

        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
    if comm_dtype is not None and not (isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point):
        raise TypeError(f"comm_dtype must be a floating-point torch.dtype or None, got {comm_dtype!r}")


def validate_group(group):
    """Raise ValueError/TypeError for the first bad hyper-parameter of a group."""
    if not isinstance(group.get("use_muon"), bool):
        raise ValueError(
            "every param group must carry use_muon: bool (True: Muon matrices, False: AdamW), "
            f"got {group.get('use_muon')!r}"
        )
    adamw = "" if group["use_muon"] else "adamw_"  # AdamW groups take these from adamw_lr, ...
    _learning_rate(adamw + "lr", group["lr"])
    _at_least(adamw + "weight_decay", group["weight_decay"], 0.0)
    _positive(adamw + "eps", group["eps"])
    if group["use_muon"]:
        _unit_interval("momentum", group["momentum"])
        _count("ns_steps", group["ns_steps"])
        _choice("orthogonalizer", group["orthogonalizer"], ORTHOGONALIZERS)
        _choice("update_rule", group["update_rule"], UPDATE_RULES)
        _choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
        group["ns_coefficients"] = _frozen(group["ns_coefficients"])
        try:
            coefficient_schedule(group["ns_coefficients"], group["ns_steps"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"ns_coefficients: {error}") from None
        _flag("nesterov", group["nesterov"])
        _flag("flatten", group["flatten"])
        _flag("compile", group["compile"])
        _flag("layer_aware_steps", group["layer_aware_steps"])
        _number("clip_threshold", group["clip_threshold"])
        if not 0 < group["clip_threshold"] <= 1:
            raise ValueError("clip_threshold must be in (0, 1] (a fraction of the momentum's spectral norm), "
                             f"got {group['clip_threshold']!r}")
        _positive("schatten_q", group["schatten_q"])
        _count("kaon_iterations", group["kaon_iterations"])
        _unit_interval("normuon_beta2", group["normuon_beta2"])
        _positive("normuon_eps", group["normuon_eps"])
        _count("max_ns_steps", group["max_ns_steps"])
        _count("spectrum_every", group["spectrum_every"])
        for name in ("dynmuon_p_max", "dynmuon_p_min", "dynmuon_center"):
            _number(name, group[name])
        _positive("dynmuon_width", group["dynmuon_width"])
        if group["update_rule"] == "dynmuon":
            if group["total_steps"] is None:
                raise ValueError("total_steps is required by update_rule='dynmuon' (its power schedule spans training)")
            _count("total_steps", group["total_steps"])
    else:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {betas!r}")
        _unit_interval("adamw_betas[0]", betas[0])
        _unit_interval("adamw_betas[1]", betas[1])
