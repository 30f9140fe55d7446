"""The launcher calls the AOT sweep makes: small CPU tensors handed to the
real launchers (`parallax_fwd`, `parallax_bwd`, `triton_decode`), whose kernel
launches `capture.capture` records instead of running.

A `Scenario` names one call: which launcher, dtype, head dim and the flags
that change the compiled code. Shapes are small but keep the alignment real
runs have (sequence lengths and head counts times head dims divisible by 16),
so Triton specialises the arguments as it would on a GPU.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# "backward": the default three-launch backward (deterministic=True);
# "backward_fused": the one-launch backward with atomics (deterministic=False).
TRAINING_KINDS = ("forward", "backward", "backward_fused")
DECODE_LAYOUTS = ("contiguous", "paged")


@dataclass(frozen=True)
class Scenario:
    kind: str                 # one of TRAINING_KINDS or "decode"
    arch: int
    dtype: str                # torch dtype name: "bfloat16", "float16", "float32"
    head_dim: int
    causal: bool = True
    window: bool = False
    varlen: bool = False
    group: int = 1            # query heads per KV head
    layout: str = "contiguous"  # decode: "contiguous" or "paged"
    append: bool = False        # decode: new k, v appended by the launch
    splits: int = 0             # decode: 0 = the launcher's choice

    def flags(self) -> str:
        """The code-changing flags, for the table."""
        if self.kind == "decode":
            words = [self.layout] + (["append"] if self.append else [])
            if self.splits:
                words.append(f"splits={self.splits}")
        else:
            words = ["causal" if self.causal else "noncausal"]
            words += [w for w, on in (("window", self.window), ("varlen", self.varlen)) if on]
        return " ".join(words + [f"G{self.group}"])


def _training_call(s: Scenario):
    from ..triton.backward import parallax_bwd
    from ..triton.forward import parallax_fwd

    dtype = getattr(torch, s.dtype)
    T, HK, D = 128, 2, s.head_dim
    HQ = HK * s.group
    q, r, grad = (torch.randn(1, T, HQ, D).to(dtype) for _ in range(3))
    k, v = (torch.randn(1, T, HK, D).to(dtype) for _ in range(2))
    cu = torch.tensor([0, 48, T], dtype=torch.int32) if s.varlen else None
    window = 64 if s.window else None
    scale = D**-0.5
    if s.kind == "forward":
        parallax_fwd(q, r, k, v, scale, s.causal, window, cu)
        return
    stats = torch.zeros(1, HQ, T)
    parallax_bwd(grad, q, r, k, v, q, stats, stats, q, scale, s.causal, window, cu,
                 deterministic=s.kind == "backward")


def decode_supported(dtype: str, head_dim: int) -> bool:
    """Whether the decode dispatcher sends these inputs to the Triton kernel by default."""
    from .. import decode
    from ..triton.resources import wide_float32

    return (getattr(torch, dtype) in decode.TRITON_DTYPES and head_dim in decode.TRITON_HEAD_DIMS
            and not wide_float32(dtype, head_dim))


def _decode_call(s: Scenario):
    from ..triton.decode import triton_decode

    dtype = getattr(torch, s.dtype)
    B, HK, D, capacity, page = 2, 2, s.head_dim, 256, 64
    HQ = HK * s.group
    q, r = (torch.randn(B, 1, HQ, D).to(dtype) for _ in range(2))
    if s.layout == "paged":
        k_cache, v_cache = (torch.randn(B * capacity // page, page, HK, D).to(dtype) for _ in range(2))
        table = torch.arange(B * capacity // page, dtype=torch.int32).view(B, -1)
    else:
        k_cache, v_cache = (torch.randn(B, capacity, HK, D).to(dtype) for _ in range(2))
        table = None
    new = dict(k=torch.randn(B, 1, HK, D).to(dtype), v=torch.randn(B, 1, HK, D).to(dtype)) if s.append else {}
    seqlens = torch.tensor([100, 200], dtype=torch.int32)
    options = {}
    if s.splits and "num_splits" in inspect.signature(triton_decode).parameters:
        options["num_splits"] = s.splits
    triton_decode(q, r, k_cache, v_cache, seqlens, table, **new, scale=D**-0.5, window_size=None, **options)


def run_scenario(s: Scenario) -> None:
    """Call the launcher; inside `capture.capture` this only records launches."""
    (_decode_call if s.kind == "decode" else _training_call)(s)
