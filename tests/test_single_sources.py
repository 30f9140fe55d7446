"""window_size, backend and deterministic: one check each, one default, one name,
from train.py's flags and the transformers configs down to the ops."""
import inspect

import pytest
import torch

from parallax import GPT, GPTConfig, ParallaxAttention, parallax_attn, parallax_attn_with_kvcache, softmax_attention
from parallax import parallax_reference
from parallax.hf import ParallaxConfig, ParallaxForCausalLM, to_parallax
from parallax.kernels.backend import check_backend
from parallax.kernels.checks import check_deterministic, check_window
from parallax.nn import attention as layer_module
from parallax.train import TrainConfig
from parallax.train.config import ConfigError

from .hf.conftest import family_model

q, r, k, v = (torch.randn(1, 5, 2, 8) for _ in range(4))
CACHE = dict(k_cache=torch.zeros(1, 8, 2, 8), v_cache=torch.zeros(1, 8, 2, 8),
             cache_seqlens=torch.zeros(1, dtype=torch.int32))

# name -> call(**{argument: value}) for every public entry point taking the argument
ENTRY_POINTS = {
    "parallax_attn": lambda **kw: parallax_attn(q, r, k, v, **kw),
    "softmax_attention": lambda **kw: softmax_attention(q, k, v, **kw),
    "parallax_attn_with_kvcache": lambda **kw: parallax_attn_with_kvcache(q, r, **CACHE, **kw),
    "parallax_reference": lambda **kw: parallax_reference(q, r, k, v, **kw),
    "ParallaxAttention": lambda **kw: ParallaxAttention(16, 2, **kw),
    "GPTConfig": lambda **kw: GPTConfig(**kw),
    "ParallaxConfig": lambda **kw: ParallaxConfig(**kw),
    "to_parallax": lambda **kw: to_parallax(family_model("llama"), **kw),
    "TrainConfig": lambda **kw: TrainConfig(**kw).validate(),
}
TAKES = {
    "window_size": ["parallax_attn", "softmax_attention", "parallax_attn_with_kvcache", "parallax_reference",
                    "ParallaxAttention", "GPTConfig", "ParallaxConfig"],
    "backend": ["parallax_attn", "softmax_attention", "parallax_attn_with_kvcache", "ParallaxAttention", "GPTConfig",
                "ParallaxConfig", "to_parallax", "TrainConfig"],
    "deterministic": ["parallax_attn", "softmax_attention", "ParallaxAttention", "GPTConfig", "ParallaxConfig",
                      "to_parallax", "TrainConfig"],
}
CHECKS = {"window_size": check_window, "backend": check_backend, "deterministic": check_deterministic}
BAD = {
    "window_size": [0, -3, 2.5, True, "4", [4]],
    "backend": ["cuda", "Triton", "", 0, False],
    "deterministic": [1, 0, "yes", None],
}
CASES = [(arg, name, value) for arg, names in TAKES.items() for name in names for value in BAD[arg]]


@pytest.mark.parametrize("arg,name,value", CASES, ids=[f"{a}-{n}-{v!r}" for a, n, v in CASES])
def test_every_entry_point_rejects_a_bad_value_as_the_one_check_does(arg, name, value):
    with pytest.raises((TypeError, ValueError)) as expected:
        CHECKS[arg](value)
    with pytest.raises(ConfigError if name == "TrainConfig" else expected.type) as got:
        ENTRY_POINTS[name](**{arg: value})
    assert str(got.value) in (str(expected.value), f"--{arg}: {expected.value}")  # train.py names its flag


def default(fn, name):
    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("arg", ["backend", "deterministic"])
def test_one_default_at_every_level(arg):
    defaults = {
        "parallax_attn": default(parallax_attn, arg),
        "softmax_attention": default(softmax_attention, arg),
        "ParallaxAttention": default(ParallaxAttention.__init__, arg),
        "GPTConfig": getattr(GPTConfig(), arg),
        "ParallaxConfig": getattr(ParallaxConfig(), arg),
        "to_parallax": default(to_parallax, arg),
        "TrainConfig": getattr(TrainConfig(), arg),
    }
    if arg == "backend":
        defaults["parallax_attn_with_kvcache"] = default(parallax_attn_with_kvcache, arg)
    assert set(defaults.values()) == {None if arg == "backend" else True}, defaults


def test_settings_reach_every_attention_call(monkeypatch):
    """GPTConfig, ParallaxConfig and to_parallax hand backend and deterministic
    to every layer, and a layer to the op it calls."""
    seen = []
    real = layer_module.parallax_attn

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], kwargs["deterministic"], kwargs["scale"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "parallax_attn", spy)
    settings = dict(backend="torch", deterministic=False)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=32, **settings))
    gpt(torch.zeros(1, 4, dtype=torch.long))
    hf = ParallaxForCausalLM(ParallaxConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=32, **settings))
    hf(torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    llama = to_parallax(family_model("llama"), **settings)
    assert llama.config.backend == "torch" and llama.config.deterministic is False
    llama(torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    scaled = [layer.self_attn.scaling for layer in family_model("llama").model.layers]
    assert seen == [("torch", False, None)] * 4 + [("torch", False, s) for s in scaled]
