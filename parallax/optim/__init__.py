"""The Muon optimizer family: exact torch.optim.Muon parity, newer spectral
variants (one file each in rules/), Muon+AdamW in one optimizer with routing
by role, DDP and FSDP2 sharding, LoRA fine-tuning through peft, diagnostics."""

from .coefficients import NEWTON_SCHULZ_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS
from .diagnostics import (
    muon_diagnostics,
    normalized_directional_sharpness,
    orthogonality_error,
    singular_value_quantiles,
    update_rms,
)
from .direction import muon_update, spectral_direction
from .layer_steps import layer_aware_ns_steps, steps_to_reach
from .lora import add_lora, lora_target_modules
from .muon import Muon, MuonWithAdamW
from .muon_update import adjust_lr, as_matrices, momentum_step
from .orthogonalize import ORTHOGONALIZERS, newton_schulz, newton_schulz_step, orthogonalize
from .param_split import ParamRoute, route_params, split_params
from .rules import UPDATE_RULES, UpdateRule, register_update_rule
from .rules.dynmuon import dynmuon_direction, dynmuon_power, spectral_power
from .rules.freon import freon
from .rules.kaon import kaon
from .rules.mucon import clip_by_polar, clip_singular_values, mucon
from .rules.normuon import neuron_normalize
from .rules.nuclear import nuclear_scaled_polar

__all__ = [
    "Muon",
    "MuonWithAdamW",
    "orthogonalize",
    "split_params",
    "route_params",
    "ParamRoute",
    "muon_update",
    "momentum_step",
    "adjust_lr",
    "as_matrices",
    "newton_schulz",
    "newton_schulz_step",
    "spectral_direction",
    "clip_singular_values",
    "clip_by_polar",
    "mucon",
    "spectral_power",
    "dynmuon_power",
    "dynmuon_direction",
    "nuclear_scaled_polar",
    "freon",
    "kaon",
    "neuron_normalize",
    "layer_aware_ns_steps",
    "steps_to_reach",
    "muon_diagnostics",
    "update_rms",
    "orthogonality_error",
    "singular_value_quantiles",
    "normalized_directional_sharpness",
    "add_lora",
    "lora_target_modules",
    "ORTHOGONALIZERS",
    "UPDATE_RULES",
    "UpdateRule",
    "register_update_rule",
    "NEWTON_SCHULZ_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
]
