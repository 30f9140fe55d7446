"""split_params on three module trees: ours, a Llama-style one and a BERT-style one."""
import pytest
import torch
from torch import nn

from parallax.models import GPT, preset
from parallax.optim import split_params

VOCAB, WIDTH = 50, 16


def names(model, params):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def check_routing(model, expected_adamw):
    muon, adamw = split_params(model)
    all_names = {name for name, _ in model.named_parameters()}
    assert names(model, adamw) == expected_adamw
    assert names(model, muon) == all_names - expected_adamw
    assert len(muon) + len(adamw) == len(all_names)  # each parameter once, tied ones included


@pytest.mark.parametrize("tied", [True, False])
def test_parallax_gpt(tied):
    model = GPT(preset("tiny", vocab_size=VOCAB))
    if not tied:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    gains = {name for name, p in model.named_parameters() if p.ndim < 2}
    expected = {"wte.weight"} | gains | (set() if model.lm_head.weight is model.wte.weight else {"lm_head.weight"})
    check_routing(model, expected)


class LlamaLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.ModuleDict({k: nn.Linear(WIDTH, WIDTH, bias=False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(WIDTH, 3 * WIDTH, bias=False),
                                  "up_proj": nn.Linear(WIDTH, 3 * WIDTH, bias=False),
                                  "down_proj": nn.Linear(3 * WIDTH, WIDTH, bias=False)})
        self.input_layernorm = nn.RMSNorm(WIDTH)
        self.post_attention_layernorm = nn.RMSNorm(WIDTH)


class Llama(nn.Module):
    """model.embed_tokens / model.layers / model.norm and an untied `lm_head`."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, WIDTH)
        self.model.layers = nn.ModuleList([LlamaLayer() for _ in range(2)])
        self.model.norm = nn.RMSNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)


def test_llama_style_tree():
    model = Llama()
    gains = {name for name, p in model.named_parameters() if p.ndim < 2}
    check_routing(model, {"model.embed_tokens.weight", "lm_head.weight"} | gains)


class BertSelfOutput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.dense = nn.Linear(inner, WIDTH)
        self.LayerNorm = nn.LayerNorm(WIDTH)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.ModuleDict({k: nn.Linear(WIDTH, WIDTH) for k in ("query", "key", "value")})
        self.attention.output = BertSelfOutput(WIDTH)  # attention.output.dense: a hidden matrix
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(WIDTH, 4 * WIDTH)
        self.output = BertSelfOutput(4 * WIDTH)  # output.dense: a hidden matrix


class Bert(nn.Module):
    """HF BertForMaskedLM's tree: embeddings (word, position, token type),
    encoder layers, pooler, and an MLM head whose decoder is tied to the word embedding."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.embeddings.position_embeddings = nn.Embedding(WIDTH, WIDTH)  # as many positions as the width
        self.embeddings.token_type_embeddings = nn.Embedding(2, WIDTH)
        self.embeddings.LayerNorm = nn.LayerNorm(WIDTH)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLayer() for _ in range(2)])
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(WIDTH, WIDTH)
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        self.cls.predictions.transform = nn.ModuleDict({"dense": nn.Linear(WIDTH, WIDTH), "LayerNorm": nn.LayerNorm(WIDTH)})
        self.cls.predictions.decoder = nn.Linear(WIDTH, VOCAB)
        self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight


def test_bert_style_tree_sends_every_output_dense_to_muon():
    model = Bert()
    embeddings = {f"embeddings.{k}.weight" for k in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    small = {name for name, p in model.named_parameters() if p.ndim < 2}
    check_routing(model, embeddings | small)
    muon = names(model, split_params(model)[0])
    assert "encoder.layer.0.attention.output.dense.weight" in muon
    assert "encoder.layer.1.output.dense.weight" in muon


def test_untied_head_is_found_without_its_name():
    model = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, VOCAB))
    muon, adamw = split_params(model)
    assert [p.shape for p in muon] == [torch.Size([WIDTH, WIDTH])]
    assert {id(p) for p in adamw} == {id(model[0].weight), id(model[1].bias), id(model[2].weight), id(model[2].bias)}
