"""The common model checks of transformers' test suite that apply to Parallax models, run with the model
tester's kinds (non-zero probes) on batches with padding: outputs and switches, training, saving."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from .model_tester import MAIN_KINDS, build, padded_batch, parallax_layers

TIGHT = dict(rtol=0, atol=2e-5)


def inputs(seed=0):
    ids, mask, _ = padded_batch([6, 3, 8], "left", seed=seed)
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_hidden_states_and_return_dict(kind):
    """output_hidden_states (argument or config) gives the embeddings and every layer's output, the last one
    after the final norm (the logits are its projection); return_dict=False gives the same as a tuple."""
    model = build(kind)
    batch = inputs()
    out = model(**batch, output_hidden_states=True)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (3, 8, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(batch["input_ids"]))
    torch.testing.assert_close(model.get_output_embeddings()(out.hidden_states[-1]), out.logits, **TIGHT)
    model.config.output_hidden_states = True
    assert len(model(**batch).hidden_states) == layers + 1
    model.config.output_hidden_states = False
    assert model(**batch).hidden_states is None

    as_tuple = model(**batch, labels=batch["input_ids"], use_cache=False, return_dict=False)
    as_dict = model(**batch, labels=batch["input_ids"], use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_inputs_embeds_equal_input_ids(kind):
    model = build(kind)
    batch = inputs()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    for use_cache in (False, True):
        by_ids = model(**batch, use_cache=use_cache).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=use_cache).logits
        torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=0)
    generated = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=4,
                               do_sample=False)
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
    assert torch.equal(generated, expected)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # 5.25's rename
@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_training_and_gradient_checkpointing(kind):
    """A padded batch trains (every probe gets a gradient); gradient checkpointing recomputes the layers
    and gives the same gradients."""
    model = build(kind).train()
    batch = inputs()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def gradients():
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    for attn in parallax_layers(model):
        assert attn.r_proj.weight.grad.abs().sum() > 0
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = []
    handles = [layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
               for layer in (model.transformer.blocks if kind == "parallax" else model.model.layers)]
    checkpointed = gradients()
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * model.config.num_hidden_layers  # forward, then again in the backward
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_save_pretrained_round_trip_with_padding(kind, tmp_path):
    model = build(kind)
    batch = inputs()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_what_does_not_apply_raises(kind, tmp_path):
    """Attention weights are never formed; transformers' attention implementations cannot replace the
    Parallax modules (set_attn_implementation leaves them, loading with another raises)."""
    model = build(kind)
    batch = inputs()
    with pytest.raises(ValueError, match="attention weights"):
        model(**batch, output_attentions=True)
    model.set_attn_implementation("sdpa")  # warns and keeps Parallax attention
    assert model.config._attn_implementation == "parallax"
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attn_implementation must stay 'parallax'"):
        model(**batch)
    model.config._attn_implementation = "parallax"
    model.save_pretrained(tmp_path)
    for implementation in ("sdpa", "flash_attention_2"):
        with pytest.raises(ValueError, match="does not apply to a Parallax model"):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)


def test_compiled_training_step_is_one_graph(traceable_empty):
    """torch.compile of a whole converted model, forward and backward, at batch 3: one graph, the eager
    gradients (GPT's is compiled by tests/train/test_loop.py). position_ids as the flattening collator passes
    them: the graph checks on the device that no sequence restarts inside a row, and fails when one does
    (packed sequences run eagerly). A padded batch also compiles, with graph breaks at its data-dependent
    gathers: minutes here, so not in CI."""
    model = build("llama").train()
    ids = inputs()["input_ids"]
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)

    def step(forward, position_ids=positions):
        model.zero_grad()
        loss = forward(input_ids=ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = step(compiled)
    expected_loss, expected = step(model)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    packed = positions.clone()
    packed[1, 4:] = torch.arange(ids.shape[1] - 4)  # a second sequence starts at token 4 of row 1
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(RuntimeError, match="packed sequences"):
        step(compiled, packed)
