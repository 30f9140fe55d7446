"""NorMuon (Li, Liu, Liang, Chen, Zhao, arXiv:2510.05491; code
github.com/zichongli5/NorMuon): Muon's polar factor, then each row (output
neuron) divided by the root of its own running second moment."""

from dataclasses import dataclass

import torch

from ..validation import check_positive, check_unit_interval
from .registry import UpdateRule, register_update_rule

SECOND_MOMENT = "neuron_second_moment"


@dataclass(frozen=True)
class NorMuonOptions:
    """normuon_beta2: the second moment's decay; normuon_eps: the released
    code's 1e-10 in both divisions."""

    normuon_beta2: float = 0.95
    normuon_eps: float = 1e-10

    def __post_init__(self):
        check_unit_interval("normuon_beta2", self.normuon_beta2)
        check_positive("normuon_eps", self.normuon_eps)


def neuron_normalize(O, second_moment, beta2=0.95, eps=1e-10):
    """v <- beta2 v + (1 - beta2) mean_cols(O^2) (in place; shape [..., m]),
    O_hat = O / (sqrt(v) + eps), rescaled to O's Frobenius norm so Muon's
    learning-rate scaling (and match_rms_adamw's) applies unchanged."""
    second_moment.lerp_(O.square().mean(dim=-1).to(second_moment.dtype), 1 - beta2)
    normalized = O / (second_moment.sqrt().unsqueeze(-1) + eps)
    return normalized * (O.norm(dim=(-2, -1), keepdim=True) / (normalized.norm(dim=(-2, -1), keepdim=True) + eps))


def direction(M, options, polar, step):
    return polar(M)


def transform(O, options, state):
    # Created on first use, so a group may switch to NorMuon mid-training.
    if SECOND_MOMENT not in state:
        state[SECOND_MOMENT] = torch.zeros(O.shape[:-1], dtype=torch.float32, device=O.device)
    return neuron_normalize(O, state[SECOND_MOMENT], options.normuon_beta2, options.normuon_eps)


register_update_rule(UpdateRule("normuon", NorMuonOptions, direction, uses_polar=True, transform=transform,
                    state_keys=(SECOND_MOMENT,)))
