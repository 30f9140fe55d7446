import copy

import pytest
import torch
from torch import nn

from parallax.optim import Muon, MuonWithAdamW, adjust_lr, orthogonalize
from parallax.optim.direction import DirectionPlan

from .conftest import step_side_by_side

SHAPES = [(24, 8), (8, 24), (16, 16)]


def run_both(shapes, steps=4, **kwargs):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    step_side_by_side([Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)], [ours, theirs], steps)
    return ours, theirs


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_matches_torch_muon_bit_for_bit(nesterov, adjust_lr_fn):
    ours, theirs = run_both(SHAPES, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], run_both(SHAPES, steps=0)[0][0])  # the steps did move


def test_bf16_parameters_match_torch_with_nesterov_and_differ_by_its_in_place_normalisation_without():
    """docs/muon.md: torch 2.13 divides its own bf16 momentum buffer by its norm
    when nesterov=False (grad.bfloat16() is no copy); parallax keeps the buffer."""
    for nesterov in (True, False):
        torch.manual_seed(0)
        ours = [nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in SHAPES]
        theirs = [nn.Parameter(p.detach().clone()) for p in ours]
        optimizers = [Muon(ours, lr=0.02, nesterov=nesterov), torch.optim.Muon(theirs, lr=0.02, nesterov=nesterov)]
        equal_after = []
        for _ in range(3):
            step_side_by_side(optimizers, [ours, theirs], 1)
            equal_after.append(all(torch.equal(a, b) for a, b in zip(ours, theirs)))
        their_buffer_norms = [optimizers[1].state[p]["momentum_buffer"].float().norm().item() for p in theirs]
        our_buffer_norms = [optimizers[0].state[p]["momentum_buffer"].float().norm().item() for p in ours]
        if nesterov:
            assert equal_after == [True, True, True] and our_buffer_norms == their_buffer_norms
        else:
            assert equal_after == [True, False, False]
            assert their_buffer_norms == pytest.approx([1.0] * len(SHAPES), abs=1e-2)  # normalised in place
            assert all(abs(n - 1.0) > 0.05 for n in our_buffer_norms)  # a plain EMA of the gradients


def test_matches_torch_muon_with_custom_hyperparameters():
    ours, theirs = run_both(SHAPES, lr=0.05, weight_decay=0.0, momentum=0.8, ns_steps=3,
                            ns_coefficients=(3.0, -3.2, 1.2), eps=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_conv_kernel_is_trained_as_flattened_matrix():
    torch.manual_seed(0)
    kernel = nn.Parameter(torch.randn(6, 3, 2, 2))
    flat = nn.Parameter(kernel.detach().reshape(6, 12).clone())
    ours, reference = Muon([kernel], lr=0.02), torch.optim.Muon([flat], lr=0.02)
    for _ in range(3):
        grad = torch.randn(6, 3, 2, 2)
        kernel.grad, flat.grad = grad.clone(), grad.reshape(6, 12).clone()
        ours.step()
        reference.step()
    assert torch.equal(kernel.reshape(6, 12), flat)


def test_adjust_lr_rules():
    assert adjust_lr(0.1, "original", (40, 10)) == pytest.approx(0.1 * 2.0)
    assert adjust_lr(0.1, None, (10, 40)) == pytest.approx(0.1)
    assert adjust_lr(0.1, "match_rms_adamw", (10, 40)) == pytest.approx(0.1 * 0.2 * 40**0.5)
    assert adjust_lr(0.1, "original", (8, 2, 3, 3)) == pytest.approx(0.1)  # [8, 18]
    # match_rms_adamw gives U V^T an element RMS of 0.2 * lr.
    O = orthogonalize(torch.randn(30, 70, dtype=torch.float64), "svd")
    rms = (adjust_lr(1.0, "match_rms_adamw", O.shape) * O).square().mean().sqrt()
    assert rms.item() == pytest.approx(0.2)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_low_dimensional_parameters_are_refused_with_routing_hint(shape):
    with pytest.raises(ValueError, match="split_params"):
        Muon([nn.Parameter(torch.randn(shape))])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"orthogonalizer": "cholesky"}, "orthogonalizer"),
        ({"adjust_lr_fn": "sqrt"}, "adjust_lr_fn"),
        ({"update_rule": "adam"}, "update_rule"),
        ({"update_rule": "dynmuon"}, "total_steps"),
        ({"eps": 0.0}, "eps"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Muon([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="lr"):
        Muon([nn.Parameter(torch.randn(4, 4))], lr="fast")
    with pytest.raises(TypeError, match="ns_steps"):
        Muon([nn.Parameter(torch.randn(4, 4))], ns_steps=2.5)


def test_bad_group_added_later_is_rejected_and_not_kept():
    optimizer = MuonWithAdamW([{"params": [nn.Parameter(torch.randn(4, 4))], "use_muon": True}])
    with pytest.raises(ValueError, match="momentum"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "use_muon": True, "momentum": 2.0})
    assert len(optimizer.param_groups) == 1


def test_tensor_lr_matches_torch_muon():
    ours, theirs = run_both(SHAPES, lr=torch.tensor(0.02), weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_many_same_shape_matrices_are_stacked_and_stay_bit_exact(monkeypatch):
    calls = []
    original = DirectionPlan.direction
    monkeypatch.setattr(DirectionPlan, "direction",
                        lambda plan, matrix: calls.append(tuple(matrix.shape)) or original(plan, matrix))
    shapes = [(24, 8), (8, 24), (24, 8), (16, 16), (16, 16), (16, 16)]
    ours, theirs = run_both(shapes, steps=2, lr=0.02)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # Per step: the three 16 x 16 in one call, the (24, 8) pair in one, the (8, 24) alone.
    assert sorted(calls[:3]) == sorted([(8, 24), (2, 24, 8), (3, 16, 16)]) and len(calls) == 6


def test_loads_a_torch_muon_state_dict_and_continues_identically():
    torch.manual_seed(0)
    start = [torch.randn(s) for s in SHAPES]
    theirs = [nn.Parameter(p.clone()) for p in start]
    reference = torch.optim.Muon(theirs, lr=0.02)
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]
    for step in range(4):
        if step == 2:
            checkpoint = {"params": [p.detach().clone() for p in theirs], "optim": copy.deepcopy(reference.state_dict())}
        for p, g in zip(theirs, grads[step]):
            p.grad = g.clone()
        reference.step()
    ours = [nn.Parameter(p) for p in checkpoint["params"]]
    optimizer = Muon(ours, lr=0.02)
    optimizer.load_state_dict(checkpoint["optim"])
    for step in (2, 3):
        for p, g in zip(ours, grads[step]):
            p.grad = g.clone()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_three_dim_parameter_is_a_batch_of_matrices():
    torch.manual_seed(0)
    experts = nn.Parameter(torch.randn(3, 8, 20))
    separate = [nn.Parameter(e.detach().clone()) for e in experts]
    flat = nn.Parameter(experts.detach().reshape(3, 160).clone())
    batched, reference = Muon([experts], lr=0.02), torch.optim.Muon(separate, lr=0.02)
    flattened = Muon([nn.Parameter(experts.detach().clone())], lr=0.02, flatten=True)
    flat_reference = torch.optim.Muon([flat], lr=0.02)
    flattened_param = flattened.param_groups[0]["params"][0]
    for _ in range(3):
        grad = torch.randn(3, 8, 20)
        experts.grad, flattened_param.grad, flat.grad = grad.clone(), grad.clone(), grad.reshape(3, 160).clone()
        for p, g in zip(separate, grad):
            p.grad = g.clone()
        for optimizer in (batched, reference, flattened, flat_reference):
            optimizer.step()
    assert all(torch.equal(experts[i], separate[i]) for i in range(3))  # each expert orthogonalized alone
    assert torch.equal(flattened_param.reshape(3, 160), flat)  # flatten=True: yesterday's [E, out*in]
