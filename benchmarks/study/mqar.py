"""Multi-query associative recall (MQAR): {softmax, Parallax} x {AdamW, Muon}
plus a parameter-matched softmax, each cell swept over learning rates at each
sequence length.

A sequence opens with N key-value pairs; later, at random positions, the keys
come back in a shuffled order and the model must output each key's value as
the next token. Everything else is filler (token 0) and is not scored. Models
train on a mix of pair counts. Every EVAL_EVERY steps a held-out check scores
each pair count; a run stops once every pair count reaches SOLVED there
(`steps_to_solve`) or at its step budget, and is then scored on a separate
held-out set.

Each (length, cell) is a sweep (benchmarks/study/sweep.py): seed 0 at every
starting rate of its optimizer, more rates a factor 2 past whichever end is
best (up to a MAX_RATE_RANGE span), then the `--best-seeds` at the best rate
(best: highest worst-pair accuracy, then fewest steps, then lowest rate). What
runs next follows from the log alone, so an interrupted sweep resumes.

Embedding policy (`--embed-lr`, the same for both optimizers): embeddings,
lm_head and gains use AdamW at EMBED_LR; the swept rate is the hidden
matrices'. `--adamw-one-rate` gives AdamW one rate for every parameter (how
the first sweeps ran; their log rows have embed_lr null).

    python -m benchmarks.study.mqar                 # CPU size -> results/mqar_cpu/mqar.jsonl
    python -m benchmarks.study.mqar --scale gpu     # GPU size -> results/mqar_gpu/mqar.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.study.sweep import next_runs, run_pending
from parallax.models import GPT, GPTConfig
from parallax.optim import MuonWithAdamW, split_params

IGNORE = -1
SOLVED = 0.99  # held-out accuracy every pair count must reach
EVAL_EVERY = 50
MUON_RATES = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
ADAMW_RATES = (3e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2)
EMBED_LR = 3e-3
MAX_RATE_RANGE = 256  # widest sweep (highest / lowest rate) before it stops growing
ATTENTIONS = ("softmax", "parallax", "softmax-matched")  # the last: softmax widened to Parallax's parameters
# --scale: the CPU size fits the 2-core development machine (length 256 would
# take hours there); the GPU size adds 256 and 512 and bf16.
SCALES = {
    "cpu": dict(seq_lens=[64, 128], steps=4000, device="cpu", jobs=1),
    "gpu": dict(seq_lens=[128, 256, 512, 64], steps=2000, device="cuda", jobs=8),
}


def mqar_batch(batch: int, seq_len: int, num_pairs: int, vocab: int, generator: torch.Generator):
    """Token ids and targets [batch, seq_len]; targets are IGNORE except at queries.

    Keys come from [1, vocab/2), values from [vocab/2, vocab), so a value never
    looks like a key; token 0 is filler.
    """
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len ({seq_len}) must be >= 4 * num_pairs ({4 * num_pairs})")
    half = vocab // 2
    keys = torch.argsort(torch.rand(batch, half - 1, generator=generator), dim=1)[:, :num_pairs] + 1
    values = torch.randint(half, vocab, (batch, num_pairs), generator=generator)
    idx = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    idx[:, 0:2 * num_pairs:2] = keys
    idx[:, 1:2 * num_pairs:2] = values
    # Query slots: distinct even offsets after the context, so no two collide.
    slots = (seq_len - 2 * num_pairs) // 2
    offsets = torch.argsort(torch.rand(batch, slots, generator=generator), dim=1)[:, :num_pairs]
    positions = 2 * num_pairs + 2 * offsets
    order = torch.argsort(torch.rand(batch, num_pairs, generator=generator), dim=1)
    rows = torch.arange(batch)[:, None]
    idx[rows, positions] = keys.gather(1, order)
    targets[rows, positions] = values.gather(1, order)
    return idx, targets


def pair_counts_for(seq_len: int) -> list[int]:
    return [n for n in (4, 8, 16, 32) if 4 * n <= seq_len]


def width_for(seq_len: int) -> int:
    """Model width: 64 up to length 128, then doubling with the length (256: 128, 512: 256)."""
    return 64 * max(1, seq_len // 128)


def build_optimizer(model, optimizer: str, lr: float, embed_lr: float | None):
    """Hidden matrices at `lr` (Muon or AdamW); embeddings, lm_head and gains by
    AdamW at `embed_lr` (None, AdamW only: every parameter at `lr`)."""
    if optimizer == "muon":
        return MuonWithAdamW.from_model(model, lr=lr, adamw_lr=embed_lr, weight_decay=0.0)
    if embed_lr is None:
        groups = [{"params": list(model.parameters())}]
    else:
        matrices, rest = split_params(model)
        groups = [{"params": matrices}, {"params": rest, "lr": embed_lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


class HeldOut:
    """Fixed held-out sequences per pair count, on the model's device."""

    def __init__(self, seq_len, pair_counts, vocab, count, seed, device):
        generator = torch.Generator().manual_seed(seed)
        self.sets = {n: tuple(x.to(device) for x in mqar_batch(count, seq_len, n, vocab, generator))
                     for n in pair_counts}

    @torch.no_grad()
    def accuracy(self, model, autocast) -> dict[int, float]:
        out = {}
        for n, (idx, targets) in self.sets.items():
            with autocast():
                logits, _ = model(idx)
            scored = targets != IGNORE
            out[n] = (logits.argmax(-1)[scored] == targets[scored]).float().mean().item()
        return out


def run_cell(attention, optimizer, lr, seq_len, *, vocab, steps, batch, seed, embed_lr=EMBED_LR, device="cpu"):
    """One training run; returns its log row."""
    device = torch.device(device)
    # bf16 autocast on CUDA (the Triton kernels' precision); exact float32 on CPU.
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    pair_counts = pair_counts_for(seq_len)
    width = width_for(seq_len)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=seq_len, attention=attention.removesuffix("-matched"),
                          parameter_matched=attention.endswith("-matched"), n_layer=2, n_head=2,
                          n_embd=width)).to(device)
    opt = build_optimizer(model, optimizer, lr, embed_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    data = torch.Generator().manual_seed(seed)
    check = HeldOut(seq_len, pair_counts, vocab, 128, 20_000 + seed, device)
    curve, steps_to_solve, step = [], None, 0
    start = time.perf_counter()
    while step < steps and steps_to_solve is None:
        idx, targets = (x.to(device) for x in mqar_batch(batch, seq_len, pair_counts[step % len(pair_counts)],
                                                          vocab, data))
        with autocast():
            logits, _ = model(idx)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % EVAL_EVERY == 0:
            acc = check.accuracy(model, autocast)
            curve.append([step, round(min(acc.values()), 4)])
            if min(acc.values()) >= SOLVED:
                steps_to_solve = step
    final = HeldOut(seq_len, pair_counts, vocab, 256, 10_000 + seed, device).accuracy(model, autocast)
    return {"attention": attention, "optimizer": optimizer, "lr": lr, "embed_lr": embed_lr, "seq_len": seq_len,
            "width": width, "params": model.num_parameters(),
            "seed": seed, "steps": steps, "trained_steps": step, "steps_to_solve": steps_to_solve,
            "accuracy": final, "curve": curve, "device": device.type,
            "seconds": round(time.perf_counter() - start, 1)}


def run_job(job: dict) -> dict:
    """One run in a worker process (one thread on CPU: runs share the machine)."""
    torch.set_num_threads(1)
    return run_cell(**job)


def embed_lr_of(row: dict) -> float | None:
    """A row's embedding rate; rows logged before the field existed: Muon cells
    used EMBED_LR, AdamW cells one rate for everything (None)."""
    if "embed_lr" in row:
        return row["embed_lr"]
    return EMBED_LR if row["optimizer"] == "muon" else None


def sweep_key(row: dict) -> tuple:
    """What makes runs one sweep: (device, step budget, length, attention, optimizer, embedding rate)."""
    return row["device"], row["steps"], row["seq_len"], row["attention"], row["optimizer"], embed_lr_of(row)


def run_key(row: dict) -> tuple:
    """What identifies a run, in a log row or a job."""
    return sweep_key(row) + (float(row["lr"]), row["seed"])


def score(row: dict) -> tuple:
    """Lower is better: highest worst-pair accuracy, then fewest steps to solve, then lowest rate."""
    solve = row.get("steps_to_solve")
    return -min(row["accuracy"].values()), solve if solve is not None else math.inf, row["lr"]


def best_rate(runs) -> float:
    """The best rate of a sweep's seed-0 runs (see `score`)."""
    return min((r for r in runs if r["seed"] == 0), key=score)["lr"]


def plan_runs(groups: list[dict], start_rates: dict, best_seeds, done: dict, busy: set) -> list[tuple[str, dict]]:
    """The runs each sweep (a job dict without lr and seed) can start now."""
    offered = []
    for group in groups:
        key = sweep_key({**group, "device": torch.device(group["device"]).type})
        mine = [row for row in done.values() if sweep_key(row) == key]
        device, steps, seq_len, attention, optimizer, embed = key
        prefix = f"{device} {steps} steps T={seq_len} {attention}/{optimizer} embed {embed or 'lr'}: "
        in_flight = any(name.startswith(prefix) for name in busy)
        rates = start_rates[group["optimizer"]]
        scores = {r["lr"]: score(r) for r in mine if r["seed"] == 0}
        if in_flight:
            todo = [(lr, 0) for lr in rates if lr not in scores]
        else:
            todo = next_runs(rates, scores, lambda lr: {r["seed"] for r in mine if r["lr"] == lr},
                             [0, *best_seeds], MAX_RATE_RANGE)
        for lr, seed in todo:
            job = {**group, "lr": lr, "seed": seed}
            name = f"{prefix}lr {lr:g} seed {seed}"
            if name not in busy:
                offered.append((name, job))
    return offered


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder of the log mqar.jsonl (default: results/mqar_<scale>)")
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                        help="defaults for --seq-lens, --steps, --device, --jobs: " + json.dumps(SCALES))
    parser.add_argument("--seq-lens", type=int, nargs="+", help="in the order they run")
    parser.add_argument("--steps", type=int, help="step budget of a run")
    parser.add_argument("--device")
    parser.add_argument("--jobs", type=int, help="runs at once, one process each")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--muon-lr", type=float, nargs="+", default=list(MUON_RATES), help="starting rates")
    parser.add_argument("--adamw-lr", type=float, nargs="+", default=list(ADAMW_RATES), help="starting rates")
    parser.add_argument("--embed-lr", type=float, default=EMBED_LR, help="AdamW rate of embeddings, head, gains")
    parser.add_argument("--adamw-one-rate", action="store_true", help="AdamW: every parameter at the swept rate")
    parser.add_argument("--optimizers", nargs="+", choices=("adamw", "muon"), default=["adamw", "muon"])
    parser.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--best-seeds", type=int, nargs="*", default=[1], help="seeds rerun at each best rate")
    parser.add_argument("--minutes", type=float, help="stop (ending runs in flight) after this many minutes")
    parser.add_argument("--deadline", type=float, help="the same as an absolute time.time() (run_all.sh's shared budget)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs that would start next, run nothing")
    args = parser.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    out = args.out or Path(f"benchmarks/study/results/mqar_{args.scale}")
    log = out / "mqar.jsonl"
    done = {run_key(row): row for row in map(json.loads, log.open())} if log.exists() else {}

    def on_row(name, row):
        done[run_key(row)] = row
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)

    groups = [dict(attention=a, optimizer=o, seq_len=t, vocab=args.vocab, steps=args.steps, batch=args.batch,
                   device=args.device, embed_lr=None if o == "adamw" and args.adamw_one_rate else args.embed_lr)
              for t in args.seq_lens for a in args.attentions for o in args.optimizers]
    start_rates = {"muon": args.muon_lr, "adamw": args.adamw_lr}
    if args.dry_run:
        for name, _ in plan_runs(groups, start_rates, args.best_seeds, done, set()):
            print(name)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline
    if args.minutes is not None:
        deadline = min(deadline or math.inf, time.time() + 60 * args.minutes)
    failed = run_pending(lambda busy: plan_runs(groups, start_rates, args.best_seeds, done, busy), run_job,
                         args.jobs, deadline, on_row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
