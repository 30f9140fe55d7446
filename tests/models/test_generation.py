"""GPT.generate's decoding loop (parallax/models/generation.py): the graph-free logic on CPU,
the CUDA graphs behind the `gpu` marker."""
import copy
import pickle
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from parallax.kernels import decode as decode_module
from parallax.models import GPT, preset
from parallax.models.cuda_graphs import graphed_decoding
from parallax.models.generation import DecodeState, Sampling, cache_capacity, decode, run_eagerly, sample_next

pytestmark = pytest.mark.usefixtures("one_thread")


def probed_model(attention: str, dtype=torch.float64, **overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset("tiny", attention=attention, **overrides)).to(dtype)
    with torch.no_grad():  # a non-zero probe, so the Parallax path differs from softmax
        for block in model.blocks:
            if block.attn.r_proj is not None:
                block.attn.r_proj.weight.normal_(0, 0.05)
    return model.eval()


def multinomial_reference(model: GPT, idx, max_new_tokens, temperature, top_k, generator):
    """The plainest generation: the cropped context recomputed every step, torch.multinomial sampling."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[0][:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), vocab=st.integers(1, 300), temperature=st.floats(0.05, 4.0),
       top_k=st.none() | st.integers(1, 400), scale=st.floats(0.0, 20.0), seed=st.integers(0, 2**31 - 1))
def test_sample_next_draws_what_torch_multinomial_draws(batch, vocab, temperature, top_k, scale, seed):
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    ours, theirs = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    got = sample_next(logits, Sampling(temperature, top_k, ours))
    scaled = logits / temperature
    if top_k is not None:
        kth = torch.topk(scaled, min(top_k, vocab), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    expected = torch.multinomial(torch.softmax(scaled, -1), 1, generator=theirs)
    assert got.shape == (batch, 1) and got.dtype == torch.int64
    assert torch.equal(got, expected)
    assert torch.equal(ours.get_state(), theirs.get_state())  # the generator advanced alike
    if top_k is not None:  # never outside the k most likely
        assert bool((logits.gather(1, got) >= torch.topk(logits, min(top_k, vocab), -1).values[:, -1:]).all())


def test_sample_next_greedy_is_argmax_and_draws_nothing():
    logits = torch.randn(3, 50)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.equal(sample_next(logits, Sampling(0.0, 5, generator)), logits.argmax(-1, keepdim=True))
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 9)])
@pytest.mark.parametrize("prompt_len,new_tokens", [(5, 12), (5, 30), (40, 6)])  # fits; outgrows; prompt > block
def test_generate_matches_the_multinomial_reference(attention, temperature, top_k, prompt_len, new_tokens):
    model = probed_model(attention, block_size=24, n_kv_head=1)
    prompt = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    got = model.generate(prompt, new_tokens, temperature=temperature, top_k=top_k, generator=ours)
    expected = multinomial_reference(model, prompt, new_tokens, temperature, top_k, theirs)
    assert torch.equal(got, expected)
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_generate_returns_int64_after_an_int32_prompt_and_the_prompt_for_no_new_tokens():
    model = probed_model("parallax")
    prompt = torch.randint(0, 256, (2, 4), dtype=torch.int32)
    out = model.generate(prompt, 3, temperature=0)
    assert out.dtype == torch.int64 and torch.equal(out[:, :4], prompt.long())
    assert model.generate(prompt, 0) is prompt


@pytest.mark.parametrize("prompt_len,new_tokens,block,capacity", [
    (5, 1, 24, 5), (5, 12, 24, 16), (5, 20, 24, 24), (5, 30, 24, 24), (40, 6, 24, 24), (1, 1, 1, 1),
])
def test_cache_capacity(prompt_len, new_tokens, block, capacity):
    assert cache_capacity(prompt_len, new_tokens, block) == capacity


class HostReads(TorchDispatchMode):
    """Counts the operator behind .item(), int(), float() and bool() of a tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_decode_steps_never_read_the_device(attention, monkeypatch):
    """The steps read no value back (on CUDA that would wait for the device each
    token); the attention's own check of the cache lengths is off, as it is for
    the Triton kernel on CUDA."""
    model = probed_model(attention, block_size=24)
    monkeypatch.setattr(decode_module, "_reads_values", lambda *args: False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() during decoding"))
    prompt = torch.randint(0, 256, (2, 5))
    state = DecodeState(model, 2, cache_capacity(5, 24, 24), 29, Sampling(0.8, 5, torch.Generator().manual_seed(0)))
    with torch.no_grad(), HostReads() as reads:
        decode(state, prompt, 24, run_eagerly)  # 19 steps, then 4 refills
    assert reads.count == 0
    with torch.no_grad():
        expected = model.generate(prompt, 24, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state.tokens, expected)


def test_decode_runs_steps_then_refills_by_the_host_count():
    model = probed_model("parallax", block_size=8)
    state = DecodeState(model, 1, 8, 13, Sampling(0.0, None, None))
    calls = []
    with torch.no_grad():
        decode(state, torch.randint(0, 256, (1, 3)), 10, lambda name, step: (calls.append(name), step()))
    # 3 prompt tokens, 1 from the prefill; 5 steps fill the 8 positions; 4 refills
    assert calls == ["step"] * 5 + ["refill"] * 4
    assert int(state.position) == 13


def test_kept_decoding_state_is_reused_only_while_it_fits():
    model = probed_model("parallax", block_size=24)
    greedy = Sampling(0.0, None, None)
    kept = graphed_decoding(model, 2, 16, 20, greedy)
    assert graphed_decoding(model, 2, 16, 18, greedy) is kept  # a shorter history fits
    for args in [(2, 16, 21, greedy), (3, 16, 20, greedy), (2, 17, 20, greedy), (2, 16, 20, Sampling(1.0, None, None))]:
        fresh = graphed_decoding(model, *args)
        assert fresh is not kept and model._graphed_decoding is fresh
        kept = graphed_decoding(model, 2, 16, 20, greedy)
    model.float()  # new weight tensors: the graphs would read the old ones
    assert graphed_decoding(model, 2, 16, 20, greedy) is not kept
    model.free_generation_graphs()
    assert model._graphed_decoding is None


def test_a_reused_decoding_state_decodes_as_a_fresh_one():
    model = probed_model("parallax", block_size=24)
    sampling = Sampling(0.9, 20, torch.Generator().manual_seed(3))
    first, second = torch.randint(0, 256, (2, 2, 9))
    kept = graphed_decoding(model, 2, 24, 40, sampling)
    with torch.no_grad():
        decode(kept.state, first, 20, run_eagerly)
        decode(kept.state, second, 20, run_eagerly)  # after a longer run: every buffer is reset
    sampling.generator.manual_seed(3)
    fresh = model.generate(first, 20, temperature=0.9, top_k=20, generator=sampling.generator)
    fresh = model.generate(second, 20, temperature=0.9, top_k=20, generator=sampling.generator)
    assert torch.equal(kept.state.tokens[:, :29], fresh)


def test_copies_and_pickles_leave_the_kept_graphs_out():
    model = probed_model("parallax")
    model._graphed_decoding = threading.Lock()  # stands in for CUDA graphs, which cannot be copied
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone._graphed_decoding is None
        torch.testing.assert_close(clone(torch.ones(1, 3, dtype=torch.long))[0], model(torch.ones(1, 3, dtype=torch.long))[0])
    assert isinstance(model._graphed_decoding, type(threading.Lock()))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs the model on a CUDA device"),
    (dict(cuda_graph="yes"), TypeError, "cuda_graph must be None, True or False"),
    (dict(generator=0), TypeError, "generator must be None or a torch.Generator"),
])
def test_generate_rejects_bad_graph_and_generator_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        probed_model("parallax").generate(torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


# ---- CUDA graphs ----

def cuda_model(attention: str, block_size: int = 96) -> GPT:
    return probed_model(attention, dtype=torch.bfloat16, block_size=block_size, n_embd=128, n_head=4).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["parallax", "softmax"])
@pytest.mark.parametrize("prompt_len,new_tokens", [(37, 40), (37, 100), (130, 9)])  # fits; outgrows; prompt > block
def test_gpu_graphed_greedy_generation_equals_eager(attention, prompt_len, new_tokens):
    model = cuda_model(attention)
    prompt = torch.randint(0, 256, (3, prompt_len), device="cuda")
    graphed = model.generate(prompt, new_tokens, temperature=0)
    assert model._graphed_decoding is not None
    eager = model.generate(prompt, new_tokens, temperature=0, cuda_graph=False)
    assert torch.equal(graphed, eager)
    again = model.generate(prompt, new_tokens, temperature=0)  # replays the kept graphs
    assert torch.equal(again, eager)


@pytest.mark.gpu
def test_gpu_graphed_sampling_follows_the_callers_generator():
    model = cuda_model("parallax")
    prompt = torch.randint(0, 256, (2, 20), device="cuda")

    def sample(seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        return model.generate(prompt, 60, temperature=1.0, top_k=30, generator=generator)

    first, second, other = sample(1), sample(1), sample(2)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # Each new token within its top 30: recomputed logits (bf16, uncached) may reorder near-ties, so
    # the bound is the 40th.
    logits = model(first[:, :-1])[0][:, prompt.shape[1] - 1:].float()
    bound = torch.topk(logits, 40, dim=-1).values[..., -1]
    assert bool((logits.gather(2, first[:, prompt.shape[1]:, None])[..., 0] >= bound).all())


@pytest.mark.gpu
def test_gpu_generation_does_not_wait_for_the_device_per_token():
    model = cuda_model("parallax", block_size=64)
    prompt = torch.randint(0, 256, (2, 70), device="cuda")  # past block_size: steps are refills
    model.generate(prompt, 40, temperature=0)  # captures the graphs

    def synchronisations(new_tokens: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.generate(prompt, new_tokens, temperature=0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(40) == synchronisations(8)


@pytest.mark.gpu
def test_gpu_graphs_follow_the_callers_autocast():
    model = probed_model("parallax", dtype=torch.float32, block_size=96, n_embd=128, n_head=4).cuda()
    prompt = torch.randint(0, 256, (2, 30), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = model.generate(prompt, 50, temperature=0)
        eager = model.generate(prompt, 50, temperature=0, cuda_graph=False)
    assert torch.equal(graphed, eager)
    torch.cuda.empty_cache()  # what autocast cached is gone; the kept graphs must not have read it
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model.generate(prompt, 50, temperature=0), eager)
    plain = model.generate(prompt, 50, temperature=0)  # float32 now: new graphs
    assert torch.equal(plain, model.generate(prompt, 50, temperature=0, cuda_graph=False))
