"""Pure per-matrix pieces of a Muon step around its direction (direction.py):
the matrix view of a parameter, momentum, the learning-rate shape factor, apply."""

import math

import torch

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def as_matrices(tensor, flatten=False):
    """The [..., m, n] view Muon orthogonalizes: a 2-D tensor as is, a 3-D one
    ([E, out, in], e.g. MoE experts) as a batch of E matrices, and a 4-D+ one
    (a conv kernel [out, in, kh, kw]) as [out, in*kh*kw]. flatten=True views
    every >2-D tensor as [shape[0], -1]."""
    if tensor.ndim == 2 or (tensor.ndim == 3 and not flatten):
        return tensor
    return tensor.reshape(tensor.shape[0], -1)


def matrix_shape(shape, flatten=False):
    """(rows, cols) of each matrix `as_matrices` makes of a tensor of `shape`."""
    if len(shape) == 3 and not flatten:
        return shape[1], shape[2]
    return shape[0], math.prod(shape[1:])


def as_scalar(value):
    """A python float of a number or a 1-element tensor (torch accepts tensor lr)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def adjust_lr(lr, adjust_lr_fn, shape, flatten=False):
    """Learning rate for a parameter of `shape` (its matrices: `matrix_shape`).

    None / "original": lr * sqrt(max(1, rows / cols)) (Keller Jordan's Muon).
    "match_rms_adamw": lr * 0.2 * sqrt(max(rows, cols)), which gives U V^T an
    element RMS of 0.2 * lr, like AdamW (Moonshot, arXiv:2502.16982).
    """
    rows, cols = matrix_shape(shape, flatten)
    lr = as_scalar(lr)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / max(1, cols)))  # an empty matrix (cols 0) has nothing to scale
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def momentum_step(grad, momentum_buffer, momentum=0.95, nesterov=True):
    """buf <- momentum * buf + (1 - momentum) * grad (in place); returns the
    matrix to orthogonalize: grad + momentum * (buf - grad) with nesterov, else buf."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def apply_update(param, direction, *, lr, weight_decay, adjust_lr_fn, shape=None, flatten=False):
    """Decoupled weight decay, then the step scaled by `adjust_lr`, as torch.optim.Muon.
    `shape`: the whole parameter's shape when `param` is a shard of it."""
    lr = as_scalar(lr)
    param.mul_(1 - lr * weight_decay)
    param.add_(direction.reshape(param.shape), alpha=-adjust_lr(lr, adjust_lr_fn, shape or param.shape, flatten))
