"""The Muon optimizers: one step for Muon matrices and AdamW parameters, on one
process, under data parallelism (a process group) or FSDP2 (DTensor parameters)."""

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from .coefficients import NEWTON_SCHULZ_COEFFICIENTS
from .distributed import (
    agree_on_parameters,
    balanced_assignment,
    gather_from_owners,
    group_world,
    orthogonalization_cost,
    owners_to_shards,
    shards_to_owners,
)
from .layer_steps import layer_aware_ns_steps
from .muon_update import apply_update, as_matrices, as_scalar, matrix_shape, momentum_step
from .orthogonalize import polynomial_schedule
from .param_split import split_params
from .spectral import dynmuon_power, neuron_normalize, spectral_direction
from .validation import validate_group, validate_process_group

_ROUTING_HINT = (
    "Muon trains matrices only; route 0/1-D parameters (biases, norms, gains) and "
    "embeddings/heads to AdamW with parallax.optim.split_params(model) and "
    "MuonWithAdamW (or MuonWithAdamW.from_model(model))"
)
# State that stays float32 whatever the parameter dtype (torch's load_state_dict
# would cast it to the parameter's dtype).
_FLOAT32_STATE = ("neuron_second_moment",)
# Under FSDP2 every rank keeps the momentum of its shards; the owner of a matrix
# alone keeps what needs the whole matrix.
_OWNER_STATE = ("neuron_second_moment", "ns_steps")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _is_dtensor(tensor):
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(tensor, DTensor)


def _local(tensor):
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_dim(param):
    """The sharded tensor dim of a DTensor parameter, or None when replicated."""
    if param.device_mesh.ndim != 1:
        raise ValueError(
            f"DTensor parameters must live on a 1-D device mesh (FSDP2's default), got a "
            f"{param.device_mesh.ndim}-D mesh; for HSDP pass the sharded sub-mesh"
        )
    (placement,) = param.placements
    if placement.is_shard():
        return placement.dim
    if placement.is_replicate():
        return None
    raise ValueError(f"DTensor parameters must be Shard(d) or Replicate(), got {placement}")


def direction_options(group, state):
    """Keyword arguments of `spectral_direction` for one parameter this step."""
    polar_express = group["orthogonalizer"] == "polar_express"
    dynmuon = group["update_rule"] == "dynmuon"
    return {
        "rule": group["update_rule"],
        "orthogonalizer": group["orthogonalizer"],
        "ns_steps": state.get("ns_steps", group["ns_steps"]),
        # Polar Express brings its own per-step schedule.
        "coefficients": None if polar_express else tuple(group["ns_coefficients"]),
        "eps": group["eps"],
        "clip_threshold": group["clip_threshold"],
        "power": (
            dynmuon_power(state["step"], group["total_steps"], group["dynmuon_p_max"], group["dynmuon_p_min"],
                          group["dynmuon_center"], group["dynmuon_width"])
            if dynmuon else 0.0
        ),
        "schatten_q": group["schatten_q"],
        "kaon_iterations": group["kaon_iterations"],
        "compiled": group["compile"],
    }


def _check_group(group):
    validate_group(group)
    for p in group["params"]:
        if torch.is_complex(p):
            raise TypeError(f"complex parameters are not supported, got dtype {p.dtype}")
        if group["use_muon"] and p.ndim < 2:
            raise ValueError(f"got a parameter of shape {tuple(p.shape)} in a Muon group. {_ROUTING_HINT}")
        if _is_dtensor(p):
            _shard_dim(p)


class _Matrix(NamedTuple):
    """A Muon parameter this step: `matrix` is the (whole) input of its direction."""

    param: torch.Tensor
    group: dict
    matrix: torch.Tensor


class MuonWithAdamW(Optimizer):
    """Muon for the groups with use_muon=True, AdamW for those with use_muon=False.

    Every param group dict must carry `use_muon`. Group-level `lr`, `weight_decay`
    and `eps` override the defaults; AdamW groups default them to `adamw_lr` /
    `adamw_weight_decay` / `adamw_eps`. The default adjust_lr_fn "original" keeps
    lr=0.02 meaningful (Keller Jordan's tuning); with "match_rms_adamw" pass an
    AdamW-like lr. See docs/muon.md for every option.

    Distribution is opt-in: with `process_group` (ranks holding the same
    averaged gradients, as under DDP) each matrix is owned by one rank, which
    keeps its momentum and computes its direction; directions travel in
    `comm_dtype`. DTensor (FSDP2) parameters are always handled on their own
    mesh. Use `full_state_dict()` (on every rank) to checkpoint such runs.
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
        flatten=False,
        update_rule="orthogonalize",
        clip_threshold=0.5,
        dynmuon_p_max=1.0,
        dynmuon_p_min=-0.25,
        dynmuon_center=0.04,
        dynmuon_width=0.04,
        total_steps=None,
        schatten_q=0.5,
        kaon_iterations=5,
        normuon_beta2=0.95,
        normuon_eps=1e-8,
        layer_aware_steps=False,
        max_ns_steps=10,
        spectrum_every=100,
        compile=False,
        adamw_lr=3e-4,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        adamw_weight_decay=0.0,
        adamw_foreach=None,
        process_group=None,
        comm_dtype=torch.bfloat16,
    ):
        if isinstance(param_groups, torch.Tensor) or not isinstance(param_groups, Iterable):
            raise TypeError(f"params must be an iterable of parameters or param-group dicts, "
                            f"got {type(param_groups).__name__}")
        validate_process_group(process_group, comm_dtype)
        self.process_group = process_group
        self.comm_dtype = comm_dtype
        self.adamw_foreach = adamw_foreach
        self._adamw_defaults = {"lr": adamw_lr, "weight_decay": adamw_weight_decay, "eps": adamw_eps}
        self._owners_cache = {}
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
            "flatten": flatten,
            "update_rule": update_rule,
            "clip_threshold": clip_threshold,
            "dynmuon_p_max": dynmuon_p_max,
            "dynmuon_p_min": dynmuon_p_min,
            "dynmuon_center": dynmuon_center,
            "dynmuon_width": dynmuon_width,
            "total_steps": total_steps,
            "schatten_q": schatten_q,
            "kaon_iterations": kaon_iterations,
            "normuon_beta2": normuon_beta2,
            "normuon_eps": normuon_eps,
            "layer_aware_steps": layer_aware_steps,
            "max_ns_steps": max_ns_steps,
            "spectrum_every": spectrum_every,
            "compile": compile,
            "betas": tuple(adamw_betas),
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
            if "adamw_eps" in param_group:
                param_group.setdefault("eps", param_group.pop("adamw_eps"))
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            # A rejected group must not stay behind in a live optimizer.
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_group_step(group)
        entries = [(p, group) for group in self.param_groups if group["use_muon"] for p in group["params"]]
        for p, _ in entries:
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError("sparse gradients are not supported")
        self._muon_step([e for e in entries if not _is_dtensor(e[0])], self.process_group, sharded=False)
        dtensors = [e for e in entries if _is_dtensor(e[0])]
        if dtensors:
            self._muon_step(dtensors, dtensors[0][0].device_mesh.get_group(), sharded=True)
        return loss

    def _muon_step(self, entries, process_group, sharded):
        """One step of the Muon parameters `entries` [(param, group)], sharing the
        work among the ranks of `process_group` (None: all on this rank)."""
        if not entries:
            return
        rank, world_size = group_world(process_group)
        has_grad = [p.grad is not None for p, _ in entries]
        if world_size > 1:
            signature = [(tuple(p.shape), str(p.dtype)) for p, _ in entries]
            has_grad = agree_on_parameters(signature, has_grad, process_group, _local(entries[0][0]).device)
        # Owners over all parameters, so a matrix's state stays put when another has no grad.
        owners = [owner for owner, stepped in zip(self._owners(entries, world_size), has_grad) if stepped]
        entries = [e for e, stepped in zip(entries, has_grad) if stepped]
        if not entries:
            return
        if sharded:
            self._sharded_muon_step(entries, owners, process_group)
            return
        # Plain tensors: the owner updates its momentum and computes the direction.
        mine = {i: self._momentum(p, group, p.grad) for i, (p, group) in enumerate(entries) if owners[i] == rank}
        for i, (p, _) in enumerate(entries):
            if owners[i] != rank:
                self.state.pop(p, None)  # e.g. loaded from a full checkpoint: the owner keeps it
        directions = self._directions({i: _Matrix(*entries[i], as_matrices(u, entries[i][1]["flatten"]))
                                       for i, u in mine.items()})
        if world_size > 1:
            directions = gather_from_owners(directions, owners, [p.shape for p, _ in entries],
                                            [p.dtype for p, _ in entries], self.comm_dtype, _local(entries[0][0]).device,
                                            process_group)
        for i, (p, group) in enumerate(entries):
            self._apply(p, group, directions[i], p.shape)

    def _sharded_muon_step(self, entries, owners, process_group):
        """FSDP2: momentum on the local shards, whole matrices gathered on their
        owners by all_to_all, directions sent back as shards."""
        replicated = [i for i, (p, _) in enumerate(entries) if _shard_dim(p) is None]
        for i in replicated:  # every rank holds the whole matrix: no exchange
            p, group = entries[i]
            u = self._momentum(p, group, _local(p.grad) if p.grad is not None else None)
            (direction,) = self._directions({0: _Matrix(p, group, as_matrices(u, group["flatten"]))}).values()
            self._apply(p, group, direction, p.shape)
        by_dim = {}
        for i, (p, _) in enumerate(entries):
            if i not in replicated:
                by_dim.setdefault(_shard_dim(p), []).append(i)
        rank, _ = group_world(process_group)
        for i, (p, _) in enumerate(entries):
            if owners[i] != rank and p in self.state:
                for key in _OWNER_STATE:  # e.g. loaded from a full checkpoint: the owner keeps it
                    self.state[p].pop(key, None)
        for dim, indices in by_dim.items():
            shards = [self._momentum(*entries[i], _local(entries[i][0].grad) if entries[i][0].grad is not None else None)
                      for i in indices]
            shapes = [tuple(entries[i][0].shape) for i in indices]
            sub_owners = [owners[i] for i in indices]
            wholes = shards_to_owners(shards, sub_owners, shapes, dim, process_group)
            directions = self._directions({k: _Matrix(*entries[indices[k]], as_matrices(u, entries[indices[k]][1]["flatten"]))
                                           for k, u in wholes.items()})
            local = owners_to_shards(directions, sub_owners, shapes, dim, [s.dtype for s in shards], self.comm_dtype,
                                     shards[0].device, process_group)
            for k, i in enumerate(indices):
                self._apply(entries[i][0], entries[i][1], local[k], entries[i][0].shape)

    def _owners(self, entries, world_size):
        """Owner rank of each entry, fixed for a given parameter list."""
        key = (world_size, tuple((id(p), tuple(p.shape), group["flatten"]) for p, group in entries))
        if key not in self._owners_cache:
            costs = []
            for p, group in entries:
                rows, cols = matrix_shape(p.shape, group["flatten"])
                batch = p.shape[0] if p.ndim == 3 and not group["flatten"] else 1
                costs.append(orthogonalization_cost(batch, rows, cols))
            self._owners_cache = {key: balanced_assignment(costs, world_size)}
        return self._owners_cache[key]

    def _momentum(self, p, group, grad):
        """Momentum update of p's (local) state; returns the matrix to orthogonalize.
        `grad` None (another rank has one): a zero gradient."""
        state = self.state[p]
        local_param = _local(p)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["step"] = state.get("step", 0) + 1
        if grad is None:
            grad = torch.zeros_like(local_param)
        return momentum_step(grad, _local(state["momentum_buffer"]), group["momentum"], group["nesterov"])

    def _directions(self, matrices):
        """{key: direction} for {key: _Matrix} computed on this rank; matrices of
        one shape and the same options are stacked into one batched call."""
        batches = {}
        for key, (p, group, matrix) in matrices.items():
            state = self.state[p]
            if group["layer_aware_steps"] and (state["step"] - 1) % group["spectrum_every"] == 0:
                coefficients = None if group["orthogonalizer"] == "polar_express" else group["ns_coefficients"]
                schedule, norm_scale = polynomial_schedule(group["orthogonalizer"], group["max_ns_steps"], coefficients)
                state["ns_steps"] = layer_aware_ns_steps(matrix, coefficients=schedule, norm_scale=norm_scale,
                                                         max_steps=group["max_ns_steps"])
            options = direction_options(group, state)
            batch_key = (tuple(matrix.shape[-2:]), matrix.dtype, matrix.device, tuple(options.items()))
            batches.setdefault(batch_key, []).append(key)
        directions = {}
        for (_, _, _, options), keys in batches.items():
            stack = [matrices[key].matrix.reshape(-1, *matrices[key].matrix.shape[-2:]) if matrices[key].matrix.ndim > 2
                     else matrices[key].matrix[None] for key in keys]
            if len(stack) == 1:
                outputs = [spectral_direction(matrices[keys[0]].matrix, **dict(options))]
            else:
                outputs = spectral_direction(torch.cat(stack), **dict(options)).split([len(s) for s in stack])
            for key, output in zip(keys, outputs):
                directions[key] = self._normalize_neurons(matrices[key], output.reshape(matrices[key].matrix.shape))
        return directions

    def _normalize_neurons(self, item, direction):
        p, group, matrix = item
        if group["update_rule"] != "normuon":
            return direction
        state = self.state[p]
        # Created lazily so a group may switch to NorMuon mid-training.
        if "neuron_second_moment" not in state:
            state["neuron_second_moment"] = torch.zeros(matrix.shape[:-1], dtype=torch.float32, device=matrix.device)
        return neuron_normalize(direction, state["neuron_second_moment"], group["normuon_beta2"], group["normuon_eps"])

    def _apply(self, p, group, direction, shape):
        apply_update(_local(p), direction, lr=group["lr"], weight_decay=group["weight_decay"],
                     adjust_lr_fn=group["adjust_lr_fn"], shape=shape, flatten=group["flatten"])

    def _adamw_group_step(self, group):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("sparse gradients are not supported")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # torch's own AdamW kernels (foreach on CUDA by default): the same bits as torch.optim.AdamW.
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=self.adamw_foreach, amsgrad=False,
              beta1=beta1, beta2=beta2, lr=as_scalar(group["lr"]), weight_decay=float(group["weight_decay"]),
              eps=float(group["eps"]), maximize=False)

    # ------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict):
        """Also loads a torch.optim.Muon (or older parallax) state dict: options it
        lacks keep this optimizer's values. Float32 state stays float32."""
        groups = [{**{k: v for k, v in current.items() if k != "params"}, **saved}
                  for current, saved in zip(self.param_groups, state_dict["param_groups"])]
        groups += state_dict["param_groups"][len(groups):]
        for group in groups:
            for old, new in (("dynmuon_power_start", "dynmuon_p_max"), ("dynmuon_power_end", "dynmuon_p_min")):
                if old in group:
                    group[new] = group.pop(old)
            if group.get("use_muon") is False and "adamw_eps" in group:
                group["eps"] = group.pop("adamw_eps")
        float32_state = {
            index: {key: value.detach().clone() for key, value in state.items() if key in _FLOAT32_STATE}
            for index, state in state_dict["state"].items()
        }
        super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
        params = self._params()
        for index, saved in float32_state.items():
            for key, value in saved.items():
                self.state[params[index]][key] = value.to(device=_local(params[index]).device, dtype=torch.float32)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if not group["use_muon"] and not isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(state.get("step", 0)))
                if _is_dtensor(p):
                    self._redistribute_state(p, state)

    @staticmethod
    def _redistribute_state(p, state):
        """Whole-tensor state of a DTensor parameter (from a full checkpoint) -> shards like p."""
        from torch.distributed.tensor import distribute_tensor

        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not _is_dtensor(value) and value.shape == p.shape:
                state[key] = distribute_tensor(value.to(_local(p).device), p.device_mesh, p.placements,
                                               src_data_rank=None)

    def full_state_dict(self):
        """state_dict() with every state whole: DTensor state gathered and, under a
        process group, each owner's Muon state shared. Collective: call it on every
        rank (then save on one); load it with load_state_dict on every rank."""
        state_dict = self.state_dict()
        # Sorted: ranks must gather DTensors in one order whatever order their state was made in.
        state_dict["state"] = {
            index: {key: value.full_tensor() if _is_dtensor(value) else value for key, value in sorted(state.items())}
            for index, state in sorted(state_dict["state"].items())
        }
        groups = [self.process_group] + [p.device_mesh.get_group() for p in self._params() if _is_dtensor(p)][:1]
        for group in groups:
            _, world_size = group_world(group)
            if world_size == 1:
                continue
            shared = [None] * world_size
            mine = {index: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                    for index, state in state_dict["state"].items()}
            dist.all_gather_object(shared, mine, group=group)
            merged = {}
            for rank_state in shared:  # owners alone hold owner state, so keys never clash
                for index, state in rank_state.items():
                    merged.setdefault(index, {}).update(state)
            state_dict["state"] = dict(sorted(merged.items()))
        return state_dict

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]


class Muon(MuonWithAdamW):
    """Drop-in for torch.optim.Muon (same arguments, same results step for step,
    loads its state_dict), plus the parallax variants as keyword arguments (see
    MuonWithAdamW). 3-D parameters are batches of matrices (flatten=True: one
    [shape[0], -1] matrix); 4-D+ ones are trained as [shape[0], -1] matrices."""

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
