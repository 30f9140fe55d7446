"""Language-modelling grid at a real training budget: {softmax, Parallax} x
{AdamW, Muon} plus a parameter-matched softmax model under Muon, at several
model sizes, every run trained on TOKENS_PER_PARAM tokens per parameter.

    python -m benchmarks.study.lm_grid                          # CPU: small-48, small-80, small
    python -m benchmarks.study.lm_grid --sizes small-48 --budget-min 60
    python -m benchmarks.study.lm_grid --scale gpu --data FILE  # the 20m grid

Each (size, cell, weight decay) is one learning-rate sweep of the hidden
matrices (`lr`): seed 0 at the starting rates, then, while the best rate is
the lowest or highest run, the next rate a factor 2 past it (up to a 64x
range), then seeds 1 and 2 at the best rate. What runs next is a function of
the log alone (`pending`), so the grid fills over any number of sittings:
finished runs are appended to OUT/runs.jsonl as they end and never rerun; a
run stopped by --budget-min (or Ctrl-C) checkpoints and resumes from there.

Optimizer policy, the same for every cell: embeddings, lm_head and gains use
AdamW at EMBED_LR without weight decay; the hidden matrices use Muon or AdamW
at the swept rate; AdamW sweeps weight decay 0 and 0.1 on the hidden matrices
(Muon runs without); one WSD schedule (5% warmup, linear decay over the last
30%), batch and clip for all.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.study.sweep import next_runs, run_pending
from parallax.train.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME

CELLS = {
    "softmax/adamw": dict(attention="softmax", optimizer="adamw"),
    "parallax/adamw": dict(attention="parallax", optimizer="adamw"),
    "softmax/muon": dict(attention="softmax", optimizer="muon"),
    "parallax/muon": dict(attention="parallax", optimizer="muon"),
    "softmax-matched/muon": dict(attention="softmax", optimizer="muon", parameter_matched=True),
}
WEIGHT_DECAYS = {"adamw": (0.1, 0.0), "muon": (0.0,)}
START_RATES = {"adamw": (7.5e-4, 1.5e-3, 3e-3, 6e-3), "muon": (0.0075, 0.015, 0.03, 0.06)}
SEEDS = (0, 1, 2)  # seed 0 sweeps; the others repeat the best rate
MAX_RATE_RANGE = 64  # widest sweep (highest / lowest rate) before it stops growing
TOKENS_PER_PARAM = 20
EMBED_LR = 3e-3
WARMUP_FRACTION = 0.05
EVALS = 5  # evaluations per run, evenly spaced
# --scale: the CPU ladder spans 6.5x in parameters (145K-935K with bytes); the
# GPU size is the 20m preset (19.4M: 388M tokens a run; pass --data, the
# default corpus would be repeated 33 times). eval_tokens: fixed validation
# bytes scored at each evaluation.
SCALES = {
    "cpu": dict(sizes=("small-48", "small-80", "small"), batch_size=16, seq_len=128, eval_tokens=65_536,
                device="cpu"),
    "gpu": dict(sizes=("20m",), batch_size=32, seq_len=1024, eval_tokens=1_048_576, device="cuda"),
}


@dataclasses.dataclass(frozen=True)
class Sweep:
    size: str
    cell: str
    weight_decay: float

    @property
    def optimizer(self) -> str:
        return CELLS[self.cell]["optimizer"]

    @property
    def prefix(self) -> str:
        return f"{self.size}_{self.cell.replace('/', '_')}_wd{self.weight_decay:g}_lr"

    def run_name(self, lr: float, seed: int) -> str:
        return f"{self.prefix}{lr:g}_s{seed}"

    def owns(self, row: dict) -> bool:
        return (row.get("size"), row["cell"], row.get("weight_decay")) == (self.size, self.cell, self.weight_decay)


def sweeps_for(sizes, cells) -> list[Sweep]:
    """In running order: size by size; within a size the four cells at each
    optimizer's first weight decay, then AdamW without weight decay, then the
    parameter-matched control."""
    def rank(sweep):
        decays = WEIGHT_DECAYS[sweep.optimizer]
        return CELLS[sweep.cell].get("parameter_matched", False), decays.index(sweep.weight_decay)

    return [sweep for size in sizes for sweep in sorted(
        (Sweep(size, cell, wd) for cell in cells for wd in WEIGHT_DECAYS[CELLS[cell]["optimizer"]]), key=rank)]


def bpb(row: dict) -> float:
    """A run's final validation bits per byte; a diverged run counts as infinitely bad."""
    return row["val_bpb"] if row.get("val_bpb") is not None else math.inf


def pending(sweep: Sweep, rows: list[dict], running=frozenset()) -> list[tuple[float, int]]:
    """The (lr, seed) runs `sweep` can start now, given the logged `rows` and the
    names of the runs in flight (a sweep with a run in flight starts only its
    missing starting rates: what comes after depends on that run)."""
    mine = [r for r in rows if sweep.owns(r)]
    scores = {r["lr"]: bpb(r) for r in mine if r["seed"] == 0}
    if any(name.startswith(sweep.prefix) for name in running):
        return [(lr, 0) for lr in START_RATES[sweep.optimizer]
                if lr not in scores and sweep.run_name(lr, 0) not in running]
    return next_runs(START_RATES[sweep.optimizer], scores, lambda lr: {r["seed"] for r in mine if r["lr"] == lr},
                     SEEDS, MAX_RATE_RANGE)


def budget_params(size: str, vocab_size: int) -> int:
    """The parameter count that sets the token budget at `size`: the Parallax
    model's (the parameter-matched softmax has the same, plain softmax 6-7% fewer)."""
    from parallax.models import count_parameters, preset

    return count_parameters(preset(size, vocab_size=vocab_size, attention="parallax"))


def git_commit() -> str | None:
    """The code a run ran on ('-dirty': with uncommitted changes)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def train_one(job: dict) -> dict | None:
    """One run (in a child process): its log row, or None when a stop signal
    ended it after a checkpoint (the next sitting resumes it)."""
    import torch

    from benchmarks.study.correction import correction_ratios
    from parallax.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, load_dataset, train

    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    probe_rows = load_dataset(job["data"]).val.shards[0][: 8 * job["seq_len"]].astype("int64")
    probe = torch.from_numpy(probe_rows).view(8, job["seq_len"])
    corrections = out / "correction.jsonl"

    def eval_hook(step, model):
        with corrections.open("a") as f:
            f.write(json.dumps({"step": step, "ratios": correction_ratios(model, probe)}) + "\n")

    cfg = TrainConfig(**CELLS[job["cell"]], model=job["size"], lr=job["lr"], embed_lr=EMBED_LR,
                      weight_decay=job["weight_decay"], seed=job["seed"], steps=job["steps"], warmup=job["warmup"],
                      batch_size=job["batch_size"], seq_len=job["seq_len"], eval_every=job["eval_every"],
                      eval_batches=job["eval_batches"], data=job["data"], device=job["device"],
                      threads=job["threads"], out=str(out), resume=True, progress=False, sample_tokens=0)
    try:
        with (out / "stdout.txt").open("a") as stdout:
            summary = train(cfg, eval_hook=eval_hook, stdout=stdout)
    except TrainingInterrupted:
        return None
    except NonFiniteLossError as error:
        summary = {"status": "diverged", "val_bpb": None, "error": str(error)}
    by_step = {}
    if corrections.exists():
        for line in corrections.open():
            entry = json.loads(line)
            by_step[entry["step"]] = entry["ratios"]  # a resumed run re-evaluates: the last wins
    on_gpu = job["device"].startswith("cuda")
    row = {key: job[key] for key in ("run", "size", "cell", "weight_decay", "lr", "seed", "steps", "warmup",
                                     "batch_size", "seq_len", "eval_batches", "threads")}
    row.update({k: v for k, v in summary.items() if k not in ("out", "world_size", "steps")})
    row.update(embed_lr=EMBED_LR, tokens_per_param=job["tokens_per_param"], device="cuda" if on_gpu else "cpu",
               precision="bf16 autocast" if on_gpu else "float32", torch=torch.__version__, commit=git_commit(),
               finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               correction=[{"step": s, "ratios": r} for s, r in sorted(by_step.items())])
    return row


def cost_table(sizes, cells, batch_size: int, seq_len: int, tokens_per_param: float, eval_tokens: int,
               vocab: int = 256, steps: int = 3) -> str:
    """Markdown: per size and cell, the tokens a run trains, the training rate
    per CPU-second (one thread, `steps` timed steps after one warm-up, random
    bytes) and the CPU-hours of the grid's smallest plan (4 rates + 2 more seeds
    per sweep; evaluations counted as a third of a training token each)."""
    import torch

    from parallax.train import TrainConfig, build_optimizer
    from parallax.train.loop import build_model

    torch.set_num_threads(1)
    lines = ["| size | cell | params | tokens a run | steps | tokens / CPU-s | runs (at least) | CPU-hours |",
             "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for size in sizes:
        tokens = tokens_per_param * budget_params(size, vocab)
        for cell in cells:
            cfg = TrainConfig(**CELLS[cell], model=size).resolved()
            model = build_model(cfg, vocab)
            optimizer = build_optimizer(model, cfg)
            x = torch.randint(0, vocab, (batch_size, seq_len + 1))
            for step in range(steps + 1):
                if step == 1:
                    start = time.process_time()
                _, loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            rate = steps * batch_size * seq_len / (time.process_time() - start)
            runs = len(WEIGHT_DECAYS[CELLS[cell]["optimizer"]]) * (len(START_RATES["adamw"]) + len(SEEDS) - 1)
            hours = runs * (tokens + EVALS * eval_tokens / 3) / rate / 3600
            total += hours
            lines.append(f"| {size} | {cell} | {model.num_parameters():,} | {tokens:,.0f} | "
                         f"{math.ceil(tokens / (batch_size * seq_len)):,} | {rate:,.0f} | {runs} | {hours:.1f} |")
    return "\n".join(lines) + f"\n| all | | | | | | | {total:.0f} |\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                        help="defaults for the options below: " + json.dumps(SCALES))
    parser.add_argument("--out", type=Path, help="folder of runs.jsonl and the runs (default: results/lm, results/lm_gpu)")
    parser.add_argument("--sizes", nargs="+", help="model presets, in running order")
    parser.add_argument("--cells", nargs="+", choices=tuple(CELLS), default=list(CELLS))
    parser.add_argument("--tokens-per-param", type=float, default=TOKENS_PER_PARAM)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--eval-tokens", type=int)
    parser.add_argument("--device")
    parser.add_argument("--data", help="train.py's --data (default: the Python standard library's sources)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: CPU cores / jobs)")
    parser.add_argument("--budget-min", type=float, help="stop (checkpointing runs in flight) after this many minutes")
    parser.add_argument("--deadline", type=float, help="the same as an absolute time.time() (run_all.sh's shared budget)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs that would start next, run nothing")
    parser.add_argument("--estimate", action="store_true", help="time each cell and print the grid's CPU cost")
    args = parser.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scale == "gpu" and args.data is None and not args.dry_run:
        parser.error("--scale gpu needs --data (a corpus of a few hundred MB; see RESULTS.md)")
    out = args.out or Path("benchmarks/study/results") / ("lm" if args.scale == "cpu" else "lm_gpu")
    deadline = args.deadline
    if args.budget_min is not None:
        deadline = min(deadline or math.inf, time.time() + 60 * args.budget_min)
    if args.estimate:
        print(cost_table(args.sizes, args.cells, args.batch_size, args.seq_len, args.tokens_per_param,
                         args.eval_tokens))
        return 0
    sweeps = sweeps_for(args.sizes, args.cells)
    log = out / "runs.jsonl"
    rows = [json.loads(line) for line in log.open()] if log.exists() else []
    if args.dry_run:
        for sweep in sweeps:
            for lr, seed in pending(sweep, rows):
                print(sweep.run_name(lr, seed))
        return 0
    out.mkdir(parents=True, exist_ok=True)

    from parallax.train import load_dataset

    vocab = load_dataset(args.data).vocab_size
    tokens_per_step = args.batch_size * args.seq_len
    threads = args.threads or max(1, (os.cpu_count() if args.device == "cpu" else 1) // args.jobs)

    def make_job(sweep: Sweep, lr: float, seed: int) -> dict:
        steps = math.ceil(args.tokens_per_param * budget_params(sweep.size, vocab) / tokens_per_step)
        return dict(run=sweep.run_name(lr, seed), size=sweep.size, cell=sweep.cell, weight_decay=sweep.weight_decay,
                    lr=lr, seed=seed, steps=steps, warmup=max(1, round(WARMUP_FRACTION * steps)),
                    eval_every=max(1, steps // EVALS), batch_size=args.batch_size, seq_len=args.seq_len,
                    eval_batches=max(1, args.eval_tokens // tokens_per_step), data=args.data, device=args.device,
                    threads=threads, tokens_per_param=args.tokens_per_param, out=str(out / sweep.run_name(lr, seed)))

    def plan(busy):
        return [(sweep.run_name(lr, seed), make_job(sweep, lr, seed))
                for sweep in sweeps for lr, seed in pending(sweep, rows, busy)]

    def on_row(name, row):
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for checkpoint in (CHECKPOINT_NAME, PREVIOUS_NAME):  # logged: never resumed again
            (out / name / checkpoint).unlink(missing_ok=True)
        print(f"{name}: val_bpb={row['val_bpb']} ({row['status']})", flush=True)

    return 1 if run_pending(plan, train_one, args.jobs, deadline, on_row) else 0


if __name__ == "__main__":
    sys.exit(main())
