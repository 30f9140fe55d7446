"""`to_parallax(model)`: Llama-family transformers models with Parallax attention.

Each supported family gets a config subclass (model_type "parallax_<family>")
and a causal-LM subclass that builds the family's model and then swaps every
self-attention module for a `ParallaxSelfAttention` reusing its projections.
Both are registered with the Auto classes, so a converted model saves with
`save_pretrained` and loads back with `AutoModelForCausalLM.from_pretrained`.
The config's `backend` and `deterministic` (absent: None and True, as
everywhere in parallax) go to every layer.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from ..kernels.backend import check_backend
from ..kernels.checks import check_deterministic
from ..nn import ParallaxAttention
from .attention import ATTENTION_NAME, ParallaxSelfAttention
from .mixin import ParallaxModelMixin


def _window(attn: nn.Module, config) -> int | None:
    # Qwen2/Qwen3 attention modules carry their own layer's window (None on full-attention
    # layers); Mistral's read config.sliding_window; Llama has none.
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None)


def install_parallax_attention(model: nn.Module) -> None:
    """Replace every decoder layer's self_attn of `model` (a *ForCausalLM) in place."""
    config = model.config
    backend, deterministic = getattr(config, "backend", None), getattr(config, "deterministic", True)
    for idx, layer in enumerate(model.model.layers):
        if not isinstance(layer.self_attn, ParallaxSelfAttention):
            layer.self_attn = ParallaxSelfAttention.replacing(layer.self_attn, idx, _window(layer.self_attn, config),
                                                              backend=backend, deterministic=deterministic)
    config._attn_implementation = ATTENTION_NAME


class ParallaxRetrofit:
    """Mixin of the converted causal-LM classes: build the family's model, then install Parallax attention."""

    def __init__(self, config):
        self._use_parallax_attention(config)
        super().__init__(config)
        install_parallax_attention(self)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ParallaxAttention):
            module.reset_probe()  # a probe missing from a checkpoint starts at zero


def _parallax_forward(base_forward):
    """The family's forward (same signature, which generate() inspects), refusing what Parallax modules cannot do."""

    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        self._check_call(kwargs.get("output_attentions"))
        return base_forward(self, *args, **kwargs)

    return forward


@dataclass(frozen=True)
class Family:
    base_config: type
    base_model: type
    config_class: type
    model_class: type


def _family(name: str, base_config: type, base_model: type) -> Family:
    config_class = type(f"Parallax{base_config.__name__}", (base_config,),
                        {"model_type": f"parallax_{name}", "__module__": __name__})
    # GenerationMixin among the direct bases, as transformers' own model classes have it
    model_class = type(f"Parallax{base_model.__name__}", (ParallaxRetrofit, ParallaxModelMixin, base_model,
                                                          GenerationMixin),
                       {"config_class": config_class, "forward": _parallax_forward(base_model.forward),
                        "__module__": __name__})
    AutoConfig.register(config_class.model_type, config_class)
    AutoModelForCausalLM.register(config_class, model_class)
    globals()[config_class.__name__] = config_class  # importable by name (pickling, repr)
    globals()[model_class.__name__] = model_class
    return Family(base_config, base_model, config_class, model_class)


FAMILIES = {
    "llama": _family("llama", LlamaConfig, LlamaForCausalLM),
    "mistral": _family("mistral", MistralConfig, MistralForCausalLM),
    "qwen2": _family("qwen2", Qwen2Config, Qwen2ForCausalLM),
    "qwen3": _family("qwen3", Qwen3Config, Qwen3ForCausalLM),
}


def to_parallax(model: nn.Module, *, backend: str | None = None, deterministic: bool = True) -> nn.Module:
    """Give a Llama, Mistral, Qwen2 or Qwen3 causal LM Parallax attention, in place; returns it.

    Every self-attention module becomes a `ParallaxSelfAttention` holding the
    original q/k/v/o projections (the same tensors), q/k norms and biases,
    with the layer's q.k scale and sliding window, the model's own RoPE (any
    scaling), and a probe that starts at zero: right after conversion the
    logits are the original model's. backend and deterministic (those of
    `parallax_attn`) are stored in the config and given to every layer. The
    model's class becomes the registered Parallax subclass (same weights) and
    it gets a copy of its config as the Parallax config subclass (same values;
    the caller's config object is left as it was), so `save_pretrained` /
    `AutoModelForCausalLM.from_pretrained` round-trip it.
    """
    family = next((f for f in FAMILIES.values() if type(model) is f.base_model), None)
    if family is None:
        if any(type(model) is f.model_class for f in FAMILIES.values()):
            raise ValueError(f"model is already a Parallax model ({type(model).__name__})")
        names = ", ".join(f.base_model.__name__ for f in FAMILIES.values())
        raise TypeError(f"model must be one of {names}, got {type(model).__name__}")
    if type(model.config) is not family.base_config:
        raise TypeError(f"model.config must be a {family.base_config.__name__}, got {type(model.config).__name__}")
    check_backend(backend)
    check_deterministic(deterministic)
    # The model gets its own copy of the config, so the caller's object (from which
    # they may build the original model again) stays as it was.
    original = model.config
    config = copy.deepcopy(original)
    config.__class__ = family.config_class  # the subclass adds no state
    config.backend, config.deterministic = backend, deterministic
    for module in model.modules():
        if getattr(module, "config", None) is original:
            module.config = config
    install_parallax_attention(model)
    model.__class__ = family.model_class  # adds no state: every parameter tensor stays as it is
    return model
