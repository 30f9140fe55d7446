"""The AdamW step for the non-matrix parameters, with the exact operation order
of torch.optim.AdamW (single-tensor path), so results match it bit for bit."""


def adamw_update(param, grad, exp_avg, exp_avg_sq, step, *, lr, betas, eps, weight_decay):
    """One AdamW step; `step` is the 1-based count after this update."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
