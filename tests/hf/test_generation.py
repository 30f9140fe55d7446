"""The generation checks of transformers' test suite that apply to Parallax models, on left-padded batches
with non-zero probes: every decoding method with and without the cache, continuing from a returned cache,
static caches, compiled decoding steps, prompt-lookup decoding."""
import pytest
import torch
from transformers import CompileConfig

from parallax.hf import StaticParallaxCache

from .model_tester import MAIN_KINDS, build, padded_batch


def prompts(seed=0):
    ids, mask, _ = padded_batch([4, 7, 2], "left", seed=seed)
    return dict(input_ids=ids, attention_mask=mask)


def run(model, **kwargs):
    return model.generate(**prompts(), max_new_tokens=5, return_dict_in_generate=True, output_scores=True, **kwargs)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@pytest.mark.parametrize("method", [dict(do_sample=False), dict(do_sample=True, top_k=5, num_return_sequences=2),
                                    dict(num_beams=3, num_return_sequences=2, do_sample=False)],
                         ids=["greedy", "sample", "beam"])
@torch.no_grad()
def test_decoding_with_cache_equals_without(kind, method):
    model = build(kind)
    torch.manual_seed(0)
    cached = run(model, use_cache=True, **method)
    torch.manual_seed(0)
    assert_same_generation(cached, run(model, use_cache=False, **method))


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_generate_outputs(kind):
    """Scores, logits and hidden states of generate() have transformers' shapes."""
    model = build(kind)
    out = run(model, do_sample=False, output_logits=True, output_hidden_states=True)
    assert out.sequences.shape == (3, 12) and len(out.scores) == len(out.logits) == 5
    assert all(s.shape == (3, model.config.vocab_size) for s in out.scores)
    prefill, *steps = out.hidden_states
    assert len(prefill) == model.config.num_hidden_layers + 1 and prefill[0].shape[:2] == (3, 7)
    assert all(step[0].shape[:2] == (3, 1) for step in steps)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_continue_from_returned_cache(kind):
    """3 + 2 tokens through the returned cache are the 5 tokens of one call."""
    model = build(kind)
    batch = prompts()
    whole = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    first = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, 3), value=1)
    cache = getattr(first, "cache", None) or first.past_key_values
    rest = model.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                          do_sample=False)
    assert torch.equal(rest, whole.sequences)


@pytest.mark.parametrize("kind", [*MAIN_KINDS, "mistral"])
@torch.no_grad()
def test_static_cache_equals_dynamic(kind):
    """cache_implementation="static" (a StaticParallaxCache, also on sliding layers) and transformers'
    StaticCache passed in (its full-attention layers become Parallax layers of their capacity)."""
    model = build(kind)
    dynamic = run(model, do_sample=False)
    static = run(model, do_sample=False, cache_implementation="static")
    assert_same_generation(static, dynamic)
    cache = static.cache if hasattr(static, "cache") else static.past_key_values
    assert isinstance(cache, StaticParallaxCache)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_static_cache_beam_search_and_fixed_batch(kind):
    """Beam search reorders a static cache in place (its addresses stay fixed); changing its batch raises."""
    model = build(kind)
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False)
    static = run(model, cache_implementation="static", **beams)
    assert_same_generation(static, run(model, **beams))
    cache = static.cache if hasattr(static, "cache") else static.past_key_values
    with pytest.raises(NotImplementedError, match="fixed batch size"):
        cache.batch_repeat_interleave(2)
    with pytest.raises(NotImplementedError, match="fixed batch size"):
        cache.batch_select_indices(torch.tensor([0]))


@pytest.mark.parametrize("kind", ["parallax", "qwen3"])
@torch.no_grad()
def test_compiled_decoding_equals_eager(kind):
    """transformers' compiled generation: a static cache, each decoding step one full graph (no host
    sync, no recompilation between steps)."""
    model = build(kind)
    eager = run(model, do_sample=False, cache_implementation="static")
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CPU only when told to
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(model, do_sample=False, cache_implementation="static", compile_config=config)
    assert_same_generation(compiled, eager)


@pytest.mark.parametrize("kind", ["parallax", "llama"])
@torch.no_grad()
def test_prompt_lookup_decoding_equals_greedy(kind):
    """Candidates from the prompt, verified in one call, rejected ones cropped from the cache."""
    model = build(kind)
    ids = torch.randint(1, 30, (1, 12), generator=torch.Generator().manual_seed(5)).repeat(1, 2)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3), greedy)
