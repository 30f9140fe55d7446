"""`ParallaxForCausalLM`: parallax's GPT as a transformers causal LM.

The model holds a `parallax.models.GPT` (blocks, attention, init and all), so a
train.py checkpoint loads into `model.transformer` as is; this file only adds
transformers' interface: config, safetensors save/load, `generate()` with a KV
cache (dynamic or static), padded and packed batches (`padding.py`), hidden
states, gradient checkpointing, the Auto-class registration.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from ..models import GPT, GPTConfig
from ..models.gpt import Block
from ..nn.rope import RotaryEmbedding
from .cache import ParallaxCache, parallax_cache_layer
from .mixin import ParallaxModelMixin
from .padding import LeftPaddedChunk, PackedTokens, check_one_sequence_per_row, padding_mask_or_none

# GPTConfig's fields, except tie_embeddings, which is transformers' tie_word_embeddings here.
# The output's cache field: `cache` from transformers 5.24 on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
GPT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "tie_embeddings")


class ParallaxConfig(PretrainedConfig):
    """A `GPTConfig` (same field names and defaults) as a transformers config; transformers' names
    (hidden_size, num_attention_heads, num_key_value_heads, ...) read and set the same fields."""

    model_type = "parallax"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                     "max_position_embeddings": "block_size"}

    def __init__(self, tie_word_embeddings: bool = False, use_cache: bool = True, **kwargs):
        self.use_cache = use_cache
        aliases = {**self.attribute_map, "num_key_value_heads": "n_kv_head"}
        given = {aliases.get(name, name): kwargs.pop(name) for name in list(kwargs)
                 if aliases.get(name, name) in GPT_FIELDS}
        gpt = GPTConfig(**given, tie_embeddings=tie_word_embeddings)  # validates
        for name in GPT_FIELDS:
            setattr(self, name, getattr(gpt, name))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:
        self.n_kv_head = value

    @classmethod
    def from_gpt_config(cls, config: GPTConfig, **kwargs) -> "ParallaxConfig":
        fields = config.to_dict()
        return cls(tie_word_embeddings=fields.pop("tie_embeddings"), **fields, **kwargs)

    def to_gpt_config(self) -> GPTConfig:
        return GPTConfig(**{name: getattr(self, name) for name in GPT_FIELDS},
                         tie_embeddings=bool(self.tie_word_embeddings))


class CheckpointedBlock(GradientCheckpointingLayer, Block):
    """GPT's `Block` as transformers' checkpointable layer (no state of its own): with
    `gradient_checkpointing_enable()` its activations are recomputed in the backward pass."""


class ParallaxForCausalLM(ParallaxModelMixin, PreTrainedModel, GenerationMixin):
    """parallax's GPT (`self.transformer`) with transformers' causal-LM interface.

    `labels` follow transformers (the input ids; shifted inside, -100 ignored).
    A padded batch (`attention_mask` with zeros) or packed sequences
    (restarting `position_ids`) run without a mask: their tokens are packed
    into variable-length sequences (`cu_seqlens`), or, through a KV cache,
    left-padded (`cache_leftpad`). Decoding caches keys and values in a
    `ParallaxCache` (generate() sets it up; `StaticParallaxCache` for
    cache_implementation="static"), read by `parallax_attn_with_kvcache`.
    """

    config_class = ParallaxConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _can_compile_fullgraph = True
    _no_split_modules = ["CheckpointedBlock"]
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: ParallaxConfig):
        self._use_parallax_attention(config)  # transformers then hands forward() the 2D padding mask
        super().__init__(config)
        self.transformer = GPT(config.to_gpt_config())
        for block in self.transformer.blocks:
            block.__class__ = CheckpointedBlock
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

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int | torch.Tensor = 0, cache=None,
                **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        self._check_call(output_attentions)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if past_key_values is None:
            past_key_values = cache  # transformers 5.24 renamed past_key_values to cache
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        elif not isinstance(use_cache, bool):  # 'no' would read as True
            raise TypeError(f"use_cache must be None or a bool, got {use_cache!r}")
        embeds = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = embeds.shape[:2]
        past = self._past_length(past_key_values if use_cache else None, T)
        given_positions = position_ids  # only given positions can mark packed sequences
        if position_ids is None:  # transformers' default: the positions after the cache, padding included
            position_ids = (torch.arange(T, device=embeds.device) + past)[None]
        attention_mask = padding_mask_or_none(attention_mask)
        layout, caches = None, [None] * len(self.transformer.blocks)
        if use_cache:
            if past_key_values is None:
                past_key_values = ParallaxCache()
            layout = LeftPaddedChunk.of(attention_mask, B, T)
            check_one_sequence_per_row(position_ids, layout)
            pads = None if layout is None else layout.pads
            caches = [parallax_cache_layer(past_key_values, i).reserve(T, embeds, block.attn.num_kv_heads,
                                                                         block.attn.head_dim, pads)
                      for i, block in enumerate(self.transformer.blocks)]
            cu_seqlens = None
        else:
            layout = PackedTokens.of(attention_mask, given_positions, B, T)
            cu_seqlens = None if layout is None else layout.cu_seqlens
        x = embeds
        if layout is not None:
            x = layout.pack(x)
            position_ids = layout.pack(position_ids)

        def unpack(h):
            return h if layout is None else layout.unpack(h)

        hidden_states = [embeds] if output_hidden_states else None
        for block, kv in zip(self.transformer.blocks, caches):
            x = block(x, cache=kv, positions=position_ids, cu_seqlens=cu_seqlens)
            if output_hidden_states:
                hidden_states.append(unpack(x))
        hidden = unpack(self.transformer.norm(x))
        if output_hidden_states:
            hidden_states[-1] = hidden  # transformers' last hidden state is after the final norm
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.transformer.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      hidden_states=None if hidden_states is None else tuple(hidden_states),
                                      **{CACHE_FIELD: past_key_values if use_cache else None})

    def _past_length(self, cache, new_tokens: int):
        """Tokens already in the cache (an int, or a device tensor for a static cache), checked against
        block_size except while torch.compile traces."""
        past = 0 if cache is None else cache.get_seq_length()
        if not torch.compiler.is_compiling() and int(past) + new_tokens > self.config.block_size:
            raise ValueError(f"sequence length {int(past) + new_tokens} exceeds block_size {self.config.block_size}")
        return past


AutoConfig.register(ParallaxConfig.model_type, ParallaxConfig)
AutoModelForCausalLM.register(ParallaxConfig, ParallaxForCausalLM)
