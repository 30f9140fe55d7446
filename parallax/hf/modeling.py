"""`ParallaxForCausalLM`: parallax's GPT as a transformers causal LM.

The model holds a `parallax.models.GPT` (blocks, attention, init and all), so a
train.py checkpoint loads into `model.transformer` as is; this file only adds
transformers' interface: config, safetensors save/load, `generate()` with a KV
cache, the Auto-class registration.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models import GPT, GPTConfig
from ..nn.rope import RotaryEmbedding
from .attention import unpadded_mask
from .cache import ParallaxCache, parallax_cache_layer

# GPTConfig's fields, except tie_embeddings, which is transformers' tie_word_embeddings here.
# The output's cache field: `cache` from transformers 5.24 on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
GPT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "tie_embeddings")


class ParallaxConfig(PretrainedConfig):
    """A `GPTConfig` (same field names and defaults) as a transformers config."""

    model_type = "parallax"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                     "max_position_embeddings": "block_size"}

    def __init__(self, tie_word_embeddings: bool = False, use_cache: bool = True, **kwargs):
        self.use_cache = use_cache
        given = {name: kwargs.pop(name) for name in GPT_FIELDS if name in kwargs}
        gpt = GPTConfig(**given, tie_embeddings=tie_word_embeddings)  # validates
        for name in GPT_FIELDS:
            setattr(self, name, getattr(gpt, name))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_gpt_config(cls, config: GPTConfig, **kwargs) -> "ParallaxConfig":
        fields = config.to_dict()
        return cls(tie_word_embeddings=fields.pop("tie_embeddings"), **fields, **kwargs)

    def to_gpt_config(self) -> GPTConfig:
        return GPTConfig(**{name: getattr(self, name) for name in GPT_FIELDS},
                         tie_embeddings=bool(self.tie_word_embeddings))


class ParallaxForCausalLM(PreTrainedModel, GenerationMixin):
    """parallax's GPT (`self.transformer`) with transformers' causal-LM interface.

    `labels` follow transformers (the input ids; shifted inside, -100 ignored).
    Batches must be unpadded. Decoding caches keys and values in a
    `ParallaxCache` (generate() sets it up), read by `parallax_attn_with_kvcache`.
    """

    config_class = ParallaxConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: ParallaxConfig):
        super().__init__(config)
        self.transformer = GPT(config.to_gpt_config())
        self.post_init()

    def _init_weights(self, module):
        # GPT's own init; inside from_pretrained transformers guards loaded tensors, so only missing ones change.
        if isinstance(module, GPT):
            module.reset_parameters()
        elif isinstance(module, RotaryEmbedding):
            module.reset_parameters()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.transformer.lm_head

    def set_output_embeddings(self, value):
        self.transformer.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values=None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, cache=None, **kwargs) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids are required (ParallaxForCausalLM takes no inputs_embeds)")
        unpadded_mask(*input_ids.shape, input_ids.shape[1], attention_mask=attention_mask)
        if past_key_values is None:
            past_key_values = cache  # transformers 5.24 renamed past_key_values to cache
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        elif not isinstance(use_cache, bool):  # 'no' would read as True
            raise TypeError(f"use_cache must be None or a bool, got {use_cache!r}")
        caches = None
        if use_cache:
            if past_key_values is None:
                past_key_values = ParallaxCache()
            # keys come out of the projections in the weights' dtype
            like = input_ids.new_empty(input_ids.shape[0], dtype=self.transformer.wte.weight.dtype)
            caches = [parallax_cache_layer(past_key_values, i).reserve(input_ids.shape[1], like, block.attn.num_kv_heads,
                                                                         block.attn.head_dim)
                      for i, block in enumerate(self.transformer.blocks)]
        hidden = self.transformer.hidden_states(input_ids, caches)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.transformer.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: past_key_values if use_cache else None})


AutoConfig.register(ParallaxConfig.model_type, ParallaxConfig)
AutoModelForCausalLM.register(ParallaxConfig, ParallaxForCausalLM)
