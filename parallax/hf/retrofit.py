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

from dataclasses import dataclass

from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from ..kernels.backend import check_backend
from ..kernels.checks import check_deterministic
from ..nn import ParallaxAttention
from ..nn.rope import RotaryEmbedding
from .attention import ATTENTION_NAME, ParallaxSelfAttention


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
        config._attn_implementation = ATTENTION_NAME
        super().__init__(config)
        install_parallax_attention(self)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ParallaxAttention):
            module.reset_probe()  # a probe missing from a checkpoint starts at zero
        elif isinstance(module, RotaryEmbedding):
            module.reset_parameters()


@dataclass(frozen=True)
class Family:
    base_config: type
    base_model: type
    config_class: type
    model_class: type


def _family(name: str, base_config: type, base_model: type) -> Family:
    config_class = type(f"Parallax{base_config.__name__}", (base_config,),
                        {"model_type": f"parallax_{name}", "__module__": __name__})
    model_class = type(f"Parallax{base_model.__name__}", (ParallaxRetrofit, base_model),
                       {"config_class": config_class, "__module__": __name__})
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
    model's class and config class become the registered Parallax subclasses
    (same weights, same config values), so `save_pretrained` /
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
    model.config.backend, model.config.deterministic = backend, deterministic
    install_parallax_attention(model)
    # The subclasses add no state, so switching the classes keeps every submodule's
    # reference to the one config object and every parameter tensor as they are.
    model.config.__class__ = family.config_class
    model.__class__ = family.model_class
    return model
