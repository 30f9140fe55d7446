"""The implementations the benchmarks compare against, found at run time.

Each baseline is optional: `find` imports the first of its candidate
(module, attribute) pairs that works and says where it came from, or why
none did. FlashAttention 2 falls back to PyTorch SDPA's flash backend
(`sdpa_flash`) where `flash_attn` is not installed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F

FA2_KVCACHE = (("flash_attn", "flash_attn_with_kvcache"),)
# A FlashAttention 3 build installs flash_attn_interface; the forward-only fa3-fwd wheel fa3_fwd_interface.
FA3 = ("flash_attn_interface", "fa3_fwd_interface", "flash_attn_3.flash_attn_interface")
FA3_FUNC = tuple((module, "flash_attn_func") for module in FA3)
FA3_KVCACHE = tuple((module, "flash_attn_with_kvcache") for module in FA3)
# fla >= 0.6; its one-step decode is not exported from fla.ops.parallax.
FLA_PARALLAX = (("fla.ops.parallax", "parallel_parallax"),)
FLA_DECODE = (("fla.ops.parallax.decode", "parallax_decode_one_step"),)


@dataclass(frozen=True)
class Found:
    fn: Callable | None
    source: str  # "module.attribute", or "not found (why)"


def find(candidates: tuple[tuple[str, str], ...]) -> Found:
    reasons = []
    for module, attribute in candidates:
        try:
            return Found(getattr(importlib.import_module(module), attribute), f"{module}.{attribute}")
        # OSError: a shared library the module needs is missing
        except (ImportError, OSError, AttributeError) as err:
            reasons.append(f"{module}.{attribute}: {type(err).__name__}: {err}")
    return Found(None, "not found (" + "; ".join(reasons) + ")")


def sdpa_flash(q, k, v, *, causal: bool):
    """Softmax attention by SDPA's flash backend (FlashAttention 2), in parallax's [B, T, H, D] layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                           enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)
