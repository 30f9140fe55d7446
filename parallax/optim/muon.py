"""The Muon optimizers: one step loop for Muon matrices and AdamW parameters."""

from typing import NamedTuple

import torch
from torch.optim import Optimizer

from .adamw_update import adamw_update
from .coefficients import NEWTON_SCHULZ_COEFFICIENTS
from .distributed import sharded_map
from .layer_steps import layer_aware_ns_steps
from .muon_update import apply_update, as_matrix, momentum_step
from .param_split import split_params
from .spectral import dynmuon_power, neuron_normalize, spectral_direction
from .validation import validate_group

_ROUTING_HINT = (
    "Muon trains matrices only; route 0/1-D parameters (biases, norms, gains) and "
    "embeddings/heads to AdamW with parallax.optim.split_params(model) and "
    "MuonWithAdamW (or MuonWithAdamW.from_model(model))"
)


class _PendingMatrix(NamedTuple):
    """A Muon parameter between its momentum update and its step."""

    param: torch.Tensor
    group: dict
    matrix: torch.Tensor
    options: dict


def _is_dtensor(tensor):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def direction_options(group, state):
    """Keyword arguments of `spectral_direction` for one parameter this step."""
    polar_express = group["orthogonalizer"] == "polar_express"
    return {
        "rule": group["update_rule"],
        "orthogonalizer": group["orthogonalizer"],
        "ns_steps": state.get("ns_steps", group["ns_steps"]),
        # Polar Express brings its own per-step schedule.
        "coefficients": None if polar_express else group["ns_coefficients"],
        "eps": group["eps"],
        "clip_threshold": group["clip_threshold"],
        "power": (
            dynmuon_power(state["step"] - 1, group["total_steps"], group["dynmuon_power_start"], group["dynmuon_power_end"])
            if group["update_rule"] == "dynmuon"
            else 0.0
        ),
        "schatten_q": group["schatten_q"],
        "kaon_iterations": group["kaon_iterations"],
    }


def _check_group(group):
    validate_group(group)
    for p in group["params"]:
        if _is_dtensor(p):
            raise TypeError(
                "DTensor (FSDP2) parameters are not supported: Muon needs each matrix whole on "
                "the rank that orthogonalizes it; use DDP (which MuonWithAdamW shards) instead"
            )
        if torch.is_complex(p):
            raise TypeError(f"complex parameters are not supported, got dtype {p.dtype}")
        if group["use_muon"] and p.ndim < 2:
            raise ValueError(f"got a parameter of shape {tuple(p.shape)} in a Muon group. {_ROUTING_HINT}")


class MuonWithAdamW(Optimizer):
    """Muon for the groups with use_muon=True, AdamW for those with use_muon=False.

    Every param group dict must carry `use_muon`. Group-level `lr` and
    `weight_decay` override the defaults; AdamW groups default them to
    `adamw_lr` / `adamw_weight_decay`. The default adjust_lr_fn "original" keeps
    lr=0.02 meaningful (Keller Jordan's tuning); with "match_rms_adamw" pass an
    AdamW-like lr (e.g. the same as adamw_lr). See docs/muon.md for every option.
    Under torch.distributed (world_size > 1) each rank orthogonalizes a share of
    the matrices and all-gathers the results; gradients must already be averaged.
    """

    def __init__(
        self,
        param_groups,
        *,
        lr=0.02,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.0,
        ns_steps=5,
        orthogonalizer="newton_schulz",
        adjust_lr_fn="original",
        ns_coefficients=NEWTON_SCHULZ_COEFFICIENTS,
        eps=1e-7,
        update_rule="orthogonalize",
        clip_threshold=1.0,
        dynmuon_power_start=1.0,
        dynmuon_power_end=-0.25,
        total_steps=None,
        schatten_q=0.5,
        kaon_iterations=5,
        normuon_beta2=0.95,
        normuon_eps=1e-8,
        layer_aware_steps=False,
        max_ns_steps=10,
        spectrum_every=100,
        adamw_lr=3e-4,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        adamw_weight_decay=0.0,
        process_group=None,
    ):
        self.process_group = process_group
        self._adamw_defaults = {"lr": adamw_lr, "weight_decay": adamw_weight_decay}
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "orthogonalizer": orthogonalizer,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "update_rule": update_rule,
            "clip_threshold": clip_threshold,
            "dynmuon_power_start": dynmuon_power_start,
            "dynmuon_power_end": dynmuon_power_end,
            "total_steps": total_steps,
            "schatten_q": schatten_q,
            "kaon_iterations": kaon_iterations,
            "normuon_beta2": normuon_beta2,
            "normuon_eps": normuon_eps,
            "layer_aware_steps": layer_aware_steps,
            "max_ns_steps": max_ns_steps,
            "spectrum_every": spectrum_every,
            "betas": tuple(adamw_betas),
            "adamw_eps": adamw_eps,
        }
        super().__init__(param_groups, defaults)

    @classmethod
    def from_model(cls, model, **kwargs):
        """Build from `split_params(model)`: Muon on hidden matrices, AdamW on the rest."""
        muon_params, adamw_params = split_params(model)
        groups = [{"params": muon_params, "use_muon": True}, {"params": adamw_params, "use_muon": False}]
        return cls([g for g in groups if g["params"]], **kwargs)

    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if param_group.get("use_muon") is False:
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            # A rejected group must not stay behind in a live optimizer.
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("sparse gradients are not supported")
                if group["use_muon"]:
                    pending.append(self._prepare_muon(p, group))
                else:
                    self._adamw_step(p, group)

        directions = sharded_map(
            lambda i: spectral_direction(pending[i].matrix, **pending[i].options),
            [item.matrix.shape for item in pending],
            [item.matrix.dtype for item in pending],
            pending[0].param.device if pending else None,
            self.process_group,
        )
        for (p, group, _, _), direction in zip(pending, directions):
            if group["update_rule"] == "normuon":
                direction = neuron_normalize(
                    direction, self.state[p]["neuron_second_moment"], group["normuon_beta2"], group["normuon_eps"]
                )
            apply_update(p, direction, lr=group["lr"], weight_decay=group["weight_decay"], adjust_lr_fn=group["adjust_lr_fn"])
        return loss

    def _prepare_muon(self, p, group):
        """Momentum update (every rank) and the inputs of the sharded direction."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        # Created lazily so a group may switch to NorMuon mid-training.
        if group["update_rule"] == "normuon" and "neuron_second_moment" not in state:
            state["neuron_second_moment"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        state["step"] += 1
        matrix = momentum_step(as_matrix(p.grad), as_matrix(state["momentum_buffer"]), group["momentum"], group["nesterov"])
        if group["layer_aware_steps"] and (state["step"] - 1) % group["spectrum_every"] == 0:
            state["ns_steps"] = layer_aware_ns_steps(matrix, max_steps=group["max_ns_steps"])
        return _PendingMatrix(p, group, matrix, direction_options(group, state))

    def _adamw_step(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        adamw_update(
            p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
            lr=group["lr"], betas=group["betas"], eps=group["adamw_eps"], weight_decay=group["weight_decay"],
        )


class Muon(MuonWithAdamW):
    """Drop-in for torch.optim.Muon (same arguments, same results step for step),
    plus the parallax variants as keyword arguments (see MuonWithAdamW).
    Parameters with more than 2 dims are trained as [shape[0], -1] matrices."""

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=NEWTON_SCHULZ_COEFFICIENTS,
        eps=1e-7,
        ns_steps=5,
        adjust_lr_fn=None,
        *,
        orthogonalizer="newton_schulz",
        **variant_options,
    ):
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            orthogonalizer=orthogonalizer,
            **variant_options,
        )

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):
            param_group.setdefault("use_muon", True)
            if param_group["use_muon"] is not True:
                raise ValueError("Muon takes only Muon groups (use_muon=True); use MuonWithAdamW for AdamW groups")
        super().add_param_group(param_group)
