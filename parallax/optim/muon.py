"""The Muon optimizers: one step for Muon matrices and AdamW parameters, on one
process, under data parallelism (a process group) or FSDP2 (DTensor parameters)."""

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from .direction import plan_for
from .distributed import (
    agree_on_parameters,
    average_partial_gradients,
    balanced_assignment,
    gather_from_owners,
    group_world,
    orthogonalization_cost,
    owners_to_shards,
    shards_to_owners,
    wire_dtypes,
)
from .muon_update import apply_update, as_matrices, as_scalar, matrix_shape, momentum_step
from .options import (
    AdamWOptions,
    MuonOptions,
    PolarOptions,
    check_adamw,
    check_group,
    muon_defaults,
    normalize_group,
    pick,
    read_options,
    unread_reason,
)
from .param_split import split_params
from .rules import UPDATE_RULES
from .rules.registry import rule_owning
from .validation import frozen, validate_process_group

_ROUTING_HINT = (
    "Muon trains matrices only; route 0/1-D parameters (biases, norms, gains) and "
    "embeddings/heads to AdamW with parallax.optim.split_params(model) and "
    "MuonWithAdamW (or MuonWithAdamW.from_model(model))"
)


def _rule_state():
    """The rules' own state keys: float32 whatever the parameter dtype (torch's
    load_state_dict would cast them to the parameter's dtype), and, with
    "ns_steps", kept by a matrix's owner alone under a process group or FSDP2
    (every rank keeps the momentum of its FSDP shards)."""
    return tuple(key for rule in UPDATE_RULES.values() for key in rule.state_keys)


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


def _check_params(group):
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


def _differs(value, default) -> bool:
    """Whether an argument was set away from its default; a value that does not
    compare to one bool (a tensor) counts as set, and the group checks name it."""
    try:
        return bool(value != default)
    except (RuntimeError, TypeError, ValueError):
        return True


class MuonWithAdamW(Optimizer):
    """Muon for the groups with use_muon=True, AdamW for those with use_muon=False.

    Every param group dict must carry `use_muon`. Any option below may be set
    per group (AdamW groups: lr, betas, eps, weight_decay, also spelled
    adamw_lr, ...; they default to the adamw_* arguments); a key a group does
    not read is refused with the reason. The update rules' options
    (clip_threshold, total_steps, schatten_q, ...) are keyword arguments too:
    `parallax.optim.UPDATE_RULES` lists them. The default adjust_lr_fn
    "original" keeps lr=0.02 meaningful (Keller Jordan's tuning); with
    "match_rms_adamw" pass an AdamW-like lr. See docs/muon.md for every option.

    Distribution is opt-in: with `process_group` (ranks holding the same
    averaged gradients, as under DDP) each matrix is owned by one rank, which
    keeps its momentum and computes its direction; directions travel in the
    narrowest dtype that holds them exactly, or in `comm_dtype` if set.
    DTensor (FSDP2) parameters are always handled on their own mesh. Use
    `full_state_dict()` (on every rank) to checkpoint such runs.
    """

    def __init__(
        self,
        param_groups,
        *,
        lr=MuonOptions.lr,
        momentum=MuonOptions.momentum,
        nesterov=MuonOptions.nesterov,
        weight_decay=MuonOptions.weight_decay,
        ns_steps=PolarOptions.ns_steps,
        orthogonalizer=PolarOptions.orthogonalizer,
        adjust_lr_fn=MuonOptions.adjust_lr_fn,
        ns_coefficients=PolarOptions.ns_coefficients,
        eps=PolarOptions.eps,
        flatten=MuonOptions.flatten,
        update_rule=MuonOptions.update_rule,
        layer_aware_steps=PolarOptions.layer_aware_steps,
        max_ns_steps=PolarOptions.max_ns_steps,
        spectrum_every=PolarOptions.spectrum_every,
        compile=PolarOptions.compile,
        adamw_lr=AdamWOptions.lr,
        adamw_betas=AdamWOptions.betas,
        adamw_eps=AdamWOptions.eps,
        adamw_weight_decay=AdamWOptions.weight_decay,
        adamw_foreach=None,
        process_group=None,
        comm_dtype=None,
        **rule_options,
    ):
        if isinstance(param_groups, torch.Tensor) or not isinstance(param_groups, Iterable):
            raise TypeError(f"params must be an iterable of parameters or param-group dicts, "
                            f"got {type(param_groups).__name__}")
        validate_process_group(process_group, comm_dtype)
        defaults = muon_defaults()
        for name in rule_options:
            if rule_owning(name) is None:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
        polar = {"orthogonalizer": orthogonalizer, "ns_steps": ns_steps, "ns_coefficients": frozen(ns_coefficients),
                 "eps": eps, "compile": compile, "layer_aware_steps": layer_aware_steps,
                 "max_ns_steps": max_ns_steps, "spectrum_every": spectrum_every}
        # Set away from their defaults: some Muon group must read each (checked below).
        chosen = {name: value for name, value in {**polar, **rule_options}.items() if _differs(value, defaults[name])}
        defaults.update(polar)
        defaults.update(rule_options)
        defaults.update(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        adjust_lr_fn=adjust_lr_fn, flatten=flatten, update_rule=update_rule)
        self.process_group = process_group
        self.comm_dtype = comm_dtype
        self.adamw_foreach = adamw_foreach
        check_adamw(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, prefix="adamw_")  # with no AdamW group too
        self._adamw_defaults = {"lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps,
                                "weight_decay": adamw_weight_decay}
        self._owners_cache = {}
        super().__init__(param_groups, defaults)
        muon_groups = [group for group in self.param_groups if group["use_muon"]]
        for name, value in chosen.items():
            if muon_groups and not any(name in read_options(group) for group in muon_groups):
                raise ValueError(f"{name}={value!r} has no effect: {unread_reason(name, muon_groups[0])}")

    @classmethod
    def from_model(cls, model, *, exclude=(), muon=(), **kwargs):
        """Build from `split_params(model, exclude=..., muon=...)`: Muon on the
        hidden matrices, AdamW on the rest (see docs/muon.md, Routing)."""
        muon_params, adamw_params = split_params(model, exclude=exclude, muon=muon)
        groups = [{"params": muon_params, "use_muon": True}, {"params": adamw_params, "use_muon": False}]
        return cls([g for g in groups if g["params"]], **kwargs)

    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        explicit = normalize_group(param_group, self._adamw_defaults)
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1], explicit)
            _check_params(self.param_groups[-1])
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
        grad_counts = [int(p.grad is not None) for p, _ in entries]
        device = _local(entries[0][0]).device
        if world_size > 1:
            signature = [(tuple(p.shape), str(p.dtype)) for p, _ in entries]
            grad_counts = agree_on_parameters(signature, grad_counts, process_group, device)
        # Owners over all parameters, so a matrix's state stays put when another has no grad.
        stepped = [count > 0 for count in grad_counts]
        owners = [owner for owner, keep in zip(self._owners(entries, world_size), stepped) if keep]
        entries = [e for e, keep in zip(entries, stepped) if keep]
        grad_counts = [count for count in grad_counts if count > 0]
        if not entries:
            return
        if sharded:
            self._sharded_muon_step(entries, owners, process_group)
            return
        # Plain tensors: the owner updates its momentum and computes the direction,
        # from a gradient some ranks lack averaged over those that hold it.
        grads = [p.grad for p, _ in entries]
        if world_size > 1:
            shapes = [p.shape for p, _ in entries]
            for i, grad in average_partial_gradients(grads, shapes, grad_counts, device, process_group).items():
                grads[i] = grad.to(entries[i][0].dtype)
        mine = {i: self._momentum(p, group, grads[i]) for i, (p, group) in enumerate(entries) if owners[i] == rank}
        for i, (p, _) in enumerate(entries):
            if owners[i] != rank:
                self.state.pop(p, None)  # e.g. loaded from a full checkpoint: the owner keeps it
        directions = self._directions({i: _Matrix(*entries[i], as_matrices(u, entries[i][1]["flatten"]))
                                       for i, u in mine.items()})
        if world_size > 1:
            dtypes = [p.dtype for p, _ in entries]
            wire = wire_dtypes(directions, dtypes, self.comm_dtype, device, process_group)
            directions = gather_from_owners(directions, owners, [p.shape for p, _ in entries], dtypes, wire, device,
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
                for key in _rule_state() + ("ns_steps",):  # e.g. loaded from a full checkpoint: the owner keeps it
                    self.state[p].pop(key, None)
        for dim, indices in by_dim.items():
            shards = [self._momentum(*entries[i], _local(entries[i][0].grad) if entries[i][0].grad is not None else None)
                      for i in indices]
            shapes = [tuple(entries[i][0].shape) for i in indices]
            sub_owners = [owners[i] for i in indices]
            wholes = shards_to_owners(shards, sub_owners, shapes, dim, process_group)
            directions = self._directions({k: _Matrix(*entries[indices[k]], as_matrices(u, entries[indices[k]][1]["flatten"]))
                                           for k, u in wholes.items()})
            dtypes = [shard.dtype for shard in shards]
            wire = wire_dtypes(directions, dtypes, self.comm_dtype, shards[0].device, process_group)
            local = owners_to_shards(directions, sub_owners, shapes, dim, dtypes, wire, shards[0].device, process_group)
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
        `grad` None (FSDP2: only another rank's shard has one): a zero gradient."""
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
        one shape and one plan (rule, options, step count) are stacked into one
        batched call, then each goes through its rule's per-parameter stage."""
        measuring, plans, batches = {}, {}, {}  # options are read and checked once per group
        for key, (p, group, matrix) in matrices.items():
            state = self.state[p]
            if id(group) not in measuring:  # the orthogonalizer of a layer-aware group
                measuring[id(group)] = pick(PolarOptions, group) if "spectrum_every" in read_options(group) else None
            if measuring[id(group)] is not None and (state["step"] - 1) % group["spectrum_every"] == 0:
                state["ns_steps"] = measuring[id(group)].measured_steps(matrix)
            plan_key = (id(group), state["step"], state.get("ns_steps"))
            if plan_key not in plans:
                plans[plan_key] = plan_for(group, state)
            batches.setdefault((tuple(matrix.shape[-2:]), matrix.dtype, matrix.device, plans[plan_key]), []).append(key)
        directions = {}
        for (_, _, _, plan), keys in batches.items():
            # [k, m, n] per matrix (reshape(-1, ...) cannot size an empty one)
            stack = [matrices[key].matrix.reshape(-1, *matrices[key].matrix.shape[-2:]) if matrices[key].matrix.ndim > 2
                     else matrices[key].matrix[None] for key in keys]
            if len(stack) == 1:
                outputs = [plan.direction(matrices[keys[0]].matrix)]
            else:
                outputs = plan.direction(torch.cat(stack)).split([len(s) for s in stack])
            for key, output in zip(keys, outputs):
                p, _, matrix = matrices[key]
                directions[key] = plan.finish(output.reshape(matrix.shape), self.state[p])
        return directions

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
            index: {key: value.detach().clone() for key, value in state.items() if key in _rule_state()}
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
    """Drop-in for torch.optim.Muon (same arguments, same results step for step
    except bf16 parameters with nesterov=False, where torch normalises its own
    momentum buffer in place (docs/muon.md); loads its state_dict), plus the
    parallax variants as keyword arguments (see MuonWithAdamW). 3-D parameters are batches of matrices (flatten=True: one
    [shape[0], -1] matrix); 4-D+ ones are trained as [shape[0], -1] matrices."""

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=PolarOptions.ns_coefficients,
        eps=PolarOptions.eps,
        ns_steps=PolarOptions.ns_steps,
        adjust_lr_fn=None,
        *,
        orthogonalizer=PolarOptions.orthogonalizer,
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
