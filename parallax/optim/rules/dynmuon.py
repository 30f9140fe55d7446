"""DynMuon (Wu, Shah, Silwal, Zhang, arXiv:2605.17109; code github.com/fzwark/DynMuon):
the spectral shaping U S^p V^T with the exponent p scheduled from positive to
mildly negative over training, computed in the released code's three regimes."""

import math
from dataclasses import dataclass

import torch

from ..validation import check_count, check_number, check_positive
from .registry import UpdateRule, register_update_rule
from .spectrum import nonzero, rebuild, svd

# The released code's run values (train_gpt.py's Hyperparameters and the
# README command): dynmuon_pmax, dynmuon_pmin, dynmuon_tau, dynmuon_w. Its
# Logistic_Scheduler class defaults to center 0.02 / width 0.08; see docs/muon.md.
DYNMUON_P_MAX = 1.0
DYNMUON_P_MIN = -0.25
DYNMUON_CENTER = 0.04
DYNMUON_WIDTH = 0.04
# dynmuon_spectral_transform: p >= 0.25 returns the momentum itself,
# 0 <= p < 0.25 its polar factor, p < 0 the shaped U S^p V^T.
DYNMUON_RAW_ABOVE = 0.25


@dataclass(frozen=True)
class DynMuonOptions:
    """The logistic schedule of p (`dynmuon_power`) over `total_steps` (required)."""

    total_steps: int | None = None
    dynmuon_p_max: float = DYNMUON_P_MAX
    dynmuon_p_min: float = DYNMUON_P_MIN
    dynmuon_center: float = DYNMUON_CENTER
    dynmuon_width: float = DYNMUON_WIDTH

    def __post_init__(self):
        if self.total_steps is None:
            raise ValueError("total_steps is required by update_rule='dynmuon' (its power schedule spans training)")
        check_count("total_steps", self.total_steps)
        for name in ("dynmuon_p_max", "dynmuon_p_min", "dynmuon_center"):
            check_number(name, getattr(self, name))
        check_positive("dynmuon_width", self.dynmuon_width)


def spectral_power(M, power):
    """U S^p V^T without rescaling (the paper's and its code's definition).
    Zero singular values stay zero for negative p."""
    U, S, Vh = svd(M)
    keep = nonzero(S)
    shaped = torch.where(keep, S.clamp(min=torch.finfo(S.dtype).tiny).pow(power), torch.zeros_like(S))
    return rebuild(U, shaped, Vh, M)


def dynmuon_power(step, total_steps, p_max=DYNMUON_P_MAX, p_min=DYNMUON_P_MIN, center=DYNMUON_CENTER,
                  width=DYNMUON_WIDTH):
    """The released Logistic_Scheduler at the 1-based `step`:
    p = p_min + (p_max - p_min) / (1 + exp((step / total_steps - center) / width)).
    With the defaults p is 0.66 at the start, crosses 0 at 9.5% of training and
    is within 1e-3 of p_min from 34% on."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1 for DynMuon, got {total_steps!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    u = (step / total_steps - center) / width
    anneal = 0.0 if u > 700 else 1.0 / (1.0 + math.exp(u))  # exp overflows past ~709
    return p_min + (p_max - p_min) * anneal


def dynmuon_direction(M, power, polar):
    """The released code's update for exponent `power`: M itself for
    power >= 0.25, polar(M) for 0 <= power < 0.25, U S^power V^T below 0
    (exact, by SVD; the code uses a second-order expansion around I)."""
    if power >= DYNMUON_RAW_ABOVE:
        return M
    if power >= 0:
        return polar(M)
    return spectral_power(M, power)


def direction(M, options, polar, step):
    power = dynmuon_power(step, options.total_steps, options.dynmuon_p_max, options.dynmuon_p_min,
                          options.dynmuon_center, options.dynmuon_width)
    return dynmuon_direction(M, power, polar)


register_update_rule(UpdateRule("dynmuon", DynMuonOptions, direction, uses_polar=True))
