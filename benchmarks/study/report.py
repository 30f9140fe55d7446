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


def by_mqar_cell(rows) -> tuple[dict, list[int]]:
    """Runs grouped by (steps, seq len, attention, optimizer), and the pair counts seen."""
    by = defaultdict(list)
    for r in rows:
        by[(r["steps"], r["seq_len"], r["attention"], r["optimizer"])].append(r)
    return by, sorted({int(n) for r in rows for n in r["accuracy"]})


def mean_accuracies(runs, pair_counts) -> list[str]:
    """Mean accuracy per pair count over `runs` (blank where none has it)."""
    cells = []
    for n in pair_counts:
        accs = [r["accuracy"][str(n)] for r in runs if str(n) in r["accuracy"]]
        cells.append(f"{statistics.mean(accs):.3f}" if accs else "")
    return cells


def mqar_table(rows) -> str:
    if not rows:
        return ""
    by, pair_counts = by_mqar_cell(rows)
    lines = ["| steps | seq len | cell | " + " | ".join(f"{n} pairs" for n in pair_counts) + " |",
             "|---|---|---|" + "---|" * len(pair_counts)]
    for (steps, seq_len, attention, optimizer), runs in sorted(by.items()):
        lines.append(f"| {steps} | {seq_len} | {attention}/{optimizer} | "
                     + " | ".join(mean_accuracies(runs, pair_counts)) + " |")
    return "\n".join(lines) + "\n"


SOLVED = 0.99  # accuracy at every pair count


def worst_pair_accuracy(runs) -> dict[float, float]:
    """Seed 0's lowest accuracy over the pair counts, per learning rate (ascending)."""
    return {r["lr"]: min(r["accuracy"].values()) for r in sorted(runs, key=lambda r: r["lr"]) if r["seed"] == 0}


def best_rate(runs) -> float:
    """The swept rate with the best worst-pair accuracy; ties go to the lowest."""
    worst = worst_pair_accuracy(runs)
    return max(worst, key=worst.get)


def best_sweep_rate(log: str, attention: str, optimizer: str) -> float:
    """`best_rate` of one cell of a sweep log (for run_all.sh)."""
    return best_rate([r for r in read_jsonl(Path(log)) if (r["attention"], r["optimizer"]) == (attention, optimizer)])


def mqar_sweep_table(rows) -> str:
    """Per (steps, seq len, cell): the worst pair count's accuracy at each swept
    rate (seed 0), the best rate, its accuracies over all seeds, and the
    fraction of rates at which every pair count reaches SOLVED."""
    by, pair_counts = by_mqar_cell(rows)
    lines = ["| steps | seq len | cell | worst-pair accuracy per lr (seed 0) | best lr | seeds at best | "
             + " | ".join(f"{n} pairs" for n in pair_counts) + " | rates solved |",
             "|---|---|---|---|---|---|" + "---|" * len(pair_counts) + "---|"]
    for (steps, seq_len, attention, optimizer), runs in sorted(by.items()):
        worst = worst_pair_accuracy(runs)
        if not worst:
            continue
        best_lr = best_rate(runs)
        at_best = [r for r in runs if r["lr"] == best_lr]
        solved = sum(acc >= SOLVED for acc in worst.values())
        per_lr = ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in worst.items())
        seeds = ", ".join(str(r["seed"]) for r in at_best)
        lines.append(f"| {steps} | {seq_len} | {attention}/{optimizer} | {per_lr} | {best_lr:g} | {seeds} | "
                     + " | ".join(mean_accuracies(at_best, pair_counts)) + f" | {solved}/{len(worst)} |")
    return "\n".join(lines) + "\n"


def plot_mqar(rows, results: Path):
    if not rows:
        return
    settings = sorted({(r["steps"], r["seq_len"]) for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, (steps, seq_len) in zip(axes[0], settings):
        for attention in ("softmax", "parallax"):
            for optimizer in ("adamw", "muon"):
                runs = [r for r in rows if (r["steps"], r["seq_len"], r["attention"], r["optimizer"])
                        == (steps, seq_len, attention, optimizer)]
                if not runs:
                    continue
                counts = sorted(int(n) for n in runs[0]["accuracy"])
                acc = [statistics.mean(r["accuracy"][str(n)] for r in runs) for n in counts]
                ax.plot(counts, acc, marker="o", label=f"{attention}/{optimizer}",
                        linestyle="-" if optimizer == "muon" else "--")
        counts = sorted({int(n) for r in rows if (r["steps"], r["seq_len"]) == (steps, seq_len) for n in r["accuracy"]})
        ax.set(xscale="log", xlabel="key-value pairs", ylabel="accuracy", ylim=(0, 1.05),
               title=f"MQAR, sequence length {seq_len}, {steps} steps")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "mqar.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/study/results"))
    args = parser.parse_args(argv)
    runs = read_jsonl(args.results / "lm" / "runs.jsonl")
    mqar = read_jsonl(args.results / "mqar.jsonl")
    sweep = read_jsonl(args.results / "mqar_sweep" / "mqar.jsonl")
    if runs:
        print("## Language modelling\n\n" + lm_tables(runs))
        plot_lm(runs, args.results, args.results / "lm")
    if mqar:
        print("## Associative recall (MQAR)\n\n" + mqar_table(mqar))
        plot_mqar(mqar, args.results)
    if sweep:
        print("## Associative recall, learning-rate sweeps\n\n" + mqar_sweep_table(sweep))


if __name__ == "__main__":
    main()
