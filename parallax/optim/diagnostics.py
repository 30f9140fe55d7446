"""Cheap health measures of Muon updates, meant to be logged every N steps."""

import torch

from .direction import plan_for
from .muon_update import adjust_lr, as_matrices

DEFAULT_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def update_rms(update):
    """Root mean square of the entries of an update."""
    return update.float().square().mean().sqrt()


def orthogonality_error(O):
    """||O O^T - I||_F / sqrt(k) on the smaller Gram matrix (k = min(m, n)):
    0 for an exact U V^T of full rank, ~1 when O is far from orthogonal."""
    O = as_matrices(O, flatten=True).float()
    if O.shape[0] > O.shape[1]:
        O = O.mT
    gram = O @ O.mT
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - identity).norm() / gram.shape[0] ** 0.5


def singular_value_quantiles(M, quantiles=DEFAULT_QUANTILES):
    """Quantiles of the singular values of M (flattened to 2-D)."""
    S = torch.linalg.svdvals(as_matrices(M, flatten=True).float())
    return torch.quantile(S, torch.tensor(quantiles, dtype=S.dtype, device=S.device))


def normalized_directional_sharpness(loss_fn, params, directions):
    """NDS = d^T H d / ||d||^2 for the loss Hessian H along the update d
    ("Why Muon Outperforms Adam: A Curvature Perspective", arXiv:2606.04662).
    loss_fn() recomputes the loss; one Hessian-vector product by double backward."""
    params, directions = list(params), list(directions)
    if len(params) != len(directions):
        raise ValueError(f"params and directions must pair up, got {len(params)} and {len(directions)}")
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        slope = sum((g * d.detach()).sum() for g, d in zip(grads, directions))
        hessian_times_d = torch.autograd.grad(slope, params)
    curvature = sum((h * d).sum() for h, d in zip(hessian_times_d, directions))
    squared_norm = sum(d.square().sum() for d in directions)
    return (curvature / squared_norm.clamp(min=torch.finfo(squared_norm.dtype).tiny)).detach()


def muon_diagnostics(optimizer, loss_fn=None, quantiles=DEFAULT_QUANTILES):
    """Per Muon matrix of a MuonWithAdamW/Muon optimizer: the RMS of the
    lr-scaled update the current momentum would give, its orthogonality error
    and the momentum's singular-value quantiles. With loss_fn, also the NDS
    along the directions of all Muon matrices together (key "nds")."""
    report = {"matrices": []}
    params, directions = [], []
    for group in optimizer.param_groups:
        if not group["use_muon"]:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "momentum_buffer" not in state:
                continue
            momentum = as_matrices(state["momentum_buffer"], group["flatten"])
            plan = plan_for(group, state)
            # A copy of the state: a rule's second stage (NorMuon) updates its own.
            scratch = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}
            direction = plan.finish(plan.direction(momentum), scratch)
            lr = adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape, group["flatten"])
            report["matrices"].append({
                "shape": tuple(p.shape),
                "update_rms": (lr * update_rms(direction)).item(),
                "orthogonality_error": orthogonality_error(direction).item(),
                "singular_value_quantiles": singular_value_quantiles(momentum, quantiles).tolist(),
            })
            params.append(p)
            directions.append(direction.reshape(p.shape).to(p.dtype))
    if loss_fn is not None and params:
        report["nds"] = normalized_directional_sharpness(loss_fn, params, directions).item()
    return report
