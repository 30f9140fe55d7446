"""Fine-tuning an AdamW-pretrained model with Muon through LoRA adapters.

Switching an AdamW-pretrained model to Muon for full fine-tuning hurts, and the
damage grows with update strength ("Can Muon Fine-tune Adam-Pretrained
Models?", Qu, Huang, Horvath, arXiv:2605.10468); restricting the update to a
low-rank adapter closes most of the gap. Recipe: freeze the pretrained weights,
add LoRA to the linear layers, train only the adapters with Muon."""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T with a frozen base layer.

    B starts at zero so the wrapped model starts exactly at the pretrained one."""

    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"rank must be an int in [1, min(in, out) = {min(base.in_features, base.out_features)}], got {rank!r}")
        self.base = base
        self.scale = alpha / rank
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.mT @ self.lora_B.mT)


def add_lora(model, rank=8, alpha=16.0, target_names=None):
    """Freeze every parameter of `model` and wrap its nn.Linear layers (those
    whose attribute name is in `target_names`, or all of them) in LoRALinear,
    in place. Returns the adapter parameters, all 2-D: hand them to Muon."""
    model.requires_grad_(False)
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, nn.Linear) and (target_names is None or child_name in target_names)
    ]
    if not targets:
        raise ValueError(f"no nn.Linear matched target_names={target_names!r}")
    adapters = []
    for parent, child_name, child in targets:
        wrapped = LoRALinear(child, rank, alpha)
        setattr(parent, child_name, wrapped)
        adapters += [wrapped.lora_A, wrapped.lora_B]
    return adapters
