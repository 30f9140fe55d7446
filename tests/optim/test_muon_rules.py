"""The update-rule registry: a rule is one options dataclass and one direction
function in one file; the optimizer takes its options, checks and state from it."""
import importlib
import io
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from parallax.optim import UPDATE_RULES, MuonWithAdamW, UpdateRule, adjust_lr, register_update_rule
from parallax.optim.options import (
    ADAMW_ALIASES,
    BOOKKEEPING,
    OPTIMIZER_ONLY,
    AdamWOptions,
    MuonOptions,
    PolarOptions,
    names,
)
from parallax.optim.rules.registry import RESERVED_OPTIONS
from parallax.optim.validation import check_positive


@dataclass(frozen=True)
class ScaledSignOptions:
    sign_scale: float = 1.0

    def __post_init__(self):
        check_positive("sign_scale", self.sign_scale)


def scaled_sign(M, options, polar, step):
    return options.sign_scale * torch.sign(M)


def count_steps(direction, options, state):
    """A stateful second stage: keeps a running count of its own."""
    state["sign_steps"] = state.get("sign_steps", torch.zeros((), dtype=torch.float32)) + 1
    return direction


@pytest.fixture
def sign_rule():
    rule = register_update_rule(UpdateRule("test_sign", ScaledSignOptions, scaled_sign, transform=count_steps,
                                           state_keys=("sign_steps",)))
    yield rule
    del UPDATE_RULES[rule.name]


def test_a_registered_rule_is_an_update_rule_with_its_options_checks_and_state(sign_rule):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 4))
    grad = torch.randn(6, 4)
    start = p.detach().clone()
    optimizer = MuonWithAdamW([{"params": [p], "use_muon": True}], update_rule="test_sign", sign_scale=0.5,
                              momentum=0.0, nesterov=False, lr=0.1)
    p.grad = grad
    optimizer.step()
    expected = start - adjust_lr(0.1, "original", (6, 4)) * 0.5 * torch.sign(grad)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    assert optimizer.state[p]["sign_steps"].item() == 1

    # Its state is float32 whatever the parameter dtype, through a checkpoint too.
    p = nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    optimizer = MuonWithAdamW([{"params": [p], "use_muon": True}], update_rule="test_sign")
    p.grad = torch.randn_like(p)
    optimizer.step()
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    resumed = MuonWithAdamW([{"params": [p], "use_muon": True}], update_rule="test_sign")
    resumed.load_state_dict(torch.load(saved))
    assert resumed.state[p]["sign_steps"].dtype == torch.float32

    with pytest.raises(ValueError, match="sign_scale"):
        MuonWithAdamW([{"params": [p], "use_muon": True, "update_rule": "test_sign", "sign_scale": -1.0}])
    with pytest.raises(ValueError, match="sign_scale is an option of update_rule='test_sign'"):
        MuonWithAdamW([{"params": [p], "use_muon": True, "sign_scale": 2.0}])


def test_registration_refuses_clashing_names(sign_rule):
    with pytest.raises(ValueError, match="already registered"):
        register_update_rule(sign_rule)
    with pytest.raises(ValueError, match="'sign_scale' already belongs to rule 'test_sign'"):
        register_update_rule(UpdateRule("test_sign2", ScaledSignOptions, scaled_sign))
    optimizer_options = {*names(MuonOptions), *names(PolarOptions), *names(AdamWOptions), *ADAMW_ALIASES,
                         *BOOKKEEPING, *OPTIMIZER_ONLY}
    assert RESERVED_OPTIONS == optimizer_options
    for reserved in ("lr", "ns_steps", "adamw_betas", "comm_dtype"):
        options = dataclass(frozen=True)(type("Options", (), {"__annotations__": {reserved: float}, reserved: 1.0}))
        with pytest.raises(ValueError, match="belongs to the optimizer"):
            register_update_rule(UpdateRule("test_reserved", options, scaled_sign))
    with pytest.raises(TypeError, match="frozen dataclass"):
        register_update_rule(UpdateRule("test_plain", dict, scaled_sign))


def test_each_rule_is_one_module_of_the_rules_package():
    modules = [rule.direction.__module__ for rule in UPDATE_RULES.values()]
    assert len(set(modules)) == len(modules)
    for rule in UPDATE_RULES.values():
        module = importlib.import_module(rule.direction.__module__)
        assert module.__name__.startswith("parallax.optim.rules.")
        assert rule.options.__module__ == module.__name__
