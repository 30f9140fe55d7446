"""Multi-query associative recall (MQAR): the 2x2 {softmax, Parallax} x {AdamW, Muon},
each cell swept over learning rates at each sequence length.

A sequence opens with N key-value pairs; later, at random positions, the keys
come back in a shuffled order and the model must output each key's value as
the next token. Everything else is filler (token 0) and is not scored. Models
train on a mix of pair counts. Every EVAL_EVERY steps a held-out check scores
each pair count; a run stops once every pair count reaches SOLVED there
(`steps_to_solve`) or at its step budget, and is then scored on a separate
held-out set.

For each sequence length, each cell runs every rate of its optimizer (seed 0),
then each cell's best rate again with the `--best-seeds`. Runs already in the
log are skipped, so an interrupted sweep resumes.

    python -m benchmarks.study.mqar                 # CPU size -> results/mqar_cpu/mqar.jsonl
    python -m benchmarks.study.mqar --scale gpu     # GPU size -> results/mqar_gpu/mqar.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch
import torch.nn.functional as F

from parallax.models import GPT, GPTConfig
from parallax.optim import MuonWithAdamW

IGNORE = -1
SOLVED = 0.99  # held-out accuracy every pair count must reach
EVAL_EVERY = 50
MUON_RATES = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
ADAMW_RATES = (3e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2)
# --scale: the CPU size fits the 2-core development machine (length 256 would
# take hours there); the GPU size adds 256 and 512, a longer budget and bf16.
SCALES = {
    "cpu": dict(seq_lens=[64, 128], steps=600, device="cpu", jobs=2),
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


def build_optimizer(model, optimizer: str, lr: float):
    if optimizer == "muon":
        return MuonWithAdamW.from_model(model, lr=lr, adamw_lr=3e-3, weight_decay=0.0)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


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


def run_cell(attention, optimizer, lr, seq_len, *, vocab, steps, batch, seed, device="cpu"):
    """One training run; returns its log row."""
    device = torch.device(device)
    # bf16 autocast on CUDA (the Triton kernels' precision); exact float32 on CPU.
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    pair_counts = pair_counts_for(seq_len)
    width = width_for(seq_len)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=seq_len, attention=attention,
                          n_layer=2, n_head=2, n_embd=width)).to(device)
    opt = build_optimizer(model, optimizer, lr)
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
    return {"attention": attention, "optimizer": optimizer, "lr": lr, "seq_len": seq_len, "width": width,
            "seed": seed, "steps": steps, "trained_steps": step, "steps_to_solve": steps_to_solve,
            "accuracy": final, "curve": curve, "device": device.type,
            "seconds": round(time.perf_counter() - start, 1)}


def run_job(job: dict) -> dict:
    """One run in a worker process (one thread: runs share the machine)."""
    torch.set_num_threads(1)
    return run_cell(**job)


def run_key(row: dict) -> tuple:
    """What identifies a run, in a log row or a job."""
    return row["attention"], row["optimizer"], float(row["lr"]), row["seq_len"], row["seed"], row["steps"]


def best_rate(runs) -> float:
    """The rate whose seed-0 run has the best worst-pair accuracy; ties go to the
    fewest steps to solve, then to the lowest rate."""
    def score(r):
        solve = r.get("steps_to_solve")
        return min(r["accuracy"].values()), -(solve if solve is not None else float("inf")), -r["lr"]
    return max((r for r in runs if r["seed"] == 0), key=score)["lr"]


def sweep(plan: list[dict], best_seeds: list[int], done: dict, jobs: int, deadline: float | None, on_row):
    """Run `plan` (seed-0 runs) in `jobs` processes. Once every rate of a
    (length, cell) is done, its best rate's `best_seeds` go to the front of the
    queue, so a deadline cuts the sweep of the last lengths, not the seeds.
    No run starts after `deadline` (time.time()); runs already `done` are skipped."""
    def group(job):
        return job["seq_len"], job["attention"], job["optimizer"], job["steps"]

    swept = {}
    for job in plan:
        swept.setdefault(group(job), []).append(run_key(job))
    queue = list(plan)
    running, followed = {}, set()
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        while True:
            for g, keys in swept.items():  # groups whose sweep is complete: queue their seeds
                if g not in followed and all(k in done for k in keys):
                    followed.add(g)
                    lr = best_rate([done[k] for k in keys])
                    first = next(job for job in plan if group(job) == g)
                    queue[:0] = [{**first, "lr": lr, "seed": s} for s in best_seeds]
            queue = [job for job in queue if run_key(job) not in done]
            while queue and len(running) < jobs and (deadline is None or time.time() < deadline):
                job = queue.pop(0)
                running[pool.submit(run_job, job)] = job
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    row = future.result()
                except Exception as error:  # one failed run must not end the sweep
                    print(f"failed: {job}: {error!r}", file=sys.stderr, flush=True)
                    continue
                done[run_key(row)] = row
                on_row(row)


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
    parser.add_argument("--muon-lr", type=float, nargs="+", default=list(MUON_RATES))
    parser.add_argument("--adamw-lr", type=float, nargs="+", default=list(ADAMW_RATES))
    parser.add_argument("--optimizers", nargs="+", choices=("adamw", "muon"), default=["adamw", "muon"])
    parser.add_argument("--attentions", nargs="+", choices=("softmax", "parallax"), default=["softmax", "parallax"])
    parser.add_argument("--best-seeds", type=int, nargs="*", default=[1], help="seeds rerun at each best rate")
    parser.add_argument("--minutes", type=float, help="start no run after this many minutes")
    args = parser.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    out = args.out or Path(f"benchmarks/study/results/mqar_{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "mqar.jsonl"
    done = {run_key(row): row for row in map(json.loads, log.open())} if log.exists() else {}

    def on_row(row):
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)

    rates = {"muon": args.muon_lr, "adamw": args.adamw_lr}
    plan = [dict(attention=a, optimizer=o, lr=lr, seq_len=t, seed=0, vocab=args.vocab, steps=args.steps,
                 batch=args.batch, device=args.device)
            for t in args.seq_lens for a in args.attentions for o in args.optimizers for lr in rates[o]]
    deadline = None if args.minutes is None else time.time() + 60 * args.minutes
    sweep(plan, args.best_seeds, done, args.jobs, deadline, on_row)


if __name__ == "__main__":
    main()
