"""The fine-tuning recipe of docs/hf.md: probes + LoRA adapters (add_lora, through peft), MuonWithAdamW, the rest frozen."""
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from parallax import MuonWithAdamW
from parallax.hf import to_parallax
from parallax.optim import add_lora, lora_target_modules

CORPUS = Path(__file__).resolve().parents[2] / "docs" / "parallax-math.md"  # ~10 KB of local text, as bytes


def batches(steps, batch, seq, seed=0):
    data = torch.tensor(list(CORPUS.read_bytes()))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=g).tolist()
        yield torch.stack([data[s:s + seq] for s in starts])


def test_probes_and_lora_fine_tune_with_muon(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model = to_parallax(base)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if "r_proj" not in name}
    adapted = lora_target_modules(model, modules_to_save=["r_proj"])  # attention and MLP projections
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"}
    peft_model = add_lora(model, rank=4, alpha=8, modules_to_save=["r_proj"])
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "r_proj" in name for name in trainable)
    probes = [p for name, p in peft_model.named_parameters() if "r_proj" in name and p.requires_grad]
    assert len(probes) == 2 and all(torch.count_nonzero(p) == 0 for p in probes)  # start at zero

    opt = MuonWithAdamW.from_model(peft_model, lr=0.02, adamw_lr=3e-3)  # all trainable tensors are matrices: Muon
    assert [len(g["params"]) for g in opt.param_groups] == [len(trainable)]
    peft_model.train()
    losses = []
    for x in batches(steps=30, batch=8, seq=64):
        loss = peft_model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert all(p.norm() > 0.1 for p in probes)  # the probes grew from zero

    merged = peft_model.merge_and_unload().eval()
    assert all(layer.self_attn.r_proj.weight.norm() > 0.1 for layer in merged.model.layers)  # trained probes kept
    for name, p in merged.named_parameters():
        if name in frozen and name.removesuffix(".weight") not in adapted:
            assert torch.equal(p, frozen[name]), name  # embeddings, head, norms untouched
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = next(batches(1, 2, 16, seed=1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, use_cache=False).logits, merged(x, use_cache=False).logits,
                                   rtol=0, atol=0)
