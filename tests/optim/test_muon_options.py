"""Every param-group option is honoured, or refused with an error naming it."""
import re

import pytest
import torch
from torch import nn

from parallax.optim import UPDATE_RULES, MuonWithAdamW

from .conftest import step_side_by_side

# (option, a value unlike its default, options the comparison runs under):
# setting the option in a group must equal setting it on the optimizer, and
# differ from leaving it out (spectrum_every only shows once the measured
# step count changes between measurements, which two steps cannot promise).
CASES = [
    ("lr", 0.05, {}),
    ("momentum", 0.5, {}),
    ("nesterov", False, {}),
    ("weight_decay", 0.1, {}),
    ("adjust_lr_fn", "match_rms_adamw", {}),
    ("flatten", True, {}),
    ("orthogonalizer", "svd", {}),
    ("ns_steps", 3, {}),
    ("ns_coefficients", (3.0, -3.2, 1.2), {}),
    ("eps", 100.0, {}),
    ("layer_aware_steps", True, {}),
    ("max_ns_steps", 1, {"layer_aware_steps": True}),
    ("spectrum_every", 1, {"layer_aware_steps": True}),
    ("update_rule", "kaon", {}),
    ("clip_threshold", 0.2, {"update_rule": "mucon"}),
    ("clip_relative", False, {"update_rule": "mucon"}),
    ("clip_method", "svd", {"update_rule": "mucon"}),
    ("clip_steps", 4, {"update_rule": "mucon"}),
    ("total_steps", 1000, {"update_rule": "dynmuon", "total_steps": 4}),
    ("dynmuon_p_max", 10.0, {"update_rule": "dynmuon", "total_steps": 4}),
    ("dynmuon_p_min", -0.5, {"update_rule": "dynmuon", "total_steps": 4}),
    ("dynmuon_center", 0.5, {"update_rule": "dynmuon", "total_steps": 4}),
    ("dynmuon_width", 1.0, {"update_rule": "dynmuon", "total_steps": 4}),
    ("schatten_q", 1.5, {"update_rule": "freon"}),
    ("kaon_iterations", 2, {"update_rule": "kaon"}),
    ("normuon_beta2", 0.5, {"update_rule": "normuon"}),
    ("normuon_eps", 0.5, {"update_rule": "normuon"}),
]


def matrices(count=3):
    torch.manual_seed(0)
    # A stack (flatten changes its matrices) wide enough to need 2 Newton-Schulz steps.
    first = nn.Parameter(torch.randn(2, 16, 48))
    return [first] + [nn.Parameter(first.detach().clone()) for _ in range(count - 1)]


@pytest.mark.parametrize("option, value, context", CASES, ids=[case[0] for case in CASES])
def test_a_group_option_is_honoured_like_the_optimizer_argument(option, value, context):
    in_group, on_optimizer, default = matrices()
    optimizers = [
        MuonWithAdamW([{"params": [in_group], "use_muon": True, **context, option: value}]),
        MuonWithAdamW([{"params": [on_optimizer], "use_muon": True}], **{**context, option: value}),
        MuonWithAdamW([{"params": [default], "use_muon": True, **context}]),
    ]
    step_side_by_side(optimizers, [[in_group], [on_optimizer], [default]], steps=2)
    assert torch.equal(in_group, on_optimizer)
    assert option == "spectrum_every" or not torch.equal(in_group, default)


def test_the_cases_cover_every_rule_option():
    covered = {option for option, _, _ in CASES}
    assert {name for rule in UPDATE_RULES.values() for name in rule.option_names()} <= covered


def parameter():
    return nn.Parameter(torch.randn(4, 4))


@pytest.mark.parametrize("group, message", [
    ({"use_muon": True, "clip_threshold": 0.3},
     "clip_threshold is an option of update_rule='mucon', but this group's update_rule is 'orthogonalize'"),
    ({"use_muon": True, "update_rule": "kaon", "ns_steps": 7}, "ns_steps has no effect with update_rule='kaon'"),
    ({"use_muon": True, "update_rule": "mucon", "orthogonalizer": "svd"},
     "orthogonalizer has no effect with update_rule='mucon'"),
    ({"use_muon": True, "orthogonalizer": "svd", "ns_steps": 7}, "ns_steps has no effect with orthogonalizer='svd'"),
    ({"use_muon": True, "orthogonalizer": "polar_express", "ns_coefficients": (3.0, -3.2, 1.2)},
     "ns_coefficients has no effect with orthogonalizer='polar_express'"),
    ({"use_muon": True, "layer_aware_steps": True, "ns_steps": 3}, "ns_steps has no effect with layer_aware_steps=True"),
    ({"use_muon": True, "spectrum_every": 10}, "spectrum_every has no effect without layer_aware_steps=True"),
    ({"use_muon": True, "adamw_lr": 1e-3}, "adamw_lr applies to AdamW groups"),
    ({"use_muon": True, "betas": (0.9, 0.99)}, "betas applies to AdamW groups"),
    ({"use_muon": True, "beta2": 0.9}, "unknown param group option 'beta2'"),
    ({"use_muon": True, "comm_dtype": torch.float32}, "comm_dtype is an argument of the optimizer"),
    ({"use_muon": False, "momentum": 0.9}, "momentum applies to Muon groups"),
    ({"use_muon": False, "schatten_q": 1.0}, "schatten_q applies to Muon groups"),
    ({"use_muon": False, "lr": 1e-3, "adamw_lr": 1e-3}, "sets both lr and adamw_lr"),
    ({"use_muon": False, "amsgrad": True}, "unknown param group option 'amsgrad'"),
    ({"use_muon": False, "adamw_foreach": True}, "adamw_foreach is an argument of the optimizer"),
])
def test_a_group_key_the_group_does_not_read_is_refused(group, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MuonWithAdamW([{"params": [parameter()], **group}])


@pytest.mark.parametrize("kwargs, message", [
    ({"clip_threshold": 0.3}, "clip_threshold=0.3 has no effect: clip_threshold is an option of update_rule='mucon'"),
    ({"update_rule": "freon", "ns_steps": 3}, "ns_steps=3 has no effect: ns_steps has no effect with update_rule='freon'"),
    ({"orthogonalizer": "svd", "compile": True}, "compile=True has no effect"),
])
def test_an_optimizer_option_that_no_muon_group_reads_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MuonWithAdamW([{"params": [parameter()], "use_muon": True}], **kwargs)


def test_an_optimizer_option_read_by_some_group_is_accepted():
    optimizer = MuonWithAdamW([{"params": [parameter()], "use_muon": True},
                               {"params": [parameter()], "use_muon": True, "update_rule": "mucon"}],
                              clip_threshold=0.3)
    assert [group["clip_threshold"] for group in optimizer.param_groups] == [0.3, 0.3]
    # Without Muon groups nothing reads Muon options, and nothing is refused (from_model on an all-AdamW model).
    MuonWithAdamW([{"params": [nn.Parameter(torch.randn(3))], "use_muon": False}], clip_threshold=0.3)


def test_a_misspelt_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="clip_treshold"):
        MuonWithAdamW([{"params": [parameter()], "use_muon": True}], clip_treshold=0.3)


@pytest.mark.parametrize("kwargs, name", [
    ({"clip_threshold": 1.5, "update_rule": "mucon"}, "clip_threshold"),
    ({"clip_method": "qr", "update_rule": "mucon"}, "clip_method"),
    ({"clip_steps": 0, "update_rule": "mucon"}, "clip_steps"),
    ({"schatten_q": 0.0, "update_rule": "freon"}, "schatten_q"),
    ({"kaon_iterations": 0, "update_rule": "kaon"}, "kaon_iterations"),
    ({"normuon_beta2": 1.0, "update_rule": "normuon"}, "normuon_beta2"),
    ({"dynmuon_width": 0.0, "update_rule": "dynmuon", "total_steps": 5}, "dynmuon_width"),
    ({"update_rule": "dynmuon"}, "total_steps"),
    ({"max_ns_steps": 0, "layer_aware_steps": True}, "max_ns_steps"),
    ({"adamw_betas": (0.9,)}, "betas"),
    ({"adamw_eps": 0.0}, "eps"),
])
def test_bad_values_raise_naming_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MuonWithAdamW([{"params": [parameter()], "use_muon": True}], **kwargs)
