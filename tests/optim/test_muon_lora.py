import pytest
import torch
from torch import nn

from parallax.optim import LoRALinear, MuonWithAdamW, add_lora, split_params


def test_lora_recipe_trains_only_adapters_with_muon(tiny_lm, token_batches, loss_of):
    model = tiny_lm()
    (tokens,) = token_batches(1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    initial_loss = loss_of(model, tokens).item()

    adapters = add_lora(model, rank=2, alpha=4.0, target_names={"up", "down"})
    assert loss_of(model, tokens).item() == pytest.approx(initial_loss)  # B = 0: same model
    muon_params, adamw_params = split_params(model)
    assert {id(p) for p in muon_params} == {id(p) for p in adapters} and adamw_params == []

    optimizer = MuonWithAdamW([{"params": adapters, "use_muon": True}], lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        loss_of(model, tokens).backward()
        optimizer.step()

    assert loss_of(model, tokens).item() < 0.9 * initial_loss
    frozen = {name.replace(".base", ""): p for name, p in model.named_parameters() if "lora_" not in name}
    for name, p in frozen.items():
        assert torch.equal(p, before[name]), name
    assert isinstance(model.up, LoRALinear) and model.up.lora_B.abs().sum() > 0


def test_lora_arguments_are_checked():
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 3), rank=4)
    with pytest.raises(ValueError, match="target_names"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), target_names={"missing"})
