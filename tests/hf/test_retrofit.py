"""to_parallax: exact at conversion, with and without the KV cache, in generate(); saves and loads."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel

from parallax.hf import FAMILIES, ParallaxCache, ParallaxSelfAttention, to_parallax

from .conftest import VOCAB, family_model

TIGHT = dict(rtol=0, atol=2e-6)  # float32; logits are O(1)
SLIDING = {"mistral", "qwen2", "qwen3"}


def greedy(model, x, use_cache):
    return model.generate(x, max_new_tokens=6, do_sample=False, use_cache=use_cache)


def cached_logits(model, x, prefill):
    """Prefill `prefill` tokens into a ParallaxCache, then decode the rest one token at a time."""
    cache = ParallaxCache()
    parts = [model(x[:, :prefill], past_key_values=cache).logits]
    for t in range(prefill, x.shape[1]):
        parts.append(model(x[:, t:t + 1], past_key_values=cache).logits)
    assert cache.get_seq_length() == x.shape[1]
    return torch.cat(parts, dim=1)


def perturb_probes(model, seed=1):
    """Give every probe a non-zero value (as after fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.r_proj.weight.copy_(0.3 * torch.randn(attn.r_proj.weight.shape, generator=g))
            if attn.r_norm is not None:
                attn.r_norm.weight.fill_(1.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_conversion_is_exact_with_and_without_cache(family):
    model = family_model(family)
    x = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    ref = model(x).logits
    ref_tokens = greedy(model, x, use_cache=True)
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    ref_beams = model.generate(x, **beams)
    originals = [layer.self_attn for layer in model.model.layers]

    assert to_parallax(model) is model
    assert type(model) is FAMILIES[family].model_class and model.config.model_type == f"parallax_{family}"
    for layer, old in zip(model.model.layers, originals):
        attn = layer.self_attn
        assert isinstance(attn, ParallaxSelfAttention) and not attn.training
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(attn, name) is getattr(old, name)  # the same weights, not copies
        r = attn.r_proj(torch.randn(3, 32))
        assert attn.r_norm is not None or torch.count_nonzero(r) == 0
        if attn.r_norm is not None:  # Qwen3: the probe's RMSNorm gain starts at zero
            assert attn.q_norm is old.q_norm and torch.count_nonzero(attn.r_norm.weight) == 0

    torch.testing.assert_close(model(x, use_cache=False).logits, ref, **TIGHT)
    torch.testing.assert_close(cached_logits(model, x, prefill=5), ref, **TIGHT)
    assert torch.equal(greedy(model, x, use_cache=True), ref_tokens)
    assert torch.equal(greedy(model, x, use_cache=False), ref_tokens)
    assert torch.equal(model.generate(x, **beams), ref_beams)  # the cache reorders for beam search

    if family in SLIDING:  # the window is applied: dropping it changes the logits
        windows = [layer.self_attn.window_size for layer in model.model.layers]
        assert any(w is not None for w in windows)
        for layer in model.model.layers:
            layer.self_attn.window_size = None
        assert (model(x).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_trained_probe_cache_matches_recompute_and_round_trips(family, tmp_path):
    model = to_parallax(family_model(family))
    x = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    before = model(x).logits
    perturb_probes(model)
    full = model(x, use_cache=False).logits
    assert (full - before).abs().max() > 1e-3  # the probe acts
    torch.testing.assert_close(cached_logits(model, x, prefill=4), full, rtol=0, atol=1e-5)
    tokens = greedy(model, x, use_cache=True)
    assert torch.equal(tokens, greedy(model, x, use_cache=False))

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    assert type(AutoConfig.from_pretrained(tmp_path)) is FAMILIES[family].config_class
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is FAMILIES[family].model_class
    assert all(isinstance(layer.self_attn, ParallaxSelfAttention) for layer in loaded.model.layers)
    torch.testing.assert_close(loaded(x, use_cache=False).logits, full, rtol=0, atol=0)  # bit for bit
    assert torch.equal(greedy(loaded, x, use_cache=True), tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_callers_config_is_left_as_it_was_and_no_buffer_is_added(family):
    """The converted model gets its own config (the caller builds the original model again from theirs),
    and the only new tensors are the probes: no rotary buffer per layer (the host's RoPE is used)."""
    model = family_model(family)
    config = model.config
    before = (type(config), config.to_dict(), config._attn_implementation)
    buffers = {name for name, _ in model.named_buffers()}
    params = {name for name, _ in model.named_parameters()}
    to_parallax(model)
    assert (type(config), config.to_dict(), config._attn_implementation) == before
    assert model.config is not config and model.model.config is model.config

    def values(c):  # the conversion adds the attention's backend and determinism, and names the new class
        return {k: v for k, v in c.to_dict().items()
                if k not in ("model_type", "architectures", "backend", "deterministic")}

    assert values(model.config) == values(config)
    assert {name for name, _ in model.named_buffers()} == buffers
    assert {name for name, _ in model.named_parameters()} - params == {
        name for name, _ in model.named_parameters() if ".r_proj." in name or ".r_norm." in name}
    FAMILIES[family].base_model(config)  # the original class still takes the caller's config


@torch.no_grad()
def test_a_q_k_scale_other_than_head_dim_is_carried_over():
    """A layer whose `scaling` is not head_dim ** -0.5 (Gemma-style query
    pre-attention scalars; here patched into a Llama) converts exactly."""
    model = family_model("llama")
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    default = model(x).logits
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.scaling = 0.9 / (i + 1)
    ref = model(x).logits
    assert (ref - default).abs().max() > 1e-3  # the scale matters
    to_parallax(model)
    assert [layer.self_attn.scale for layer in model.model.layers] == [0.9, 0.45]
    torch.testing.assert_close(model(x, use_cache=False).logits, ref, **TIGHT)
    torch.testing.assert_close(cached_logits(model, x, prefill=4), ref, **TIGHT)


@torch.no_grad()
def test_a_default_dynamic_cache_is_taken_over_empty_and_refused_filled():
    model = to_parallax(family_model("llama"))
    x = torch.randint(0, VOCAB, (1, 6))
    out = model(x, past_key_values=DynamicCache(config=model.config))
    assert out.past_key_values.get_seq_length() == 6
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="already holds 3 tokens"):
        model(x, past_key_values=filled)


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    model = to_parallax(family_model("mistral"))
    x = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(x, attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match="already a Parallax model"):
        to_parallax(model)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        to_parallax(gpt2)
