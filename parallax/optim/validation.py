"""Checks of optimizer hyper-parameters; each error names the argument."""

import math
import numbers

import torch


def check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_at_least(name, value, low):
    check_number(name, value)
    if not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def check_learning_rate(value, name="lr"):
    """A number or a 1-element tensor (torch's optimizers accept both)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"a tensor {name} must hold one floating-point value, got shape {tuple(value.shape)}, "
                             f"dtype {value.dtype}")
        value = value.item()
    check_at_least(name, value, 0.0)


def check_positive(name, value):
    check_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_unit_interval(name, value):
    check_number(name, value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_count(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def frozen(value):
    """Nested lists -> nested tuples, so options can key a batch of matrices."""
    return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def validate_process_group(process_group, comm_dtype):
    if process_group is not None:
        import torch.distributed as dist

        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
    if comm_dtype is not None and not (isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point):
        raise TypeError(f"comm_dtype must be a floating-point torch.dtype or None, got {comm_dtype!r}")
