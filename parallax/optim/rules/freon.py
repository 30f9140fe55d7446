"""Freon (Shumaylov et al., "Muon is Not That Special: Random or Inverted Spectra
Work Just as Well", arXiv:2605.11181): steepest descent under the Schatten-q
(quasi-)norm, (G G^T)^(-c) G with G = M / ||M||_{S_q} and c = 1 - q/2."""

from dataclasses import dataclass

import torch

from ..validation import check_positive
from .registry import UpdateRule, register_update_rule
from .spectrum import nonzero, rebuild, svd


@dataclass(frozen=True)
class FreonOptions:
    """schatten_q: q (1 is Muon, 2 normalised SGD, below 1 an inverted spectrum).
    The default 0.5 is parallax's choice (docs/muon.md)."""

    schatten_q: float = 0.5

    def __post_init__(self):
        check_positive("schatten_q", self.schatten_q)


def freon(M, schatten_q=0.5):
    """U (S / ||S||_q)^(q - 1) V^T, by SVD (the paper uses a QDWH iteration),
    rescaled to Muon's Frobenius norm sqrt(rank): the paper's raw scale grows
    like rank^1.5 at q = 0.5 (~1000x Muon's RMS at 768 x 768), so the rescale
    (parallax's, not the paper's) keeps one learning rate meaning one step size."""
    check_positive("schatten_q", schatten_q)
    U, S, Vh = svd(M)
    keep = nonzero(S)
    safe = torch.where(keep, S, torch.ones_like(S))
    schatten_norm = (safe.pow(schatten_q) * keep).sum(dim=-1, keepdim=True).pow(1.0 / schatten_q)
    shaped = (safe / schatten_norm.clamp(min=torch.finfo(S.dtype).tiny)).pow(schatten_q - 1.0) * keep
    rank = keep.sum(dim=-1, keepdim=True).to(S.dtype)
    shaped = shaped * (rank / shaped.square().sum(dim=-1, keepdim=True).clamp(min=torch.finfo(S.dtype).tiny)).sqrt()
    return rebuild(U, shaped, Vh, M)


def direction(M, options, polar, step):
    return freon(M, options.schatten_q)


register_update_rule(UpdateRule("freon", FreonOptions, direction))
