import math

import pytest
import torch

from parallax.models import GPT, GPTConfig, PRESETS, count_parameters, matched_mlp_hidden, preset


# Tiny models run faster on one thread than on two busy ones.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_tiny_forward_backward_shapes(attention):
    torch.manual_seed(0)
    model = GPT(preset("tiny", attention=attention))
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    logits, loss = model(idx, idx)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(256)) < 0.2  # near-uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ignore_index_and_too_long():
    model = GPT(preset("tiny"))
    idx = torch.randint(0, 256, (1, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], idx[0, 4:])
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("overrides", [
    {}, {"attention": "softmax"}, {"qk_norm": True}, {"n_kv_head": 1}, {"tie_embeddings": True},
    {"attention": "softmax", "parameter_matched": True, "qk_norm": True},
])
def test_count_parameters_matches_model(overrides):
    config = preset("tiny", **overrides)
    assert GPT(config).num_parameters() == count_parameters(config)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_matched_softmax_is_within_one_percent(name):
    parallax = preset(name, attention="parallax")
    softmax = preset(name, attention="softmax")
    matched = preset(name, attention="softmax", parameter_matched=True)
    assert count_parameters(softmax) < count_parameters(parallax)
    assert matched.resolved_mlp_hidden() == matched_mlp_hidden(softmax) > softmax.resolved_mlp_hidden()
    assert abs(count_parameters(matched) / count_parameters(parallax) - 1) < 0.01
    # parameter matching leaves a Parallax model unchanged
    assert count_parameters(preset(name, parameter_matched=True)) == count_parameters(parallax)


def test_presets_and_config_errors():
    assert set(PRESETS) >= {"tiny", "small", "20m", "125m"}
    assert 15e6 < count_parameters(preset("20m")) < 25e6
    assert 110e6 < count_parameters(preset("125m")) < 140e6
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="linear")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_init_starts_as_softmax_with_scaled_residuals():
    torch.manual_seed(0)
    model = GPT(preset("small"))
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.r_proj.weight) == 0
    L = model.config.n_layer
    std = model.blocks[0].mlp.down_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * L)) < 0.002
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    # with a zero probe the Parallax model computes what the softmax model does
    torch.manual_seed(1)
    soft = GPT(preset("small", attention="softmax"))
    state = {k: v for k, v in model.state_dict().items() if "r_proj" not in k}
    soft.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(model(idx)[0], soft(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_generate_with_cache_equals_recompute(attention, temperature, top_k):
    torch.manual_seed(0)
    config = preset("tiny", attention=attention, block_size=24, n_kv_head=1)
    model = GPT(config).double()
    with torch.no_grad():  # a non-zero probe, so the Parallax path differs from softmax
        for block in model.blocks:
            if block.attn.r_proj is not None:
                block.attn.r_proj.weight.normal_(0, 0.05)
    prompt = torch.randint(0, 256, (2, 5))
    # 5 + 30 tokens outgrow block_size 24: the cache path refills from the cropped context
    kwargs = dict(temperature=temperature, top_k=top_k)
    with_cache = model.generate(prompt, 30, use_cache=True, generator=torch.Generator().manual_seed(7), **kwargs)
    recompute = model.generate(prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(7), **kwargs)
    assert with_cache.shape == (2, 35)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, recompute)
    assert model.training  # generate restores the mode


def test_generate_greedy_is_argmax():
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    prompt = torch.randint(0, 256, (1, 6))
    out = model.generate(prompt, 1, temperature=0)
    assert out[0, -1] == model(prompt)[0][0, -1].argmax()


@pytest.mark.parametrize("prompt,kwargs,error,match", [
    (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "non-empty prompt"),
    (torch.zeros(0, 3, dtype=torch.long), {}, ValueError, "non-empty prompt"),
    (torch.zeros(4, dtype=torch.long), {}, ValueError, r"shape \[batch, seq\]"),
    (torch.zeros(1, 3), {}, TypeError, "idx must be an int64 or int32 tensor"),
    (torch.full((1, 3), 256), {}, ValueError, r"token ids in \[0, 256\)"),
    (torch.full((1, 3), -1), {}, ValueError, r"token ids in \[0, 256\)"),
    (None, dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
    (None, dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be an int >= 0"),
    (None, dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    (None, dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    (None, dict(temperature=float("inf")), ValueError, "temperature must be a finite number >= 0"),
    (None, dict(top_k=0), ValueError, "top_k must be None or an int >= 1"),
    (None, dict(top_k=2.5), ValueError, "top_k must be None or an int >= 1"),
    (None, dict(top_k=True), ValueError, "top_k must be None or an int >= 1"),
])
@pytest.mark.parametrize("training", [True, False])
def test_generate_rejects_bad_arguments_and_keeps_the_mode(prompt, kwargs, error, match, training):
    model = GPT(preset("tiny")).train(training)
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long) if prompt is None else prompt, **args)
    assert model.training is training


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_the_mode_after_an_error_inside(training, monkeypatch):
    model = GPT(preset("tiny")).train(training)

    def fail(*args, **kwargs):
        assert not model.training  # generation runs in eval mode
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "_hidden_states", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training is training
