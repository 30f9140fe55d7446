"""The study's own instruments: the MQAR generator, the correction probe, the
sweep plans, the run driver, the tables and the verdict rule."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.study import corpus, lm_grid, mqar, report
from benchmarks.study.correction import correction_ratios
from benchmarks.study.mqar import IGNORE, mqar_batch
from benchmarks.study.sweep import next_runs, run_pending, wider_rate
from parallax.models import GPT, GPTConfig, count_parameters, preset

ROOT = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------- sweep plans

@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4), st.sampled_from([0, 1, 2, 3]))
def test_a_sweep_widens_past_its_best_end_then_seeds_the_best(values, best_index):
    rates = [0.001, 0.002, 0.004, 0.008]
    values[best_index] = 0.0  # a unique best
    scores = dict(zip(rates, values))
    assert next_runs(rates, {}, lambda lr: set(), (0, 1, 2), 64) == [(lr, 0) for lr in rates]
    plan = next_runs(rates, scores, lambda lr: {0}, (0, 1, 2), 64)
    if best_index == 0:
        assert plan == [(0.0005, 0)]
    elif best_index == 3:
        assert plan == [(0.016, 0)]
    else:
        assert plan == [(rates[best_index], 1), (rates[best_index], 2)]
    assert next_runs(rates, scores, lambda lr: {0, 1, 2}, (0, 1, 2), 8) == []  # capped at 8x: seeded, complete


def test_wider_rate_stops_at_the_range_cap():
    assert wider_rate([0.01, 0.02, 0.04], 0.01, 64) == 0.005
    assert wider_rate([0.01, 0.02, 0.04], 0.04, 64) == 0.08
    assert wider_rate([0.01, 0.02, 0.04], 0.02, 64) is None
    assert wider_rate([0.01, 0.64], 0.01, 64) is None


def lm_row(size, cell, wd, lr, seed, bpb):
    sweep = lm_grid.Sweep(size, cell, wd)
    return {"run": sweep.run_name(lr, seed), "size": size, "cell": cell, "weight_decay": wd, "lr": lr, "seed": seed,
            "val_bpb": bpb, "params": 1000, "tokens": 20000, "status": "done" if bpb else "diverged"}


def test_lm_plan_follows_the_log_and_waits_on_runs_in_flight():
    sweep = lm_grid.Sweep("small-48", "parallax/muon", 0.0)
    rates = lm_grid.START_RATES["muon"]
    assert lm_grid.pending(sweep, []) == [(lr, 0) for lr in rates]
    in_flight = {sweep.run_name(rates[0], 0)}
    assert lm_grid.pending(sweep, [], in_flight) == [(lr, 0) for lr in rates[1:]]
    # The highest rate diverged, the lowest is best: widen downwards, but not while a run is in flight.
    rows = [lm_row("small-48", "parallax/muon", 0.0, lr, 0, bpb) for lr, bpb in zip(rates, (2.0, 2.1, 2.2, None))]
    other = [lm_row("small-48", "softmax/muon", 0.0, rates[0], 0, 1.0), lm_row("small", "parallax/muon", 0.0,
                                                                                   rates[1], 0, 1.0)]
    assert lm_grid.pending(sweep, rows + other) == [(rates[0] / 2, 0)]
    assert lm_grid.pending(sweep, rows, {sweep.run_name(rates[0] / 2, 0)}) == []
    rows.append(lm_row("small-48", "parallax/muon", 0.0, rates[0] / 2, 0, 2.5))
    assert lm_grid.pending(sweep, rows) == [(rates[0], 1), (rates[0], 2)]


def test_lm_sweeps_run_size_by_size_with_every_adamw_weight_decay():
    sweeps = lm_grid.sweeps_for(["small-48", "small"], list(lm_grid.CELLS))
    assert [s.size for s in sweeps] == ["small-48"] * 7 + ["small"] * 7
    assert {(s.cell, s.weight_decay) for s in sweeps[:7]} == {
        ("softmax/adamw", 0.1), ("softmax/adamw", 0.0), ("parallax/adamw", 0.1), ("parallax/adamw", 0.0),
        ("softmax/muon", 0.0), ("parallax/muon", 0.0), ("softmax-matched/muon", 0.0)}
    assert sweeps[6].cell == "softmax-matched/muon"  # the control last


def mqar_row(attention, optimizer, lr, seed, accs, solve, steps=600, embed_lr=0.003, seq_len=64):
    row = {"attention": attention, "optimizer": optimizer, "lr": lr, "seq_len": seq_len, "width": 64, "seed": seed,
           "steps": steps, "device": "cpu", "steps_to_solve": solve,
           "accuracy": {str(n): a for n, a in zip((4, 8), accs)}}
    if embed_lr != "absent":
        row["embed_lr"] = embed_lr
    return row


def test_mqar_plan_keeps_the_embedding_policies_apart():
    group = dict(attention="parallax", optimizer="adamw", seq_len=64, vocab=128, steps=600, batch=64, device="cpu",
                 embed_lr=None)
    rates = {"adamw": [0.001, 0.002, 0.004], "muon": [0.01]}
    # Rows logged before embed_lr existed are the one-rate policy for AdamW.
    old = [mqar_row("parallax", "adamw", lr, 0, (acc, acc), None, embed_lr="absent")
           for lr, acc in ((0.001, 0.3), (0.002, 0.2), (0.004, 0.1))]
    done = {mqar.run_key(r): r for r in old}
    assert [job["lr"] for _, job in mqar.plan_runs([group], rates, [1], done, set())] == [0.0005]
    new_policy = {**group, "embed_lr": 0.003}
    assert [job["lr"] for _, job in mqar.plan_runs([new_policy], rates, [1], done, set())] == rates["adamw"]


def test_mqar_sweep_table_picks_the_best_rate_and_counts_solved_rates():
    # 0.005 and 0.01 both solve; 0.01 is best because it solves in fewer steps.
    rows = [mqar_row("softmax", "muon", 0.005, 0, (1.0, 0.995), 400),
            mqar_row("softmax", "muon", 0.01, 0, (1.0, 0.995), 200),
            mqar_row("softmax", "muon", 0.02, 0, (0.3, 0.1), None),
            mqar_row("softmax", "muon", 0.01, 1, (1.0, 0.985), None)]
    shown = set()
    line = report.mqar_sweep_table(rows, shown).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6] == "0.005: 0.995, 0.01: 0.995 (s1 0.985), 0.02: 0.100"
    assert cells[7:] == ["0.01", "yes", "1.000", "0.990", "s0: 200, s1: -", "2/3"]
    assert shown == {id(r) for r in rows}


# ---------------------------------------------------------------- the verdict rule

def stat(name, values, interior=True):
    return report.CellStat(name, 0.01, interior, values)


def test_verdict_holds_only_with_interior_rates_two_seeds_and_a_gap_beyond_the_spread():
    a, b = stat("a", [2.0, 2.02]), stat("b", [2.2, 2.23])
    assert report.verdict(0.2, [a, b]) == ("holds", [])
    assert report.verdict(-0.2, [a, b]) == ("reverse holds", [])
    verdict, reasons = report.verdict(0.04, [a, b])  # spread 0.02 + 0.03
    assert verdict == "open" and "within the spread" in reasons[0]
    verdict, reasons = report.verdict(0.2, [stat("a", [2.0], interior=False), b])
    assert verdict == "open" and any("edge" in r for r in reasons) and any("1 seed" in r for r in reasons)


def test_lm_claims_compare_cells_at_their_best_rates():
    rows = []
    for cell, base in (("softmax/adamw", 2.3), ("parallax/adamw", 2.25), ("softmax/muon", 2.2),
                       ("parallax/muon", 2.0), ("softmax-matched/muon", 2.19)):
        rates = lm_grid.START_RATES[cell.split("/")[1]]
        rows += [lm_row("small-48", cell, 0.0, lr, 0, base + abs(i - 1) * 0.1) for i, lr in enumerate(rates)]
        rows += [lm_row("small-48", cell, 0.0, rates[1], seed, base + 0.001 * seed) for seed in (1, 2)]
    claims = {c[0].split(" (")[0]: c for c in report.lm_claims(rows, "test")}
    assert claims["Parallax beats softmax under Muon"][2] == "holds"
    assert claims["Parallax beats softmax under AdamW"][2] == "holds"
    assert claims["The Parallax gain is larger under Muon than under AdamW"][2] == "holds"
    gaps = report.lm_gap_table(rows).splitlines()[-1].split(" | ")
    assert gaps[4] == "-0.0500 (0.0040)" and gaps[7] == "-0.2000 (0.0040)" and gaps[-1] == "5/7 |"
    table = report.lm_grid_table(rows, set())
    assert "| small-48 | 1,000 | 20,000 (20.00) | parallax/muon | 0 |" in table
    assert table.count("none: complete") == 5 and "lr 0.00075 s0" in table  # the wd 0.1 sweeps are still to run


def test_report_lists_runs_no_table_shows_and_rewrites_marked_blocks(tmp_path, capsys):
    results = tmp_path / "results"
    (results / "mqar_cpu").mkdir(parents=True)
    rows = [mqar_row("parallax", "muon", 0.01, 0, (1.0, 1.0), 100), mqar_row("softmax", "muon", 0.01, 1, (0.1, 0.1),
                                                                             None)]
    (results / "mqar_cpu" / "mqar.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    blocks = report.tables(results)
    assert "parallax/muon" in blocks["mqar-cpu"]
    assert "softmax/muon lr 0.01 seed 1" in blocks["excluded"] and "no seed-0 run" in blocks["excluded"]
    doc = tmp_path / "RESULTS.md"
    doc.write_text("intro\n<!-- report:mqar-cpu -->\nstale\n<!-- /report:mqar-cpu -->\nend\n")
    report.main(["--results", str(results), "--update", str(doc)])
    assert doc.read_text() == "intro\n<!-- report:mqar-cpu -->\n" + blocks["mqar-cpu"] + "<!-- /report:mqar-cpu -->\nend\n"
    assert "## mqar-cpu\n\n" + blocks["mqar-cpu"] in capsys.readouterr().out  # run_all.sh keeps it as tables.md


def test_corpus_links_sources_outside_test_and_hidden_folders_and_a_second_call_keeps_them(tmp_path, capsys):
    root, dest = tmp_path / "site", tmp_path / "corpus"
    for rel in ("pkg/a.py", "pkg/sub/b.py", "pkg/tests/t.py", "pkg/__pycache__/c.py", ".hidden/h.py", "pkg/notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    kept = ["pkg/a.py", "pkg/sub/b.py"]
    for _ in range(2):
        assert corpus.link_sources(root, dest) == (2, sum(len(f"# {rel}\n") for rel in kept))
        assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == kept
    assert (dest / "pkg" / "sub" / "b.py").read_text() == "# pkg/sub/b.py\n"
    with pytest.raises(SystemExit) as exit_info:
        corpus.main([str(dest), "--root", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "--root" in capsys.readouterr().err


# ---------------------------------------------------------------- running

def test_run_pending_logs_each_row_and_stops_runs_at_the_deadline():
    rows = []
    plan = [("a", {"x": 1}), ("b", {"x": 2})]
    failed = run_pending(lambda busy: [p for p in plan if p[0] not in busy and p[0] not in {n for n, _ in rows}],
                         dict, 2, None, lambda name, row: rows.append((name, row)))
    assert failed == [] and sorted(rows) == [("a", {"x": 1}), ("b", {"x": 2})]
    start = time.time()
    failed = run_pending(lambda busy: [] if busy else [("sleeper", 60)], time.sleep, 1, time.time() + 3,
                         lambda name, row: pytest.fail("a stopped run logs nothing"))
    assert failed == [] and time.time() - start < 30


def test_lm_grid_fills_a_sweep_over_sittings_and_skips_what_is_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_grid, "START_RATES", {"muon": (0.01, 0.02), "adamw": (1e-3, 2e-3)})
    monkeypatch.setattr(lm_grid, "SEEDS", (0, 1))
    monkeypatch.setattr(lm_grid, "MAX_RATE_RANGE", 2)  # no widening: 3 runs in all
    data = tmp_path / "text.txt"
    data.write_bytes((ROOT / "benchmarks" / "study" / "sweep.py").read_bytes() * 4)
    args = ["--out", str(tmp_path / "lm"), "--sizes", "tiny", "--cells", "parallax/muon", "--tokens-per-param", "0.01",
            "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32", "--threads", "1", "--jobs", "2",
            "--data", str(data)]
    assert lm_grid.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "lm" / "runs.jsonl").open()]
    assert sorted((r["lr"], r["seed"]) for r in rows) in ([(0.01, 0), (0.01, 1), (0.02, 0)],
                                                         [(0.01, 0), (0.02, 0), (0.02, 1)])
    for r in rows:
        assert r["status"] == "done" and r["device"] == "cpu" and r["precision"] == "float32"
        assert r["steps"] == math.ceil(0.01 * 45216 / 32) and r["correction"][-1]["step"] == r["steps"]
        assert len(r["correction"][-1]["ratios"]) == 2  # one per layer
        assert not (tmp_path / "lm" / r["run"] / "checkpoint.pt").exists()  # logged runs are never resumed
    assert lm_grid.main(args) == 0
    assert len((tmp_path / "lm" / "runs.jsonl").read_text().splitlines()) == 3


def test_lm_grid_stopped_by_ctrl_c_checkpoints_and_the_next_sitting_resumes(tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    data.write_bytes((ROOT / "benchmarks" / "study" / "sweep.py").read_bytes() * 4)
    out = tmp_path / "lm"
    args = ["--out", str(out), "--sizes", "tiny", "--cells", "parallax/muon", "--tokens-per-param", "0.1",
            "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32", "--threads", "1", "--data", str(data)]
    # Ctrl-C reaches the whole process group: the grid and its run (the first
    # seed-0 rate). The grid gets Python's SIGINT handler back, which a
    # background shell job starts without.
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from benchmarks.study import lm_grid; lm_grid.main(sys.argv[1:])")
    grid = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "tiny_parallax_muon_wd0_lr0.0075_s0"
    log = run / "log.jsonl"
    try:
        give_up = time.time() + 120
        while not (log.exists() and '"train"' in log.read_text()):
            assert grid.poll() is None and time.time() < give_up, "the run never reached a training step"
            time.sleep(0.02)
        os.killpg(grid.pid, signal.SIGINT)
        grid.wait(timeout=120)
    finally:
        if grid.poll() is None:
            os.killpg(grid.pid, signal.SIGKILL)
    assert not (out / "runs.jsonl").exists()  # stopped, not finished: nothing logged
    assert (run / "checkpoint.pt").exists()
    monkeypatch.setattr(lm_grid, "START_RATES", {"muon": (0.0075,), "adamw": (1e-3,)})
    monkeypatch.setattr(lm_grid, "SEEDS", (0,))
    monkeypatch.setattr(lm_grid, "MAX_RATE_RANGE", 1)  # the next sitting: only the stopped run is left
    assert lm_grid.main(args) == 0
    [row] = [json.loads(line) for line in (out / "runs.jsonl").open()]
    assert row["run"] == run.name and row["status"] == "done"
    assert row["step"] == row["steps"] == math.ceil(0.1 * 45216 / 32)
    assert "resumed from" in (run / "stdout.txt").read_text()
    assert not (run / "checkpoint.pt").exists()


def test_lm_grid_estimate_prices_each_cells_smallest_plan(capsys):
    threads = torch.get_num_threads()
    try:
        assert lm_grid.main(["--estimate", "--sizes", "tiny", "--cells", "parallax/muon", "softmax/adamw",
                             "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32"]) == 0
    finally:
        torch.set_num_threads(threads)  # the estimate times one thread
    lines = capsys.readouterr().out.strip().splitlines()
    cells = [[field.strip().replace(",", "") for field in line.strip("|").split("|")] for line in lines[2:]]
    total = 0.0
    for (size, cell, params, tokens, steps, rate, runs, hours), expected_runs in zip(cells, (6, 12)):
        assert (size, int(tokens), int(steps)) == ("tiny", 20 * 45216, math.ceil(20 * 45216 / 32))
        attention = cell.split("/")[0]
        assert int(params) == count_parameters(preset("tiny", vocab_size=256, attention=attention))
        assert int(runs) == expected_runs
        assert float(hours) == pytest.approx(expected_runs * (20 * 45216 + 5 * 32 / 3) / float(rate) / 3600,
                                             rel=0.002, abs=0.051)
        total += float(hours)
    assert cells[-1][0] == "all" and float(cells[-1][-1]) == pytest.approx(total, abs=0.6)


def test_run_all_gpu_dry_run_lists_the_next_gpu_runs_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/study/run_all.sh", "--scale", "gpu", "--budget-min", "8", "--dry-run",
                           "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cuda 2000 steps T=512 ")  # MQAR at length 512 first
    assert "20m_softmax_adamw_wd0.1_lr0.00075_s0" in lines
    assert not list(tmp_path.iterdir())  # nothing written, not even the log folders
    bad = subprocess.run(["bash", "benchmarks/study/run_all.sh", "--scale", "tpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--scale" in bad.stderr
