import io

import pytest
import torch
from torch import nn

from parallax.optim import MuonWithAdamW, split_params

from .conftest import step_side_by_side, train_steps


def ids(params):
    return {id(p) for p in params}


def test_split_params_routes_every_trainable_parameter_once(tiny_lm):
    model = tiny_lm()
    muon, adamw = split_params(model)
    assert ids(muon) == {id(model.up.weight), id(model.down.weight)}
    expected_adamw = {id(model.wte.weight), id(model.up.bias), id(model.down.bias), id(model.norm.weight), id(model.norm.bias)}
    assert ids(adamw) == expected_adamw
    assert len(adamw) == len(expected_adamw)  # tied wte/lm_head weight appears once
    assert ids(muon) | ids(adamw) == ids(model.parameters()) and not ids(muon) & ids(adamw)


def test_split_params_untied_head_and_frozen_parameters(tiny_lm):
    model = tiny_lm(tied=False)
    model.norm.requires_grad_(False)
    muon, adamw = split_params(model)
    assert id(model.lm_head.weight) in ids(adamw) and id(model.lm_head.weight) not in ids(muon)
    assert id(model.norm.weight) not in ids(muon) | ids(adamw)
    assert len(muon) + len(adamw) == sum(p.requires_grad for p in model.parameters())


def test_every_group_must_say_use_muon():
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAdamW([{"params": [nn.Parameter(torch.randn(3, 3))]}])
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAdamW([nn.Parameter(torch.randn(3, 3))])


def adamw_pair():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 4))]
    return ours, [nn.Parameter(p.detach().clone()) for p in ours]


def test_adamw_groups_match_torch_adamw_bit_for_bit():
    ours, theirs = adamw_pair()
    a = MuonWithAdamW([{"params": ours, "use_muon": False}], adamw_lr=1e-2, adamw_weight_decay=0.1, adamw_betas=(0.8, 0.9))
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-8, foreach=False)
    step_side_by_side([a, b], [ours, theirs], 4)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


@pytest.mark.parametrize("spelling", ["plain", "adamw_"])
def test_adamw_group_options_are_honoured_in_either_spelling(spelling):
    ours, theirs = adamw_pair()
    options = {"lr": 2e-2, "betas": (0.7, 0.8), "eps": 1e-3, "weight_decay": 0.05}
    group = {(key if spelling == "plain" else f"adamw_{key}"): value for key, value in options.items()}
    a = MuonWithAdamW([{"params": ours, "use_muon": False, **group}])  # the optimizer's adamw_* defaults differ
    b = torch.optim.AdamW(theirs, foreach=False, **options)
    step_side_by_side([a, b], [ours, theirs], 4, grad_scale=1e-2)  # comparable to eps, so eps matters
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_group_overrides_and_adamw_defaults():
    muon_p, adamw_p = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    optimizer = MuonWithAdamW(
        [{"params": [muon_p], "use_muon": True, "lr": 0.05}, {"params": [adamw_p], "use_muon": False}],
        lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.01, weight_decay=0.1,
    )
    muon_group, adamw_group = optimizer.param_groups
    assert (muon_group["lr"], muon_group["weight_decay"]) == (0.05, 0.1)
    assert (adamw_group["lr"], adamw_group["weight_decay"]) == (1e-3, 0.01)


def test_lambda_lr_scales_each_group_from_its_own_initial_lr(tiny_lm):
    optimizer = MuonWithAdamW.from_model(tiny_lm(), lr=0.02, adamw_lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for step in range(3):
        optimizer.step()
        scheduler.step()
    muon_group, adamw_group = optimizer.param_groups
    assert muon_group["lr"] == pytest.approx(0.02 * 0.5**3)
    assert adamw_group["lr"] == pytest.approx(1e-3 * 0.5**3)


@pytest.mark.parametrize("options", [{}, {"update_rule": "normuon"}, {"update_rule": "dynmuon", "total_steps": 6},
                                     {"layer_aware_steps": True, "spectrum_every": 2}])
def test_state_dict_round_trip_continues_bit_identically(tiny_lm, token_batches, options):
    batches = token_batches(6)
    model = tiny_lm()
    optimizer = MuonWithAdamW.from_model(model, lr=0.02, adamw_lr=1e-2, weight_decay=0.01, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    train_steps(model, optimizer, batches[:3], scheduler)

    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()}, saved)
    train_steps(model, optimizer, batches[3:], scheduler)

    saved.seek(0)
    checkpoint = torch.load(saved)  # weights_only: the state holds tensors and plain numbers only
    resumed = tiny_lm(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = MuonWithAdamW.from_model(resumed, lr=0.02, adamw_lr=1e-2, weight_decay=0.01, **options)
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda step: 1.0 / (1 + step))
    resumed_optimizer.load_state_dict(checkpoint["optim"])
    resumed_scheduler.load_state_dict(checkpoint["sched"])
    train_steps(resumed, resumed_optimizer, batches[3:], resumed_scheduler)

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_equals_one_large_batch(tiny_lm, token_batches, loss_of):
    (tokens,) = token_batches(1, batch=8)
    whole, accumulated = tiny_lm(), tiny_lm()
    opt_whole = MuonWithAdamW.from_model(whole, adamw_lr=1e-2)
    opt_accumulated = MuonWithAdamW.from_model(accumulated, adamw_lr=1e-2)
    loss_of(whole, tokens).backward()
    for half in tokens.chunk(2):
        (loss_of(accumulated, half) / 2).backward()
    opt_whole.step()
    opt_accumulated.step()
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_clip_grad_norm_before_step_is_what_the_step_sees(tiny_lm, token_batches, loss_of):
    (tokens,) = token_batches(1)
    clipped, manual = tiny_lm(), tiny_lm()
    for model in (clipped, manual):
        loss_of(model, tokens).backward()
    total = torch.nn.utils.clip_grad_norm_(clipped.parameters(), max_norm=0.1)
    assert total > 0.1
    for p in manual.parameters():
        p.grad.mul_(0.1 / (total + 1e-6))
    for model in (clipped, manual):
        MuonWithAdamW.from_model(model, adamw_lr=1e-2).step()
    for a, b in zip(clipped.parameters(), manual.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [
    {},
    {"orthogonalizer": "polar_express"},
    {"orthogonalizer": "gram_newton_schulz"},
    {"orthogonalizer": "svd"},
    {"update_rule": "mucon", "clip_threshold": 0.05},
    {"update_rule": "dynmuon", "total_steps": 30},
    {"update_rule": "nuclear", "lr": 0.002},
    {"update_rule": "freon", "schatten_q": 0.5},
    {"update_rule": "kaon"},
    {"update_rule": "normuon"},
    {"layer_aware_steps": True},
])
def test_every_variant_trains_the_tiny_model(tiny_lm, token_batches, options):
    model = tiny_lm()
    (tokens,) = token_batches(1)
    options = {"lr": 0.05, "adamw_lr": 1e-2, **options}
    optimizer = MuonWithAdamW.from_model(model, **options)
    losses = train_steps(model, optimizer, [tokens] * 30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_layer_aware_steps_are_stored_per_matrix(tiny_lm, token_batches):
    model = tiny_lm(width=16)
    optimizer = MuonWithAdamW.from_model(model, layer_aware_steps=True, max_ns_steps=9)
    train_steps(model, optimizer, token_batches(1))
    steps = [optimizer.state[p]["ns_steps"] for p in (model.up.weight, model.down.weight)]
    assert all(1 <= s <= 9 for s in steps)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_group_eps_is_honoured_and_matches_torch(foreach):
    ours, theirs = adamw_pair()
    a = MuonWithAdamW([{"params": ours, "use_muon": False, "eps": 1e-2, "lr": 1e-2}], adamw_foreach=foreach)
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-2, foreach=foreach)
    step_side_by_side([a, b], [ours, theirs], 4, grad_scale=1e-2)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_normuon_second_moment_stays_float32_across_load_with_bf16_params(tiny_lm, token_batches):
    batches = token_batches(6)
    model = tiny_lm().to(torch.bfloat16)
    options = {"lr": 0.02, "adamw_lr": 1e-2, "update_rule": "normuon"}
    optimizer = MuonWithAdamW.from_model(model, **options)
    train_steps(model, optimizer, batches[:3])
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, saved)
    train_steps(model, optimizer, batches[3:])

    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed = tiny_lm(seed=5).to(torch.bfloat16)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = MuonWithAdamW.from_model(resumed, **options)
    resumed_optimizer.load_state_dict(checkpoint["optim"])
    moments = [s["neuron_second_moment"] for s in resumed_optimizer.state.values() if "neuron_second_moment" in s]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    train_steps(resumed, resumed_optimizer, batches[3:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
