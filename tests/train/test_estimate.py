"""The cost model train.py states before training: FLOPs against torch's own
counter, activation bytes against what autograd actually keeps, and the
lines and warnings a run prints."""
import io
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from parallax.cli import main
from parallax.models import GPT, GPTConfig
from parallax.train import estimate as E

CONFIGS = [
    GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256, attention="softmax"),
    GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256, attention="parallax"),
    GPTConfig(n_layer=3, n_head=2, n_embd=48, block_size=256, attention="parallax", mlp_hidden=80, vocab_size=97),
    GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=256, attention="softmax", parameter_matched=True),
]


def counted_flops(model: GPT, idx: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(idx)
    return counter.get_total_flops()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.attention}-L{c.n_layer}-d{c.n_embd}")
@pytest.mark.parametrize("T", [37, 200])
def test_flops_match_torchs_count(config, T):
    """torch's counter sees every matmul of the projections, and the torch path's
    attention einsums (not SDPA's), which work on whole row blocks: between the
    model's count of visible keys and twice it."""
    torch.manual_seed(0)
    model = GPT(config)
    B = 2
    counted = counted_flops(model, torch.randint(0, config.vocab_size, (B, T))) / (B * T)
    projections = E.projection_flops_per_token(config)
    if config.attention == "softmax":
        assert counted == projections
    else:
        attention = counted - projections
        assert E.attention_flops_per_token(config, T) <= attention <= 2 * E.attention_flops_per_token(config, T)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.attention}-L{c.n_layer}-d{c.n_embd}")
@pytest.mark.parametrize("B,T", [(2, 37), (1, 200)])
def test_activation_bytes_match_what_autograd_keeps(config, B, T):
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (B, T))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    scores = config.n_layer * E.kept_score_bytes(config, B, T) if config.attention == "parallax" else 0
    modelled = E.activation_bytes_per_token(config, 4) * B * T + scores
    assert modelled == pytest.approx(sum(kept.values()), rel=0.25)


def test_muon_flops_count_newton_schulz_on_the_short_side():
    # X (m x n, m <= n): X X^T is 2 m^2 n, the polynomial 2 m^3, its product with X 2 m^2 n, 5 steps
    assert E.muon_flops([(3, 8)]) == E.muon_flops([(8, 3)]) == 5 * (4 * 9 * 8 + 2 * 27)
    assert E.muon_flops([]) == 0


def test_a_matmul_rate_is_measured():
    rate = E.matmul_rate(torch.device("cpu"), torch.float32, 64, 32, 48)
    assert math.isfinite(rate) and rate > 0


def test_seconds_read_as_a_person_would():
    assert [E.describe_seconds(s) for s in (0.2, 42, 150, 3000, 7200)] == ["1 s", "42 s", "2 min", "50 min", "2.0 h"]


def test_bytes_read_as_a_person_would():
    assert [E.describe_bytes(n) for n in (1e3, 45e6, 999e6, 1.25e9, 12.8e9)] == ["1 MB", "45 MB", "999 MB", "1.2 GB",
                                                                               "12.8 GB"]


def test_a_run_states_its_estimate_and_a_gpu_preset_on_cpu_warns(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    args = ["--data", str(text), "--out", str(tmp_path / "o"), "--steps", "0", "--batch-size", "1", "--seq-len", "16",
            "--eval-batches", "1", "--sample-tokens", "0", "--threads", "1", "--no-progress", "--device", "cpu"]
    assert main(["--model", "tiny", *args]) == 0
    captured = capsys.readouterr()
    assert "estimate: 0 steps in about 1 s, 1 evaluation in about 1 s; peak memory about" in captured.out, \
        captured.out
    assert "warning" not in captured.err
    assert main(["--model", "20m", *args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "warning: 20m is a GPU preset: on this CPU it needs about" in err and "--model small" in err
