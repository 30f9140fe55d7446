"""The study's own instruments: the MQAR generator and sweep, the correction probe, the tables."""
import json

import torch

from benchmarks.study.correction import correction_ratios
from benchmarks.study.mqar import IGNORE, mqar_batch
from parallax.models import GPT, GPTConfig


def test_mqar_queries_ask_for_the_values_of_earlier_keys():
    idx, targets = mqar_batch(16, 64, 8, 64, torch.Generator().manual_seed(0))
    assert idx.shape == targets.shape == (16, 64)
    for row, target in zip(idx, targets):
        pairs = dict(zip(row[0:16:2].tolist(), row[1:16:2].tolist()))
        assert len(pairs) == 8 and all(1 <= k < 32 <= v < 64 for k, v in pairs.items())
        queries = (target != IGNORE).nonzero().flatten()
        assert len(queries) == 8 and queries.min() >= 16
        assert sorted(row[queries].tolist()) == sorted(pairs)
        assert all(target[q].item() == pairs[row[q].item()] for q in queries)
        assert (row[16:][target[16:] == IGNORE] == 0).all()  # filler elsewhere


def test_correction_ratio_is_zero_at_init_and_grows_with_the_probe():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=16))
    idx = torch.randint(0, 32, (2, 16))
    # A zero probe is softmax attention, up to float32 rounding of two code paths.
    assert max(correction_ratios(model, idx)) < 1e-6
    torch.nn.init.normal_(model.blocks[1].attn.r_proj.weight, std=0.3)
    ratios = correction_ratios(model, idx)
    assert ratios[0] < 1e-6 and ratios[1] > 1e-3
    softmax = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=16, attention="softmax"))
    assert correction_ratios(softmax, idx) == []


def test_mqar_sweep_table_picks_the_best_rate_and_counts_solved_rates():
    from benchmarks.study.report import mqar_sweep_table

    def row(lr, seed, accs, solve):
        return {"attention": "softmax", "optimizer": "muon", "lr": lr, "seq_len": 64, "width": 64, "seed": seed,
                "steps": 600, "device": "cpu", "steps_to_solve": solve, "accuracy": {"4": accs[0], "8": accs[1]}}

    # 0.005 and 0.01 both solve; 0.01 is best because it solves in fewer steps.
    rows = [row(0.005, 0, (1.0, 0.995), 400), row(0.01, 0, (1.0, 0.995), 200), row(0.02, 0, (0.3, 0.1), None),
            row(0.01, 1, (1.0, 0.985), None)]
    line = mqar_sweep_table(rows).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == "0.005: 0.995, 0.01: 0.995, 0.02: 0.100"
    assert cells[6:] == ["0.01", "1.000", "0.990", "s0: 200, s1: -", "2/3"]


def test_mqar_sweep_queues_each_best_rate_with_more_seeds(tmp_path):
    """The sweep runs every rate, then seed 1 at the best one; a rerun skips what is logged."""
    from benchmarks.study.mqar import main, run_key

    args = ["--out", str(tmp_path), "--seq-lens", "16", "--steps", "4", "--jobs", "1", "--optimizers", "muon",
            "--attentions", "parallax", "--muon-lr", "0.01", "0.02"]
    main(args)
    rows = [json.loads(line) for line in (tmp_path / "mqar.jsonl").open()]
    assert sorted((r["lr"], r["seed"]) for r in rows) in ([(0.01, 0), (0.01, 1), (0.02, 0)],
                                                         [(0.01, 0), (0.02, 0), (0.02, 1)])
    assert all(r["trained_steps"] == 4 and r["steps_to_solve"] is None for r in rows)
    main(args)
    assert len((tmp_path / "mqar.jsonl").read_text().splitlines()) == 3
    assert len({run_key(r) for r in rows}) == 3


def test_lm_sweep_widens_past_the_best_end_until_interior():
    from benchmarks.study.lm_grid import MAX_RATE_RANGE, edge_step

    assert edge_step([0.01, 0.02, 0.04], 0.01) == 0.005
    assert edge_step([0.01, 0.02, 0.04], 0.04) == 0.08
    assert edge_step([0.01, 0.02, 0.04], 0.02) is None
    assert edge_step([0.01, 0.01 * MAX_RATE_RANGE], 0.01) is None
