"""Every public entry point, called with one argument replaced by a hostile
value, either works or raises ValueError / TypeError naming that argument,
before doing any work: never IndexError, ZeroDivisionError, OverflowError,
AttributeError or a RuntimeError from deep inside torch. Bool arguments
refuse non-bools ('no' would read as True). Zero-size batches (batch,
length or head_dim 0) give empty outputs of the right shape.
"""
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from parallax import (
    GPT, GPTConfig, KVCache, Muon, MuonWithAdamW, ParallaxAttention, orthogonalize, parallax_attn,
    parallax_attn_with_kvcache, parallax_reference, softmax_attention, split_params,
)

from .budget import budget

SCALARS = [None, True, False, 0, 1, -1, 7, 2**31, 2**63, 10**30, -10**30, 10**400, 0.0, -0.0, 0.5, 1e-40,
           float("nan"), float("inf"), -float("inf"), "", " ", "x", "no", "yes", "1", b"1", [], [1], (1, 2), {},
           complex(1, 1), object()]


# Hostile tensors for any tensor argument (made fresh for each call).
TENSORS = [
    lambda: torch.zeros(2, 5, 2, 8, dtype=torch.int64), lambda: torch.zeros(2, 5, 2, 8, dtype=torch.bool),
        lambda: torch.zeros(2, 5, 2, 8, dtype=torch.complex64), lambda: torch.zeros(2, 5, 2, 8, dtype=torch.float16),
        lambda: torch.zeros(2, 5, 2, 8, dtype=torch.float64), lambda: torch.zeros(5, 2, 8), lambda: torch.zeros(()),
        lambda: torch.zeros(2, 5, 2, 8, 1), lambda: torch.zeros(0, 5, 2, 8), lambda: torch.zeros(2, 0, 2, 8),
        lambda: torch.zeros(2, 5, 0, 8), lambda: torch.zeros(2, 5, 2, 0), lambda: torch.zeros(3, 5, 2, 8),
        lambda: torch.zeros(2, 6, 2, 8), lambda: torch.zeros(2, 5, 3, 8), lambda: torch.zeros(2, 5, 2, 9),
        lambda: torch.zeros(2, 8, 5, 2).permute(0, 2, 3, 1), lambda: torch.full((2, 5, 2, 8), float("nan")),
        lambda: torch.zeros(2, dtype=torch.int32), lambda: torch.tensor([0, 3, 5], dtype=torch.int32),
        lambda: torch.tensor([0, 5, 3], dtype=torch.int32), lambda: torch.tensor([-1, 5], dtype=torch.int32),
        lambda: torch.tensor([2**31 - 1, 0], dtype=torch.int32), lambda: torch.tensor([[1, 2]], dtype=torch.int64),
]
HOSTILE = [(lambda x=x: x) for x in SCALARS] + TENSORS


def qkv(B=2, T=5, S=5, HQ=2, HK=2, D=8):
    gen = torch.Generator().manual_seed(0)
    return {"q": torch.randn(B, T, HQ, D, generator=gen), "r": torch.randn(B, T, HQ, D, generator=gen) * 0.1,
            "k": torch.randn(B, S, HK, D, generator=gen), "v": torch.randn(B, S, HK, D, generator=gen)}


def decode_args():
    a = qkv(T=1)
    return {"q": a["q"], "r": a["r"], "k_cache": torch.randn(2, 8, 2, 8), "v_cache": torch.randn(2, 8, 2, 8),
            "cache_seqlens": torch.tensor([3, 0], dtype=torch.int32)}


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))


def muon(**kwargs):
    p = torch.nn.Parameter(torch.randn(4, 6))
    p.grad = torch.randn(4, 6)
    params = kwargs.pop("params", [p])
    opt = Muon(params, **kwargs)
    opt.step()
    return opt


def muon_with_adamw(**kwargs):
    m, e = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(6))
    m.grad, e.grad = torch.randn(4, 6), torch.randn(6)
    groups = [{"params": [m], "use_muon": kwargs.pop("use_muon", True)}, {"params": [e], "use_muon": False}]
    opt = MuonWithAdamW(groups, **kwargs)
    opt.step()
    return opt


# name: (call(**overrides), {argument: names its error may use}, bool arguments)
APIS = {
    "parallax_attn": (lambda **a: parallax_attn(**{**qkv(), **a}),
                      ["q", "r", "k", "v", "scale", "causal", "window_size", "cu_seqlens", "backend", "deterministic"],
                      {"causal", "deterministic"}),
    "softmax_attention": (lambda **a: softmax_attention(**{**{n: x for n, x in qkv().items() if n != "r"}, **a}),
                          ["q", "k", "v", "scale", "causal", "window_size", "cu_seqlens", "backend", "deterministic"],
                          {"causal", "deterministic"}),
    "parallax_reference": (lambda **a: parallax_reference(**{**qkv(), **a}),
                           ["q", "r", "k", "v", "scale", "causal", "window_size"], {"causal"}),
    "parallax_attn_with_kvcache": (
        lambda **a: parallax_attn_with_kvcache(**{**decode_args(), "backend": "torch", **a}),
        ["q", "r", "k_cache", "v_cache", "k", "v", "cache_seqlens", "scale", "window_size", "block_table",
         "backend", "check_values"], set()),
    "ParallaxAttention": (lambda **a: ParallaxAttention(**{"dim": 16, "num_heads": 2, **a})(torch.randn(2, 5, 16)),
                          ["dim", "num_heads", "num_kv_heads", "head_dim", "kind", "window_size", "qk_norm",
                           "rope_theta", "bias", "scale", "backend", "deterministic"], {"qk_norm", "bias", "deterministic"}),
    "ParallaxAttention.forward": (lambda **a: ParallaxAttention(16, 2)(**{"x": torch.randn(2, 5, 16), **a}),
                                  ["x", "cu_seqlens"], set()),
    "GPTConfig": (lambda **a: GPT(GPTConfig(**{"vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 16,
                                               "block_size": 16, **a}))(torch.zeros(1, 4, dtype=torch.int64)),
                  ["vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "window_size", "qk_norm",
                   "rope_theta", "tie_embeddings", "mlp_hidden", "backend", "deterministic"],
                  {"qk_norm", "tie_embeddings", "deterministic"}),
    "GPT.forward": (lambda **a: tiny_gpt()(**{"idx": torch.zeros(2, 4, dtype=torch.int64), **a}),
                    ["idx", "targets"], set()),
    "GPT.generate": (lambda **a: tiny_gpt().generate(**{"idx": torch.zeros(1, 3, dtype=torch.int64),
                                                        "max_new_tokens": 2, **a}),
                     ["idx", "max_new_tokens", "temperature", "top_k", "use_cache"], {"use_cache"}),
    "KVCache": (lambda **a: KVCache(**{"batch_size": 2, "max_seqlen": 8, "num_kv_heads": 2, "head_dim": 8, **a}),
                ["batch_size", "max_seqlen", "num_kv_heads", "head_dim"], set()),
    "orthogonalize": (lambda **a: orthogonalize(**{"G": torch.randn(4, 6), **a}),
                      ["G", "method", "steps", "eps", "compute_dtype"], set()),
    "Muon": (muon, ["params", "lr", "weight_decay", "momentum", "nesterov", "eps", "ns_steps", "adjust_lr_fn"],
             {"nesterov"}),
    "MuonWithAdamW": (muon_with_adamw, ["use_muon", "lr", "momentum", "nesterov", "flatten", "adamw_lr",
                                        "adamw_eps", "adamw_weight_decay", "update_rule", "orthogonalizer"],
                      {"nesterov", "flatten"}),
    "split_params": (lambda **a: split_params(**{"model": tiny_gpt(), **a}), ["model"], set()),
}
# Messages that name what is wrong in the terms of the mask or shape rule rather than the argument.
ALIASES = {"k": ("k", "heads", "head_dim", "batch"), "v": ("v", "k"), "r": ("r", "q"), "k_cache": ("cache",),
           "v_cache": ("cache",), "cu_seqlens": ("cu_seqlens", "q", "k"), "num_kv_heads": ("num_kv_heads", "num_heads"),
           "n_kv_head": ("n_kv_head", "n_head"), "n_embd": ("n_embd", "n_head", "head dim"),
           "n_head": ("n_head", "n_embd", "head dim"), "head_dim": ("head_dim",), "dim": ("dim", "num_heads"),
           "num_heads": ("num_heads", "dim"), "use_muon": ("use_muon", "Muon"), "x": ("x",),
           "targets": ("targets", "idx"), "max_seqlen": ("max_seqlen",), "model": ("model", "Module", "module"),
           "rope_theta": ("rope_theta",), "G": ("G", "matrix"), "params": ("params", "parameter")}
CALLS = [(api, arg) for api, (_, args, _) in APIS.items() for arg in args]
# Sizes and counts: a huge value that is valid would allocate or loop for ever, so only small ints are tried.
SIZES = {"dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
         "block_size", "mlp_hidden", "max_new_tokens", "batch_size", "max_seqlen", "steps", "ns_steps"}


def affordable(arg: str, x) -> bool:
    return arg not in SIZES or not isinstance(x, int) or x <= 64


@budget(150)
@given(call=st.sampled_from(CALLS), value=st.sampled_from(HOSTILE))
def test_one_hostile_argument(call, value):
    api, arg = call
    function, _, flags = APIS[api]
    x = value()
    assume(affordable(arg, x))
    try:
        function(**{arg: x})
    except (ValueError, TypeError) as e:
        names = ALIASES.get(arg, (arg,))
        assert any(name in str(e) for name in names), f"{api}({arg}={x!r:.60}): {type(e).__name__}: {e}"
        return
    assert arg not in flags or isinstance(x, bool), f"{api}({arg}={x!r}) accepted a non-bool"


@pytest.mark.parametrize("shape", [(0, 5, 2, 8), (2, 0, 2, 8), (2, 5, 2, 0)], ids=["batch 0", "length 0", "head_dim 0"])
def test_zero_size_batches_give_empty_outputs(shape):
    B, T, H, D = shape
    q = torch.zeros(shape, requires_grad=True)
    k = torch.zeros(B, 7, H, D)
    outs = [parallax_attn(q, q, k, k), parallax_attn(q, q, k, k, backend="torch"), softmax_attention(q, k, k),
            parallax_reference(q, q, k, k), parallax_attn(q, q, k, k, causal=False)]
    if T:
        outs.append(parallax_attn_with_kvcache(q, q, torch.zeros(B, 8, H, D), torch.zeros(B, 8, H, D),
                                               cache_seqlens=torch.zeros(B, dtype=torch.int32)))
    for out in outs:
        assert out.shape == shape
    outs[0].sum().backward()  # differentiable like any empty result
    model = tiny_gpt()
    logits, _ = model(torch.zeros(B, T, dtype=torch.int64))
    assert logits.shape == (B, T, 64)
    assert ParallaxAttention(16, 2)(torch.zeros(B, T, 16)).shape == (B, T, 16)
    empty = torch.zeros(0, 4) if B == 0 else torch.zeros(4, 0)
    assert orthogonalize(empty).shape == empty.shape
    p = torch.nn.Parameter(empty.clone())
    p.grad = torch.zeros_like(p)
    Muon([p]).step()


def test_generate_at_a_tiny_temperature_is_greedy():
    """temperature=1e-40 (and subnormal ones) is documented as valid; it samples the argmax."""
    model = tiny_gpt()
    prompt = torch.zeros(1, 3, dtype=torch.int64)
    greedy = model.generate(prompt, 5, temperature=0)
    for t in (1e-40, 1e-320, math.ulp(0.0)):
        assert torch.equal(model.generate(prompt, 5, temperature=t), greedy)
