"""The LoRA fine-tuning recipe through peft: adapters on the attention and MLP
projections (never the head), GPT-2's Conv1D included, Muon on the adapters."""
import warnings

import pytest
import torch
import transformers

from parallax.models import GPT, preset
from parallax.optim import MuonWithAdamW, add_lora, lora_target_modules, route_params

VOCAB = 64
TOKENS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def hf_loss(model):
    return model(input_ids=TOKENS, labels=TOKENS).loss


def gpt_loss(model):
    return model(TOKENS[:, :-1], TOKENS[:, 1:])[1]


@pytest.mark.parametrize("build, loss_of, projections", [
    (gpt2, hf_loss, {"c_attn", "c_proj", "c_fc"}),
    (llama, hf_loss, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (lambda: GPT(preset("tiny", vocab_size=VOCAB)), gpt_loss,
     {"q_proj", "k_proj", "v_proj", "o_proj", "r_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_lora_adapts_attention_and_mlp_and_muon_trains_the_adapters(build, loss_of, projections):
    torch.manual_seed(0)
    model = build()
    targets = lora_target_modules(model)
    assert {name.rsplit(".", 1)[-1] for name in targets} == projections  # every projection, never the head
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    initial = loss_of(model).item()

    peft_model = add_lora(model, rank=4, alpha=8)
    assert loss_of(peft_model).item() == pytest.approx(initial)  # B = 0: the pretrained model
    routes = route_params(peft_model)
    assert routes and all(".lora_" in r.name and r.use_muon for r in routes)  # only adapters train, all on Muon
    assert len(routes) == 2 * len(targets)

    optimizer = MuonWithAdamW.from_model(peft_model, lr=0.02)
    for _ in range(8):
        optimizer.zero_grad()
        loss_of(peft_model).backward()
        optimizer.step()
    assert loss_of(peft_model).item() < initial - 0.1

    merged = peft_model.merge_and_unload()
    for name, p in merged.named_parameters():
        if not any(name.startswith(target + ".") for target in targets):
            assert torch.equal(p, before[name]), name  # embeddings, head, norms untouched
    assert loss_of(merged).item() == pytest.approx(loss_of(peft_model).item(), rel=1e-4)


def test_modules_to_save_are_trained_whole_and_not_adapted():
    model = GPT(preset("tiny", vocab_size=VOCAB))
    peft_model = add_lora(model, modules_to_save=["r_proj"])
    trainable = {r.name: r for r in route_params(peft_model)}
    assert not any("r_proj.lora_" in name for name in trainable)
    probes = [r for name, r in trainable.items() if "r_proj" in name]
    assert probes and all(r.use_muon for r in probes)  # the probe matrices themselves, on Muon
    assert "blocks.0.attn.r_proj" not in lora_target_modules(model, modules_to_save=["r_proj"])


def test_explicit_targets_pass_through_short_conv1d_names_included_and_an_unadaptable_model_is_refused():
    peft_model = add_lora(llama(), target_modules=["q_proj", "v_proj"])
    adapted = {r.name.split(".lora_")[0].rsplit(".", 1)[-1] for r in route_params(peft_model)}
    assert adapted == {"q_proj", "v_proj"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns when it has to switch fan_in_fan_out on itself
        conv1d = add_lora(gpt2(), target_modules=["c_attn"])
    assert conv1d.peft_config["default"].fan_in_fan_out
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(torch.nn.Sequential(torch.nn.Embedding(4, 4)))
