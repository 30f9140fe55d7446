"""Independent float64 recomputation and FlashAttention's tolerance rule.

The oracle uses the covariance form o = mu - Cov_p(s2, v), row by row, not the
w-form of `parallax_reference`, so the two are genuinely different computations.
"""
import torch


def mask_f64(T, S, causal, window_size):
    i = torch.arange(T)[:, None] + S - T
    j = torch.arange(S)[None, :]
    keep = torch.ones(T, S, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window_size is not None:
        keep &= j > i - window_size
    return keep


def parallax_f64(q, r, k, v, *, scale=None, causal=True, window_size=None):
    """Covariance-form Parallax attention in float64, one (batch, head) at a time."""
    q, r, k, v = (x.double() for x in (q, r, k, v))
    B, T, HQ, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    keep = mask_f64(T, S, causal, window_size)
    out = torch.zeros(B, T, HQ, D, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            kh, vh = k[b, :, h // (HQ // HK)], v[b, :, h // (HQ // HK)]
            for i in range(T):
                cols = keep[i].nonzero().flatten()
                if cols.numel() == 0:
                    continue
                p = torch.softmax(scale * kh[cols] @ q[b, i, h], dim=0)
                s2 = kh[cols] @ r[b, i, h]
                mu = p @ vh[cols]
                cov = (p * (s2 - p @ s2)) @ vh[cols]
                out[b, i, h] = mu - cov
    return out


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_within_rule(name, err_kernel, err_same_precision, floor):
    """FlashAttention's rule: at most twice the error of the same-precision
    PyTorch computation against float64, plus a small floor."""
    bound = 2 * err_same_precision + floor
    assert err_kernel <= bound, f"{name}: error {err_kernel:.3g} exceeds 2 x {err_same_precision:.3g} + {floor:g}"


def softmax_attention_f64(q, k, v, *, scale, causal=True, window_size=None):
    """Plain masked softmax attention in float64 (rows that see no key give 0)."""
    T, S, G = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    k, v = (x.double().repeat_interleave(G, dim=2) for x in (k, v))
    keep = mask_f64(T, S, causal, window_size)
    has_key = keep.any(-1, keepdim=True)
    s = torch.einsum("bthd,bshd->bhts", q.double(), k) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0), -1).masked_fill(~keep, 0.0)
    return torch.einsum("bhts,bshd->bthd", p, v)


def parallax_jvp_f64(q, r, k, v, *, scale=None, causal=True, window_size=None):
    """Parallax attention from the identity o = A(q) - dA(q)[r / scale]: softmax
    attention minus its forward-mode derivative in q along the probe. Differentiable
    (reverse over forward), so it checks gradients too."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attend = lambda x: softmax_attention_f64(x, k, v, scale=scale, causal=causal, window_size=window_size)  # noqa: E731
    a, da = torch.func.jvp(attend, (q.double(),), (r.double() / scale,))
    return a - da
