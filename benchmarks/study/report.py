"""Tables and plots of the study from its raw logs.

    python benchmarks/study/report.py --results benchmarks/study/results

Prints markdown tables (paste into RESULTS.md) and writes lm_curves.png,
correction.png and mqar.png next to the logs.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.study.mqar import SOLVED, best_rate  # noqa: E402

CELL_ORDER = ["softmax/adamw", "parallax/adamw", "softmax/muon", "parallax/muon", "softmax-matched/muon"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


def best_runs(runs):
    best = {}
    for row in runs:
        if row["seed"] == 0 and (row["cell"] not in best or row["val_bpb"] < best[row["cell"]]["val_bpb"]):
            best[row["cell"]] = row
    return best


def lm_tables(runs) -> str:
    best = best_runs(runs)
    lines = ["| cell | params | lr sweep (val bpb, seed 0) | best lr | val bpb over seeds (mean ± half-range, n) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for cell in CELL_ORDER:
        if cell not in best:
            continue
        sweep = sorted((r["lr"], r["val_bpb"]) for r in runs if r["cell"] == cell and r["seed"] == 0)
        seeds = [r["val_bpb"] for r in runs if r["cell"] == cell and r["lr"] == best[cell]["lr"]]
        spread = (max(seeds) - min(seeds)) / 2
        speed = statistics.median(r["tokens_per_s"] for r in runs if r["cell"] == cell)
        lines.append(
            f"| {cell} | {best[cell]['params']:,} | " + ", ".join(f"{lr:g}: {b:.4f}" for lr, b in sweep)
            + f" | {best[cell]['lr']:g} | {statistics.mean(seeds):.4f} ± {spread:.4f} ({len(seeds)}) | {speed:,.0f} |"
        )
    unigram = next(iter(best.values()))["unigram_bpb"] if best else float("nan")
    return "\n".join(lines) + f"\n\nUnigram baseline of the validation split: {unigram:.4f} bits per byte.\n"


def plot_lm(runs, results: Path, lm_dir: Path):
    best = best_runs(runs)
    fig, (ax_loss, ax_corr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for cell in CELL_ORDER:
        if cell not in best:
            continue
        log = read_jsonl(lm_dir / best[cell]["run"] / "log.jsonl")
        val = [(r["step"], r["val_bpb"]) for r in log if r.get("kind") == "val"]
        ax_loss.plot(*zip(*val), marker="o", label=f"{cell} (lr {best[cell]['lr']:g})")
        if best[cell]["correction"] and best[cell]["correction"][0]["ratios"]:
            steps = [c["step"] for c in best[cell]["correction"]]
            layers = zip(*[c["ratios"] for c in best[cell]["correction"]])
            for i, ratios in enumerate(layers):
                ax_corr.plot(steps, ratios, label=f"{cell} layer {i}", linestyle="-" if "muon" in cell else "--")
    ax_loss.set(xlabel="step", ylabel="validation bits per byte", title="Validation loss (best lr, seed 0)")
    ax_corr.set(xlabel="step", ylabel="||Cov_p(s2, v)|| / ||mu||", title="Parallax correction size per layer")
    for ax in (ax_loss, ax_corr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "lm_curves.png", dpi=120)


MQAR_LOGS = [  # (table title, log under --results, in the plot)
    ("MQAR learning-rate sweeps, CPU", "mqar_cpu/mqar.jsonl", True),
    ("MQAR learning-rate sweeps, GPU", "mqar_gpu/mqar.jsonl", True),
    ("MQAR, AdamW with a long budget", "mqar_gpu_long/mqar.jsonl", False),
]


def by_mqar_cell(rows) -> tuple[dict, list[int]]:
    """Runs grouped by (device, step budget, seq len, attention, optimizer), and the pair counts seen."""
    by = defaultdict(list)
    for r in rows:
        by[(r["device"], r["steps"], r["seq_len"], r["attention"], r["optimizer"])].append(r)
    return by, sorted({int(n) for r in rows for n in r["accuracy"]})


def mean_accuracies(runs, pair_counts) -> list[str]:
    """Mean accuracy per pair count over `runs` (blank where none has it)."""
    cells = []
    for n in pair_counts:
        accs = [r["accuracy"][str(n)] for r in runs if str(n) in r["accuracy"]]
        cells.append(f"{statistics.mean(accs):.3f}" if accs else "")
    return cells


def worst_pair_accuracy(runs) -> dict[float, float]:
    """Seed 0's lowest accuracy over the pair counts, per learning rate (ascending)."""
    return {r["lr"]: min(r["accuracy"].values()) for r in sorted(runs, key=lambda r: r["lr"]) if r["seed"] == 0}


def mqar_sweep_table(rows) -> str:
    """Per (device, budget, seq len, cell): the worst pair count's accuracy at
    each swept rate (seed 0), the best rate, its accuracies (mean over seeds)
    and steps to reach SOLVED per seed, and the rates at which every pair
    count reaches SOLVED."""
    by, pair_counts = by_mqar_cell(rows)
    lines = ["| device | budget | seq len | width | cell | worst-pair accuracy per lr (seed 0) | best lr | "
             + " | ".join(f"{n} pairs" for n in pair_counts) + " | steps to 0.99 (seeds at best) | rates solved |",
             "|---|---|---|---|---|---|---|" + "---|" * len(pair_counts) + "---|---|"]
    for (device, steps, seq_len, attention, optimizer), runs in sorted(by.items()):
        worst = worst_pair_accuracy(runs)
        if not worst:
            continue
        best_lr = best_rate(runs)
        at_best = sorted((r for r in runs if r["lr"] == best_lr), key=lambda r: r["seed"])
        solved = sum(acc >= SOLVED for acc in worst.values())
        per_lr = ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in worst.items())
        solve_steps = ", ".join(f"s{r['seed']}: {r['steps_to_solve'] or '-'}" for r in at_best)
        lines.append(f"| {device} | {steps} | {seq_len} | {runs[0]['width']} | {attention}/{optimizer} | {per_lr} | "
                     f"{best_lr:g} | " + " | ".join(mean_accuracies(at_best, pair_counts))
                     + f" | {solve_steps} | {solved}/{len(worst)} |")
    return "\n".join(lines) + "\n"


def plot_mqar(rows, path: Path):
    """Worst-pair accuracy against the learning rate (seed 0), one panel per (device, budget, length)."""
    by, _ = by_mqar_cell(rows)
    settings = sorted({key[:3] for key in by})
    cells = sorted({key[3:] for key in by})  # one colour per cell in every panel
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for (*key, attention, optimizer), runs in sorted(by.items()):
            worst = worst_pair_accuracy(runs)
            if tuple(key) == setting and worst:
                ax.plot(list(worst), list(worst.values()), marker="o", label=f"{attention}/{optimizer}",
                        color=f"C{cells.index((attention, optimizer))}",
                        linestyle="-" if optimizer == "muon" else "--")
        device, steps, seq_len = setting
        ax.set(xscale="log", xlabel="learning rate (hidden matrices)", ylim=(0, 1.05),
               title=f"T={seq_len}, {steps} steps, {device}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("worst-pair accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/study/results"))
    args = parser.parse_args(argv)
    runs = read_jsonl(args.results / "lm" / "runs.jsonl")
    if runs:
        print("## Language modelling\n\n" + lm_tables(runs))
        plot_lm(runs, args.results, args.results / "lm")
    sweeps = []
    for title, log, plotted in MQAR_LOGS:
        rows = read_jsonl(args.results / log)
        if rows:
            print(f"## {title}\n\n" + mqar_sweep_table(rows))
            sweeps += rows if plotted else []
    if sweeps:
        plot_mqar(sweeps, args.results / "mqar.png")


if __name__ == "__main__":
    main()
