"""On CUDA the converted model runs on parallax's Triton kernels (prefill and decode) and matches the torch path.

bf16 tolerance follows FlashAttention's rule: the Triton run's error against a
float32 reference is at most twice the error of the torch path run in bf16, plus a floor.
"""
import pytest
import torch
from transformers import (CompileConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from parallax.hf import ParallaxConfig, ParallaxForCausalLM, to_parallax

from ..kernels.oracle import assert_within_rule, max_err
from .model_tester import build, padded_batch
from .test_retrofit import cached_logits, perturb_probes

pytestmark = pytest.mark.gpu

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
MODELS = {  # head_dim 64: a size the Triton kernels take
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=16)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=64)),
}


def set_backend(model, backend):
    for layer in model.model.layers:
        layer.self_attn.backend = backend
    return model


@pytest.mark.parametrize("family", sorted(MODELS))
@torch.no_grad()
def test_converted_model_on_triton_matches_torch_path_bf16(family):
    torch.manual_seed(0)
    model = to_parallax(MODELS[family]().eval())
    perturb_probes(model)
    for layer in model.model.layers:
        layer.self_attn.r_proj.weight.mul_(0.1)  # a moderate correction at this width
    x = torch.randint(0, SHAPE["vocab_size"], (2, 48))
    ref_full = model(x, use_cache=False).logits.double()  # float32 torch path on CPU
    ref_cached = cached_logits(model, x, prefill=20).double()
    model.to("cuda", torch.bfloat16)
    xc = x.cuda()
    for name, run in (("prefill", lambda m: m(xc, use_cache=False).logits),
                      ("decode", lambda m: cached_logits(m, xc, prefill=20))):
        ref = ref_full if name == "prefill" else ref_cached
        torch_err = max_err(run(set_backend(model, "torch")).cpu(), ref)
        triton = run(set_backend(model, "triton")).cpu()
        assert torch.equal(run(set_backend(model, None)).cpu(), triton)  # CUDA picks Triton by default
        assert_within_rule(f"{family} {name}", max_err(triton, ref), torch_err, floor=2e-2)


@torch.no_grad()
def test_native_model_generate_on_cuda_matches_gpt_generate():
    torch.manual_seed(0)
    model = ParallaxForCausalLM(ParallaxConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
                                               block_size=128, window_size=24)).cuda().eval()
    for block in model.transformer.blocks:
        block.attn.r_proj.weight.normal_(std=0.02)
    x = torch.randint(0, 256, (2, 16), device="cuda")
    cached = model.generate(x, max_new_tokens=40, do_sample=False)
    assert torch.equal(cached, model.generate(x, max_new_tokens=40, do_sample=False, use_cache=False))
    assert torch.equal(cached, model.transformer.generate(x, 40, temperature=0))


@pytest.mark.parametrize("kind", ["parallax", "llama"])
@torch.no_grad()
def test_padded_batches_and_compiled_generation_on_cuda(kind):
    """On CUDA (Triton prefill and decode, float32): a left-padded batch generates for each prompt what it
    generates alone, also with a static cache, and transformers' compiled decoding (inductor, CUDA graphs)
    gives the same tokens."""
    model = build(kind).cuda()
    ids, mask, prompts = padded_batch([5, 9, 2], "left")
    ids, mask = ids.cuda(), mask.cuda()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None].cuda(), max_new_tokens=6, do_sample=False)[0, len(prompt):]
        assert torch.equal(out[row, ids.shape[1]:], alone)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(static, out)
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
    assert torch.equal(compiled, out)
