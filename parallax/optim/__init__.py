"""The Muon optimizer family: exact torch.optim.Muon parity, newer spectral
variants, Muon+AdamW in one optimizer, DDP and FSDP2 sharding, diagnostics."""

from .coefficients import NEWTON_SCHULZ_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS
from .diagnostics import (
    muon_diagnostics,
    normalized_directional_sharpness,
    orthogonality_error,
    singular_value_quantiles,
    update_rms,
)
from .layer_steps import layer_aware_ns_steps, steps_to_reach
from .lora import LoRALinear, add_lora
from .muon import Muon, MuonWithAdamW
from .muon_update import adjust_lr, as_matrices, momentum_step, muon_update
from .orthogonalize import ORTHOGONALIZERS, newton_schulz, newton_schulz_step, orthogonalize
from .param_split import split_params
from .spectral import (
    UPDATE_RULES,
    clip_by_polar,
    clip_singular_values,
    dynmuon_direction,
    dynmuon_power,
    freon,
    kaon,
    mucon,
    neuron_normalize,
    nuclear_scaled_polar,
    spectral_direction,
    spectral_power,
)

__all__ = [
    "Muon",
    "MuonWithAdamW",
    "orthogonalize",
    "split_params",
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
    "LoRALinear",
    "add_lora",
    "ORTHOGONALIZERS",
    "UPDATE_RULES",
    "NEWTON_SCHULZ_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
]
