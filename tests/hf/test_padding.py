"""Padded batches and packed sequences, without a dense mask: every sequence of a batch gets exactly what it
gets alone, left-padded, right-padded or padded anywhere, with and without the KV cache, in generate(), in
pipeline(batch_size > 1) and under Trainer's padding and flattening collators."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (DataCollatorForLanguageModeling, DataCollatorWithFlattening, PreTrainedTokenizerFast,
                          Trainer, TrainingArguments, pipeline)

from parallax.hf import ParallaxCache

from .conftest import VOCAB
from .model_tester import KINDS, MAIN_KINDS, build, padded_batch

TIGHT = dict(rtol=0, atol=2e-5)  # float32 logits of O(1): a different summation order, nothing more


def alone(model, tokens):
    return model(tokens[None], use_cache=False).logits[0]


def assert_rows_equal_alone(model, logits, mask, sequences):
    for row, tokens in enumerate(sequences):
        if len(tokens):
            torch.testing.assert_close(logits[row][mask[row].bool()], alone(model, tokens), **TIGHT)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right", "both"])
@torch.no_grad()
def test_padded_logits_equal_each_sequence_alone(kind, side):
    """Without the cache the real tokens are packed into sequences (cu_seqlens); through it each row's
    padding moves to its front and `cache_leftpad` hides it."""
    model = build(kind)
    ids, mask, sequences = padded_batch([5, 9, 1, 7], side)
    for use_cache in (False, True):
        assert_rows_equal_alone(model, model(ids, attention_mask=mask, use_cache=use_cache).logits, mask, sequences)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["parallax_window", "qwen3"]), use_cache=st.booleans(),
       mask=st.integers(1, 3).flatmap(lambda b: st.integers(1, 9).flatmap(
           lambda t: st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t), min_size=b, max_size=b))))
@torch.no_grad()
def test_any_padding_pattern(kind, use_cache, mask):
    """Any 0/1 mask, holes and empty rows included, numbered as generate() does: the tokens a row keeps are
    computed as that sequence alone (the sliding windows count its tokens, not its padding)."""
    model = build(kind)
    mask = torch.tensor(mask)
    ids = torch.randint(1, VOCAB, mask.shape, generator=torch.Generator().manual_seed(mask.sum().item()))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers tokens: padding takes no position
    logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=use_cache).logits
    assert_rows_equal_alone(model, logits, mask, [row[m.bool()] for row, m in zip(ids, mask)])


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_left_padded_greedy_generation_equals_each_prompt_alone(kind):
    model = build(kind)
    ids, mask, prompts = padded_batch([5, 9, 2], "left")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(prompts):
        expected = model.generate(prompt[None], max_new_tokens=6, do_sample=False)[0, len(prompt):]
        assert torch.equal(out[row, ids.shape[1]:], expected)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_chunks_through_the_cache_and_padding_after_tokens(kind):
    """A left-padded first chunk, then unpadded chunks: the logits of one call on the whole batch. Padding
    that would come after a row's cached tokens cannot be hidden by a left offset: it raises."""
    model = build(kind)
    ids, mask, _ = padded_batch([7, 12], "left")
    whole = model(ids, attention_mask=mask, use_cache=False).logits
    cache = ParallaxCache()
    parts = [model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache).logits
             for start, stop in [(0, 6), (6, 7), (7, 12)]]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], whole[real], **TIGHT)
    late_padding = torch.ones(2, 14, dtype=torch.long)
    late_padding[0, 13] = 0
    with pytest.raises(ValueError, match="padding after cached tokens"):
        model(torch.ones(2, 2, dtype=torch.long), attention_mask=late_padding, past_key_values=cache)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_packed_sequences_equal_separate_sequences(kind):
    """Restarting position_ids (DataCollatorWithFlattening's output) mark sequence starts: exact, in one
    row and in a padded batch of packed rows. With a KV cache a row holds one sequence: packing raises."""
    model = build(kind)
    _, _, sequences = padded_batch([5, 7, 3], "left", seed=3)
    packed = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    logits = model(packed, position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(logits, torch.cat([alone(model, s) for s in sequences]), **TIGHT)

    rows = torch.zeros(2, 12, dtype=torch.long)  # [seq0 seq1 | seq2 pad...]
    rows[0], rows[1, :3] = packed[0, :12], sequences[2]
    pos = torch.zeros_like(rows)
    pos[0], pos[1, :3] = positions[0, :12], torch.arange(3)
    mask = torch.zeros_like(rows)
    mask[0], mask[1, :3] = 1, 1
    batch = model(rows, attention_mask=mask, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(batch[0], logits[:12], **TIGHT)
    torch.testing.assert_close(batch[1, :3], alone(model, sequences[2]), **TIGHT)
    with pytest.raises(ValueError, match="packed sequences"):
        model(packed, position_ids=positions, past_key_values=ParallaxCache())


def tiny_tokenizer(padding_side="left"):
    """A word-level tokenizer built here: "t1" .. "t95" are tokens 1 .. 95, "[PAD]" is 0."""
    vocab = {"[PAD]": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", padding_side=padding_side)


def texts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{i}" for i in torch.randint(1, VOCAB, (n,), generator=g).tolist()) for n in lengths]


@pytest.mark.parametrize("kind", ["parallax", "llama"])
@torch.no_grad()
def test_pipeline_batches_equal_one_at_a_time(kind):
    model = build(kind)
    generate = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer(), device="cpu")
    prompts = texts([3, 8, 5, 1])
    kwargs = dict(max_new_tokens=5, do_sample=False, return_full_text=False)
    one_by_one = [generate(p, **kwargs)[0]["generated_text"] for p in prompts]
    batched = [out[0]["generated_text"] for out in generate(prompts, batch_size=3, **kwargs)]
    assert batched == one_by_one


@pytest.mark.parametrize("kind", ["parallax", "llama"])
def test_trainer_with_padding_and_flattening_collators(kind, tmp_path):
    """The padding collator's batch and the flattening collator's packed row give the loss of the
    sequences scored one by one; Trainer then trains on padded batches."""
    model = build(kind).train()
    tokenizer = tiny_tokenizer(padding_side="right")
    examples = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts([6, 11, 3, 8], seed=1)]
    padded = DataCollatorForLanguageModeling(tokenizer, mlm=False)(examples)
    assert (padded["attention_mask"] == 0).any()
    flat = DataCollatorWithFlattening()(examples)
    with torch.no_grad():
        token_losses = [torch.nn.functional.cross_entropy(alone(model, torch.tensor(e["input_ids"]))[:-1],
                                                          torch.tensor(e["input_ids"][1:]), reduction="sum")
                        for e in examples]
        expected = sum(token_losses) / sum(len(e["input_ids"]) - 1 for e in examples)
        torch.testing.assert_close(model(**padded).loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(**flat).loss, expected, rtol=1e-5, atol=1e-6)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", ["parallax", "qwen3"])
@torch.no_grad()
def test_assisted_decoding_with_pad_ids_in_the_sequence(kind):
    """transformers calls the assistant without a mask and builds one from the pad id, wherever it occurs:
    in the prompt, or among the tokens generated so far. The output is greedy decoding's."""
    model = build(kind)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    prompt[0, 2] = 0  # the pad id inside the prompt
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=model)
    assert torch.equal(assisted, greedy)
    generated_pad = int(greedy[0, -3])  # a token the model generates, declared the pad id
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=generated_pad)
    assisted = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=generated_pad,
                              assistant_model=model)
    assert torch.equal(assisted, greedy)
