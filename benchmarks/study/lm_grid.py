"""Language-modelling 2x2: {softmax, Parallax} x {AdamW, Muon}, plus a
parameter-matched softmax model under Muon. Same data, tokens and schedule
for every cell; each cell sweeps the hidden-matrix learning rate (seed 0),
widening the sweep until its best value is interior, then reruns its best
value with more seeds.

    python -m benchmarks.study.lm_grid                 # CPU size, into results/lm
    python -m benchmarks.study.lm_grid --scale gpu --out benchmarks/study/results/lm_gpu --data DIR

Writes runs.jsonl (one line a run, with the per-layer correction ratio
||Cov_p(s2, v)|| / ||mu|| at every evaluation), and each run's train.py
outputs under OUT/<run>/.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path

CELLS = {
    "softmax/adamw": dict(attention="softmax", optimizer="adamw"),
    "parallax/adamw": dict(attention="parallax", optimizer="adamw"),
    "softmax/muon": dict(attention="softmax", optimizer="muon"),
    "parallax/muon": dict(attention="parallax", optimizer="muon"),
    "softmax-matched/muon": dict(attention="softmax", optimizer="muon", parameter_matched=True),
}
# Where each cell's sweep starts; it grows by factors of 2 until its best rate is interior.
LEARNING_RATES = {"adamw": (7.5e-4, 1.5e-3, 3e-3, 6e-3), "muon": (0.0075, 0.015, 0.03, 0.06)}
# --scale: the CPU size is the 2-core development machine's (410k tokens a
# run); the GPU size trains the 20m preset on 262M tokens a run (pass --data:
# the default corpus would be repeated many times).
SCALES = {
    "cpu": dict(model="small", steps=200, batch_size=16, seq_len=128, jobs=2),
    "gpu": dict(model="20m", steps=8000, batch_size=32, seq_len=1024, jobs=1),
}
MAX_RATE_RANGE = 64  # widest sweep (highest / lowest rate) before it stops growing


def edge_step(rates: list[float], best: float) -> float | None:
    """The next rate to try when `best` is the lowest or highest of `rates`, else None."""
    if max(rates) / min(rates) >= MAX_RATE_RANGE:
        return None
    if best == min(rates):
        return best / 2
    if best == max(rates):
        return best * 2
    return None


def run_one(job: dict) -> dict:
    """One training run in its own process (so runs can share the machine)."""
    import torch

    from benchmarks.study.correction import correction_ratios
    from parallax.train import TrainConfig, load_dataset, train

    torch.set_num_threads(job.pop("threads"))
    name, cell = job.pop("name"), job.pop("cell")
    val = load_dataset(job["data"]).val.shards[0]
    probe = torch.from_numpy(val[: 8 * job["seq_len"]].astype("int64")).view(8, job["seq_len"])
    ratios = []

    def eval_hook(step, model):
        ratios.append({"step": step, "ratios": correction_ratios(model, probe)})

    cfg = TrainConfig(**CELLS[cell], **job, progress=False, sample_tokens=0)
    with open(Path(cfg.out) / "stdout.txt", "w") as stdout:
        summary = train(cfg, eval_hook=eval_hook, stdout=stdout)
    return {"run": name, "cell": cell, "lr": cfg.lr, "seed": cfg.seed, **summary, "correction": ratios}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/study/results/lm"))
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                        help="defaults for the options below: " + json.dumps(SCALES))
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--jobs", type=int, help="runs at once (one thread each when > 1)")
    parser.add_argument("--data", help="train.py's --data (default: the standard library's sources)")
    parser.add_argument("--extra-seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {json.loads(line)["run"]: json.loads(line) for line in log.open()} if log.exists() else {}

    def jobs_for(plan):
        todo = []
        for cell, lr, seed in plan:
            name = f"{cell.replace('/', '_')}_lr{lr:g}_s{seed}"
            if name in done:
                continue
            out = args.out / name
            out.mkdir(parents=True, exist_ok=True)
            todo.append(dict(name=name, cell=cell, lr=lr, seed=seed, model=args.model, steps=args.steps,
                             batch_size=args.batch_size, seq_len=args.seq_len, eval_every=max(1, args.steps // 5),
                             eval_batches=8, data=args.data, out=str(out),
                             threads=1 if args.jobs > 1 else 2))
        return todo

    def run(todo):
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for row in pool.imap_unordered(run_one, todo):
                done[row["run"]] = row
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{row['run']}: val_bpb={row['val_bpb']:.4f}", flush=True)

    rates = {cell: list(LEARNING_RATES[spec["optimizer"]]) for cell, spec in CELLS.items()}
    while True:  # widen each cell's sweep by a factor 2 past whichever end is best
        run(jobs_for([(cell, lr, 0) for cell, lrs in rates.items() for lr in lrs]))
        best = {cell: min((row for row in done.values() if row["cell"] == cell and row["seed"] == 0
                           and row["lr"] in lrs), key=lambda row: row["val_bpb"])
                for cell, lrs in rates.items()}
        edges = {cell: edge_step(lrs, best[cell]["lr"]) for cell, lrs in rates.items()}
        if not any(edges.values()):
            break
        for cell, new in edges.items():
            if new:
                rates[cell] = sorted(rates[cell] + [new])
    run(jobs_for([(cell, row["lr"], seed) for cell, row in best.items() for seed in args.extra_seeds]))


if __name__ == "__main__":
    main()
