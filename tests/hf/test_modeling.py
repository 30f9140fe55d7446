"""ParallaxForCausalLM: Auto classes, safetensors round trip, generate() == GPT.generate."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from parallax.hf import ParallaxCache, ParallaxConfig, ParallaxForCausalLM

SHAPE = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=48)


def trained_like(config: ParallaxConfig, seed=0) -> ParallaxForCausalLM:
    """A model whose probes are non-zero, so the Parallax correction is exercised."""
    torch.manual_seed(seed)
    model = ParallaxForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.attn.r_proj.weight.normal_(std=0.3)
    return model


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_save_pretrained_round_trips_through_auto_classes(tmp_path, tie):
    model = trained_like(ParallaxConfig(**SHAPE, tie_word_embeddings=tie))
    x = torch.randint(0, 64, (2, 9))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "parallax"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ParallaxConfig) and config.to_gpt_config() == model.transformer.config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ParallaxForCausalLM
    assert (loaded.transformer.lm_head.weight is loaded.transformer.wte.weight) == tie
    assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("window", [None, 5])
@torch.no_grad()
def test_generate_with_cache_equals_without_and_gpt_generate(window):
    model = trained_like(ParallaxConfig(**SHAPE, window_size=window))
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(x, max_new_tokens=12, do_sample=False)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, model.generate(x, max_new_tokens=12, do_sample=False, use_cache=False))
    assert torch.equal(cached, model.transformer.generate(x, 12, temperature=0))
    cache = ParallaxCache()  # chunked decoding through a cache gives the whole-sequence logits
    whole = model(cached, use_cache=False).logits
    parts = [model(cached[:, :4], past_key_values=cache).logits, model(cached[:, 4:19], past_key_values=cache).logits]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-5)


def test_config_and_inputs_are_validated():
    with pytest.raises(ValueError, match="n_embd"):
        ParallaxConfig(n_embd=30, n_head=4)
    config = ParallaxConfig(**SHAPE, num_key_value_heads=1)  # transformers' names set GPTConfig's fields
    assert config.n_kv_head == config.num_key_value_heads == 1 and config.hidden_size == 32
    assert ParallaxConfig(n_head=4).num_key_value_heads == 4  # n_kv_head=None: one KV head per query head
    model = trained_like(ParallaxConfig(**SHAPE))
    x = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(x, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(x, inputs_embeds=model.get_input_embeddings()(x))
    labels = x.clone()
    loss = model(x, labels=labels).loss  # transformers' convention: labels are the inputs, shifted inside
    expected = torch.nn.functional.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)
