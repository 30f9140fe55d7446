"""Routing by role (route_params / split_params) on tiny transformers models built
from configs, a minGPT-style tree, our GPT and a converted Parallax model.

Each test writes out the AdamW set that Muon's own guidance asks for
(embeddings and tokens, output heads, the input layer, biases, gains); every
other trainable parameter must go to Muon."""
import fnmatch

import pytest
import torch
import transformers
from torch import nn

from parallax.models import GPT, preset
from parallax.optim import MuonWithAdamW, route_params, split_params

VOCAB, WIDTH = 50, 16
SMALL = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * WIDTH)


def names(model, params):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def check_routing(model, adamw_patterns):
    """AdamW: the 0/1-D parameters and those matching `adamw_patterns`; Muon: the rest."""
    muon, adamw = split_params(model)
    every = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, p in model.named_parameters()
                if p.requires_grad and (p.ndim < 2 or any(fnmatch.fnmatchcase(name, pattern) for pattern in adamw_patterns))}
    assert names(model, adamw) == expected
    assert names(model, muon) == every - expected
    assert len(muon) + len(adamw) == len(every)  # each parameter once, tied ones included
    assert all(p.ndim >= 2 for p in muon)
    return names(model, muon)


def test_bert_masked_lm():
    model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, **SMALL))
    muon = check_routing(model, ["bert.embeddings.*"])  # the MLM decoder is tied to the word embedding
    # Hidden matrices of every kind: attention, its output dense, the MLM transform.
    assert {"bert.encoder.layer.0.attention.output.dense.weight", "bert.encoder.layer.1.output.dense.weight",
            "cls.predictions.transform.dense.weight"} <= muon


def test_bert_sequence_classification():
    model = transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=VOCAB, num_labels=3,
                                                                               **SMALL))
    muon = check_routing(model, ["bert.embeddings.*", "classifier.*"])
    assert "bert.pooler.dense.weight" in muon  # a hidden square matrix inside the base model


def test_gpt2_conv1d_layers():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4,
                                                                 n_positions=32, bos_token_id=0, eos_token_id=0))
    muon = check_routing(model, ["transformer.wte.*", "transformer.wpe.*"])  # lm_head is tied to wte
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"} <= muon


def test_llama_untied_head():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **SMALL))
    check_routing(model, ["model.embed_tokens.*", "lm_head.*"])


def test_mixtral_experts_are_batches_of_matrices_and_the_router_a_matrix():
    config = transformers.MixtralConfig(vocab_size=VOCAB, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, **SMALL)
    model = transformers.MixtralForCausalLM(config)
    muon = check_routing(model, ["model.embed_tokens.*", "lm_head.*"])
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.gate.weight"} <= muon
    optimizer = MuonWithAdamW.from_model(model)
    x = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()  # the [E, out, in] stacks step as E matrices


def test_vit_tokens_patch_projection_and_classifier():
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, **SMALL)
    model = transformers.ViTForImageClassification(config)
    check_routing(model, ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                          "vit.embeddings.patch_embeddings.projection.*", "classifier.*"])


class MinGPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(WIDTH, 3 * WIDTH), "proj": nn.Linear(WIDTH, WIDTH)})
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))


class MinGPT(nn.Module):
    """Karpathy's early minGPT layout, with the head registered before the
    blocks; the MLP's up projection has as many outputs as the vocabulary has
    tokens, so neither registration order nor shape finds the head."""

    def __init__(self, vocab=4 * WIDTH):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, WIDTH)
        self.pos_emb = nn.Parameter(torch.zeros(1, 12, WIDTH))
        self.head = nn.Linear(WIDTH, vocab, bias=False)
        self.blocks = nn.Sequential(*[MinGPTBlock() for _ in range(2)])
        self.ln_f = nn.LayerNorm(WIDTH)


def test_mingpt_tree_with_parameter_positions_and_early_head():
    model = MinGPT()
    muon = check_routing(model, ["tok_emb.*", "pos_emb", "head.*"])
    assert "blocks.0.mlp.0.weight" in muon  # shape (vocab, width), like the head


@pytest.mark.parametrize("tied", [True, False])
def test_parallax_gpt(tied):
    model = GPT(preset("tiny", vocab_size=VOCAB))
    if not tied:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    check_routing(model, ["wte.*", "lm_head.*"])


def test_converted_parallax_llama_routes_probes_with_the_projections():
    from parallax.hf import to_parallax

    model = to_parallax(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2,
                                                                               **SMALL)))
    muon = check_routing(model, ["model.embed_tokens.*", "lm_head.*"])
    assert "model.layers.0.self_attn.r_proj.weight" in muon


def test_sequential_models_have_an_input_layer_and_a_head():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(8, 10))
    check_routing(model, ["0.*", "6.*"])  # the stem conv and the classifier
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    tied[2].weight = tied[0].weight
    check_routing(tied, ["0.*"])


def test_frozen_parameters_are_left_out():
    model = GPT(preset("tiny", vocab_size=VOCAB))
    model.blocks[0].requires_grad_(False)
    routed = {route.name for route in route_params(model)}
    assert routed == {name for name, p in model.named_parameters() if p.requires_grad}


def test_overrides_and_their_errors():
    model = MinGPT()
    routes = {r.name: r for r in route_params(model, exclude=["blocks.0"], muon=["pos_emb", "head"])}
    assert routes["pos_emb"].use_muon and routes["head.weight"].use_muon
    assert not routes["blocks.0.attn.qkv.weight"].use_muon and routes["blocks.1.attn.qkv.weight"].use_muon
    assert routes["blocks.0.attn.qkv.weight"].reason == "exclude='blocks.0'"
    with pytest.raises(ValueError, match="exclude='blocks.7'"):
        route_params(model, exclude=["blocks.7"])
    with pytest.raises(ValueError, match="muon='ln_f'"):
        route_params(model, muon="ln_f")  # only 1-D parameters: Muon cannot take them
    with pytest.raises(ValueError, match="matched by muon='head' and exclude='head.weight'"):
        route_params(model, muon=["head"], exclude=["head.weight"])
    with pytest.raises(TypeError, match="exclude"):
        route_params(model, exclude=[3])
    with pytest.raises(TypeError, match="model"):
        split_params([nn.Parameter(torch.ones(2, 2))])
    optimizer = MuonWithAdamW.from_model(model, exclude=["blocks.0"])
    assert len(optimizer.param_groups[0]["params"]) == sum(route.use_muon for route in route_params(model,
                                                                                                    exclude="blocks.0"))


def test_report_names_every_parameter_its_optimizer_and_reason():
    model = MinGPT()
    report = str(route_params(model)).splitlines()
    assert report[0].split() == ["parameter", "shape", "optimizer", "reason"]
    rows = {line.split()[0]: line for line in report[1:]}
    assert set(rows) == {name for name, _ in model.named_parameters()}
    assert "adamw" in rows["pos_emb"] and "position/class token" in rows["pos_emb"]
    assert "adamw" in rows["head.weight"] and "output head" in rows["head.weight"]
    assert "muon" in rows["blocks.1.mlp.2.weight"] and "(64, 16)" in rows["blocks.1.mlp.0.weight"]
