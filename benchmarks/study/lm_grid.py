"""Language-modelling 2x2: {softmax, Parallax} x {AdamW, Muon}, plus a
parameter-matched softmax model under Muon. Same data, tokens and schedule
for every cell; each cell sweeps the hidden-matrix learning rate over three
values (seed 0), then reruns its best value with more seeds.

    python benchmarks/study/lm_grid.py --out benchmarks/study/results/lm

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
# Each sweep reaches one step below the first three values tried, because
# a best value sat at the bottom of them.
LEARNING_RATES = {"adamw": (7.5e-4, 1.5e-3, 3e-3, 6e-3), "muon": (0.0075, 0.015, 0.03, 0.06)}


def run_one(job: dict) -> dict:
    """One training run in its own process (so runs can share the machine)."""
    import torch

    from benchmarks.study.correction import correction_ratios
    from parallax.train import TrainConfig, load_dataset, train

    torch.set_num_threads(job.pop("threads"))
    name, cell = job.pop("name"), job.pop("cell")
    val = load_dataset(None).val.shards[0]
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
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--extra-seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each when > 1)")
    args = parser.parse_args(argv)
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
                             eval_batches=8,
                             out=str(out), threads=1 if args.jobs > 1 else 2))
        return todo

    def run(todo):
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for row in pool.imap_unordered(run_one, todo):
                done[row["run"]] = row
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{row['run']}: val_bpb={row['val_bpb']:.4f}", flush=True)

    sweep = [(cell, lr, 0) for cell, spec in CELLS.items() for lr in LEARNING_RATES[spec["optimizer"]]]
    run(jobs_for(sweep))
    best = {}
    for row in done.values():
        if row["seed"] == 0 and (row["cell"] not in best or row["val_bpb"] < best[row["cell"]]["val_bpb"]):
            best[row["cell"]] = row
    run(jobs_for([(cell, row["lr"], seed) for cell, row in best.items() for seed in args.extra_seeds]))


if __name__ == "__main__":
    main()
