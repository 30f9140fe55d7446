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
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

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


def edge_step(rates, best: float) -> float | None:
    """The next rate to try when `best` is the lowest or highest of `rates`, else None."""
    if max(rates) / min(rates) >= MAX_RATE_RANGE:
        return None
    if best == min(rates):
        return best / 2
    if best == max(rates):
        return best * 2
    return None


def bpb(row: dict) -> float:
    """A run's final validation bits per byte; a diverged run counts as infinitely bad."""
    return row["val_bpb"] if row.get("val_bpb") is not None else math.inf


def pending(sweep: Sweep, rows: list[dict], running=frozenset()) -> list[tuple[float, int]]:
    """The (lr, seed) runs `sweep` can start now, given the logged `rows` and the
    names of the runs in flight: its missing starting rates first; once those
    are logged, one widening rate or the remaining seeds at the best rate.
    Empty when the sweep is complete or waits on a run in flight."""
    mine = [r for r in rows if sweep.owns(r)]
    seed0 = {r["lr"]: bpb(r) for r in mine if r["seed"] == 0}
    missing = [(lr, 0) for lr in START_RATES[sweep.optimizer] if lr not in seed0]
    if missing or any(name.startswith(sweep.prefix) for name in running):
        return [job for job in missing if sweep.run_name(*job) not in running]
    best = min(sorted(seed0), key=lambda lr: seed0[lr])
    wider = edge_step(sorted(seed0), best)
    if wider is not None:
        return [(wider, 0)]
    seeded = {r["seed"] for r in mine if r["lr"] == best}
    return [(best, seed) for seed in SEEDS if seed not in seeded]


def budget_params(size: str, vocab_size: int) -> int:
    """The parameter count that sets the token budget at `size`: the Parallax
    model's (the parameter-matched softmax has the same, plain softmax 6-7% fewer)."""
    from parallax.models import count_parameters, preset

    return count_parameters(preset(size, vocab_size=vocab_size, attention="parallax"))


def git_commit() -> str | None:
    """The code a run ran on ('-dirty': with uncommitted changes)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def train_one(job: dict, conn) -> None:
    """One run in a child process. Sends its log row, None when a stop signal
    ended it (it checkpointed; the next sitting resumes it), or the error text
    when it could not run."""
    try:
        conn.send(_train(job))
    except Exception as error:  # noqa: BLE001 - reported by the parent, which goes on with other runs
        conn.send(f"{type(error).__name__}: {error}")


def _train(job: dict) -> dict | None:
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


def run_grid(sweeps: list[Sweep], log: Path, jobs: int, deadline: float | None, make_job, on_row) -> list[str]:
    """Run pending runs, `jobs` at a time, until every sweep is complete or
    `deadline` (time.time()) passes; runs in flight then checkpoint and stop.
    make_job(sweep, lr, seed) -> the job dict of a run. Returns the runs that failed."""
    rows = [json.loads(line) for line in log.open()] if log.exists() else []
    running: dict[str, tuple] = {}  # run name -> (process, parent end of its pipe)
    failed: list[str] = []
    ctx = mp.get_context("spawn")
    stopped: set[str] = set()
    try:
        while True:
            if deadline is not None and time.time() >= deadline:
                for name in set(running) - stopped:
                    running[name][0].terminate()  # one SIGTERM: the run checkpoints at the end of its step
                    stopped.add(name)
            else:  # a failed run counts as in flight: its sweep waits for the next sitting
                for sweep in sweeps:
                    for lr, seed in pending(sweep, rows, set(running) | set(failed)):
                        name = sweep.run_name(lr, seed)
                        if len(running) >= jobs:
                            break
                        parent, child = ctx.Pipe(duplex=False)
                        process = ctx.Process(target=train_one, args=(make_job(sweep, lr, seed), child), name=name)
                        process.start()
                        child.close()
                        running[name] = (process, parent)
            if not running:
                return failed
            time.sleep(1.0)
            for name, (process, parent) in list(running.items()):
                if not parent.poll() and process.is_alive():
                    continue
                try:
                    row = parent.recv()
                except EOFError:  # died without a word (killed)
                    row = "the process died"
                process.join()
                del running[name]
                if isinstance(row, str):
                    failed.append(name)
                    print(f"{name} failed: {row}", file=sys.stderr, flush=True)
                elif row is not None:
                    rows.append(row)
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    for checkpoint in (CHECKPOINT_NAME, PREVIOUS_NAME):  # logged: never resumed again
                        (log.parent / name / checkpoint).unlink(missing_ok=True)
                    on_row(row)
    except KeyboardInterrupt:  # the runs got the same SIGINT: they checkpoint and end
        for process, _ in running.values():
            process.join()
        raise
    finally:
        for process, _ in running.values():
            if process.is_alive():
                process.terminate()
                process.join()


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
    args = parser.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scale == "gpu" and args.data is None and not args.dry_run:
        parser.error("--scale gpu needs --data (a corpus of a few hundred MB; see RESULTS.md)")
    out = args.out or Path("benchmarks/study/results") / ("lm" if args.scale == "cpu" else "lm_gpu")
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline
    if args.budget_min is not None:
        deadline = min(deadline or math.inf, time.time() + 60 * args.budget_min)
    sweeps = sweeps_for(args.sizes, args.cells)
    log = out / "runs.jsonl"
    if args.dry_run:
        rows = [json.loads(line) for line in log.open()] if log.exists() else []
        for sweep in sweeps:
            for lr, seed in pending(sweep, rows):
                print(sweep.run_name(lr, seed))
        return

    from parallax.train import load_dataset

    vocab = load_dataset(args.data).vocab_size
    tokens_per_step = args.batch_size * args.seq_len
    threads = args.threads or max(1, (mp.cpu_count() if args.device == "cpu" else 1) // args.jobs)

    def make_job(sweep: Sweep, lr: float, seed: int) -> dict:
        steps = math.ceil(args.tokens_per_param * budget_params(sweep.size, vocab) / tokens_per_step)
        return dict(run=sweep.run_name(lr, seed), size=sweep.size, cell=sweep.cell, weight_decay=sweep.weight_decay,
                    lr=lr, seed=seed, steps=steps, warmup=max(1, round(WARMUP_FRACTION * steps)),
                    eval_every=max(1, steps // EVALS), batch_size=args.batch_size, seq_len=args.seq_len,
                    eval_batches=max(1, args.eval_tokens // tokens_per_step), data=args.data, device=args.device,
                    threads=threads, tokens_per_param=args.tokens_per_param, out=str(out / sweep.run_name(lr, seed)))

    def on_row(row):
        print(f"{row['run']}: val_bpb={row['val_bpb']} ({row['status']})", flush=True)

    failed = run_grid(sweeps, log, args.jobs, deadline, make_job, on_row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
