"""Every table of the study, and the verdict of every claim, from the raw logs.

    python -m benchmarks.study.report                       # print the tables (results/tables.md)
    python -m benchmarks.study.report --update benchmarks/study/RESULTS.md

--update also replaces each block between `<!-- report:NAME -->` and
`<!-- /report:NAME -->` in the file with the table NAME, so the tables in
RESULTS.md are the generated ones byte for byte. Also writes lm_curves.png and
mqar.png next to the logs.

Verdict rule (VERDICT_RULE below, applied by `verdict`): a claim compares cells
at their best rates (seed 0 picks the rate). It "holds" when every compared
cell's best rate is interior to its sweep, every compared cell has >= 2 seeds
at that rate, and the claimed difference exceeds the spread: the sum over the
compared cells of their seed ranges (max - min). "reverse holds" when the same
test passes with the opposite sign; "open" otherwise, with the reasons.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.study import lm_grid  # noqa: E402
from benchmarks.study.mqar import SOLVED, best_rate, embed_lr_of, sweep_key  # noqa: E402
from benchmarks.study.sweep import best_rate as best_rate_of  # noqa: E402
from benchmarks.study.sweep import interior  # noqa: E402

VERDICT_RULE = (
    "A claim compares cells, each at its best learning rate (picked by seed 0). It **holds** when (1) every "
    "compared cell's best rate is interior to its sweep (neither its lowest nor its highest rate), (2) every "
    "compared cell has at least 2 seeds at that rate, and (3) the claimed difference of the seed means exceeds "
    "the spread, the sum of the compared cells' seed ranges (max - min). A claim that a cell reaches (or stays "
    "below) 0.99 compares it with that fixed threshold. **reverse holds**: the same test passes with the "
    "opposite sign. **open**: anything else; the reasons are listed.")
LM_CELLS = list(lm_grid.CELLS)
MQAR_CELLS = ["softmax/adamw", "parallax/adamw", "softmax/muon", "parallax/muon", "softmax-matched/adamw",
              "softmax-matched/muon"]
BYTES = 256  # the grids' vocabulary
MQAR_LOGS = {"mqar-cpu": "mqar_cpu/mqar.jsonl", "mqar-gpu": "mqar_gpu/mqar.jsonl",
             "mqar-gpu-long": "mqar_gpu_long/mqar.jsonl"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


def fmt(value: float, digits: int = 4) -> str:
    return "diverged" if value is None or math.isinf(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------- the rule

@dataclass
class CellStat:
    """One cell of a claim: its best rate and the values of its seeds there."""
    name: str
    best_lr: float
    interior: bool
    values: list[float]  # one per seed at best_lr, seed order

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def spread(self) -> float:
        return max(self.values) - min(self.values)


def verdict(difference: float, cells: list[CellStat]) -> tuple[str, list[str]]:
    """Apply VERDICT_RULE to `difference` (positive: the claim's direction) over `cells`."""
    reasons = [f"{c.name}: best rate {c.best_lr:g} at the edge of its sweep" for c in cells if not c.interior]
    reasons += [f"{c.name}: {len(c.values)} seed" for c in cells if len(c.values) < 2]
    spread = sum(c.spread for c in cells)
    if math.isnan(difference) or abs(difference) <= spread:
        reasons.append(f"difference {difference:+.4g} within the spread {spread:.4g}")
    if reasons:
        return "open", reasons
    return ("holds" if difference > 0 else "reverse holds"), []


# ---------------------------------------------------------------- language modelling

def lm_sweeps(rows) -> dict[tuple, list[dict]]:
    """Rows by (size, cell, weight decay); the 200-step grid's rows (no size, no decay) are small / 0."""
    by = defaultdict(list)
    for r in rows:
        by[(r.get("size", "small"), r["cell"], r.get("weight_decay", 0.0))].append(r)
    return by


def lm_cell_stat(name: str, runs: list[dict]) -> CellStat:
    scores = {r["lr"]: lm_grid.bpb(r) for r in runs if r["seed"] == 0}
    best = best_rate_of(scores)
    values = [lm_grid.bpb(r) for r in sorted(runs, key=lambda r: r["seed"]) if r["lr"] == best]
    return CellStat(name, best, interior(scores, best), values)


def sweep_cells(runs: list[dict]) -> str:
    """'lr: seed-0 bpb (s1 x, s2 y)' for every rate, ascending."""
    parts = []
    for lr in sorted({r["lr"] for r in runs}):
        at = sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["seed"])
        first = [r for r in at if r["seed"] == 0]
        text = f"{lr:g}: " + (fmt(lm_grid.bpb(first[0])) if first else "-")
        others = [f"s{r['seed']} {fmt(lm_grid.bpb(r))}" for r in at if r["seed"] != 0]
        parts.append(text + (f" ({', '.join(others)})" if others else ""))
    return ", ".join(parts)


def lm_grid_table(rows, shown: set, planned: bool = True) -> str:
    """One line per sweep: every run, the best rate, whether it is interior,
    the seeds there and (`planned`: sweeps of lm_grid's plan, logged or not)
    the runs the sweep still needs."""
    lines = ["| size | params | tokens (per param) | cell | weight decay | lr sweep: val bpb seed 0 (other seeds) | "
             "best lr | interior | val bpb at best: mean (range, n) | next runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = lm_sweeps(rows)
    sweeps = lm_grid.sweeps_for(sorted({k[0] for k in by}, key=size_order), LM_CELLS)
    if not planned:
        sweeps = [sweep for sweep in sweeps if (sweep.size, sweep.cell, sweep.weight_decay) in by]
    for sweep in sweeps:
        runs = by.get((sweep.size, sweep.cell, sweep.weight_decay), [])
        todo = lm_grid.pending(sweep, rows) if planned else []
        nxt = ", ".join(f"lr {lr:g} s{seed}" for lr, seed in todo) or ("none: complete" if planned else "-")
        if not runs:
            lines.append(f"| {sweep.size} | | | {sweep.cell} | {sweep.weight_decay:g} | | | | | {nxt} |")
            continue
        shown.update(r["run"] for r in runs)
        done = [r for r in runs if r.get("val_bpb") is not None]
        head = done[0] if done else runs[0]
        if any(r["seed"] == 0 for r in runs):
            stat = lm_cell_stat(sweep.cell, runs)
            best = (f"{stat.best_lr:g} | {'yes' if stat.interior else 'no'} | "
                    f"{fmt(stat.mean)} ({fmt(stat.spread)}, {len(stat.values)})")
        else:
            best = " | | "
        lines.append(f"| {sweep.size} | {head['params']:,} | {head['tokens']:,} "
                     f"({head['tokens'] / head['params']:.2f}) | {sweep.cell} | {sweep.weight_decay:g} | "
                     f"{sweep_cells(runs)} | {best} | {nxt} |")
    return "\n".join(lines) + "\n"


def size_order(size: str) -> tuple:
    order = ["tiny", "small-48", "small-80", "small", "20m", "125m"]
    return (order.index(size) if size in order else len(order), size)


def best_cells(by, size) -> tuple[CellStat | None, ...]:
    """At `size`: softmax/adamw, parallax/adamw (each the weight decay whose
    seed-0 best is lowest), softmax/muon, parallax/muon, softmax-matched/muon;
    None for a cell without a seed-0 run."""
    def adamw(attention):
        stats = [lm_cell_stat(f"{attention}/adamw wd {wd:g}", runs) for (s, cell, wd), runs in by.items()
                 if s == size and cell == f"{attention}/adamw" and any(r["seed"] == 0 for r in runs)]
        return min(stats, key=lambda c: c.values[0]) if stats else None

    def muon(cell):
        runs = by.get((size, cell, 0.0))
        return lm_cell_stat(cell, runs) if runs and any(r["seed"] == 0 for r in runs) else None

    return adamw("softmax"), adamw("parallax"), muon("softmax/muon"), muon("parallax/muon"), \
        muon("softmax-matched/muon")


def lm_gap_table(rows) -> str:
    """The scaling view: per size, each optimizer's best cells and the gap
    Parallax minus softmax (negative: Parallax better) with its spread (the
    sum of the two cells' seed ranges); '-' where a cell has no seed-0 run."""
    by = lm_sweeps(rows)
    lines = ["| size | Parallax params | softmax/adamw | parallax/adamw | gap AdamW (spread) | softmax/muon | "
             "parallax/muon | gap Muon (spread) | softmax-matched/muon | gap vs matched (spread) | "
             "complete sweeps |", "|---" * 11 + "|"]
    for size in sorted({k[0] for k in by}, key=size_order):
        soft_a, par_a, soft_m, par_m, matched = best_cells(by, size)

        def cell(c):
            return "-" if c is None else f"{fmt(c.mean)} (n={len(c.values)}{'' if c.interior else ', edge'})"

        def gap(a, b):
            return "-" if a is None or b is None else f"{a.mean - b.mean:+.4f} ({a.spread + b.spread:.4f})"

        sweeps = lm_grid.sweeps_for([size], LM_CELLS)
        complete = sum(not lm_grid.pending(sweep, rows) for sweep in sweeps)
        columns = [cell(soft_a), cell(par_a), gap(par_a, soft_a), cell(soft_m), cell(par_m), gap(par_m, soft_m),
                   cell(matched), gap(par_m, matched)]
        lines.append(f"| {size} | {lm_grid.budget_params(size, BYTES):,} | " + " | ".join(columns)
                     + f" | {complete}/{len(sweeps)} |")
    return "\n".join(lines) + "\n"


def lm_claims(rows, label: str) -> list[tuple]:
    """(claim, evidence, verdict) rows of the LM claims at each size in `rows`."""
    by = lm_sweeps(rows)
    claims = []
    for size in sorted({k[0] for k in by}, key=size_order):
        soft_a, par_a, soft_m, par_m, matched = best_cells(by, size)
        where = f"{size}, {label}"
        for claim, better, other, names in (
                ("Parallax beats softmax under Muon", par_m, soft_m, ("parallax/muon", "softmax/muon")),
                ("Parallax beats softmax under AdamW", par_a, soft_a, ("parallax/adamw", "softmax/adamw")),
                ("Parallax + Muon beats the parameter-matched softmax + Muon", par_m, matched,
                 ("parallax/muon", "softmax-matched/muon"))):
            claims.append(compare_row(f"{claim} ({where})", better, other, names=names))
        if all((soft_a, par_a, soft_m, par_m)):
            unlock = (soft_m.mean - par_m.mean) - (soft_a.mean - par_a.mean)
            cells = [soft_a, par_a, soft_m, par_m]
            v, reasons = verdict(unlock, cells)
            claims.append((f"The Parallax gain is larger under Muon than under AdamW ({where})",
                           f"gain under Muon {soft_m.mean - par_m.mean:+.4f}, under AdamW "
                           f"{soft_a.mean - par_a.mean:+.4f} bpb; " + describe(cells), v, reasons))
        else:
            missing = [name for name, c in zip(("softmax/adamw", "parallax/adamw", "softmax/muon", "parallax/muon"),
                                               (soft_a, par_a, soft_m, par_m)) if c is None]
            claims.append((f"The Parallax gain is larger under Muon than under AdamW ({where})",
                           describe([c for c in (soft_a, par_a, soft_m, par_m) if c]), "open",
                           [f"no seed-0 run yet: {', '.join(missing)}"]))
    return claims


def describe(cells: list[CellStat]) -> str:
    def number(x):
        return "unsolved" if math.isnan(x) else f"{x:g}" if float(x).is_integer() else fmt(x)

    def one(c):
        if any(math.isnan(v) for v in c.values):
            return f"{c.name} at {c.best_lr:g}: seeds {', '.join(number(v) for v in c.values)}"
        return f"{c.name} {number(c.mean)} at {c.best_lr:g} (range {number(c.spread)}, n={len(c.values)})"
    return "; ".join(one(c) for c in cells)


def compare_row(claim: str, better: CellStat | None, other: CellStat | None, higher_is_better=False,
                names=("", "")) -> tuple:
    """The claim that `better` beats `other` (lower values are better unless
    `higher_is_better`); `names` name them where they have no seed-0 run yet."""
    if better is None or other is None:
        missing = ", ".join(name for name, c in zip(names, (better, other)) if c is None)
        return claim, describe([c for c in (better, other) if c]), "open", [f"no seed-0 run yet: {missing}"]
    unsolved = [f"{c.name}: a seed at the best rate did not solve" for c in (better, other)
                if any(math.isnan(v) for v in c.values)]
    if unsolved:
        return claim, describe([better, other]), "open", unsolved
    difference = better.mean - other.mean if higher_is_better else other.mean - better.mean
    v, reasons = verdict(difference, [better, other])
    return claim, f"difference {difference:+.4g}; " + describe([better, other]), v, reasons


def correction_table(rows) -> str:
    """Per-layer ||Cov_p(s2, v)|| / ||mu|| at the end of training: each Parallax
    sweep's best-rate and highest-rate runs (seed 0)."""
    lines, layers = [], 0
    for (size, cell, wd), runs in sorted(lm_sweeps(rows).items(), key=lambda kv: (size_order(kv[0][0]), kv[0][1:])):
        if not cell.startswith("parallax") or not any(r["seed"] == 0 for r in runs):
            continue
        best = lm_cell_stat(cell, runs).best_lr
        highest = max(r["lr"] for r in runs if r["seed"] == 0)
        for lr, why in [(best, "best")] + ([(highest, "highest")] if highest != best else []):
            final = next(r for r in runs if r["lr"] == lr and r["seed"] == 0).get("correction") or []
            if final and final[-1]["ratios"]:
                ratios = final[-1]["ratios"]
                layers = max(layers, len(ratios))
                lines.append(f"| {size} | {cell} | {wd:g} | {lr:g} ({why}) | {final[-1]['step']} | "
                             + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    if not lines:
        return "(no Parallax run logged yet)\n"
    return ("| size | cell | weight decay | lr | step | " + " | ".join(f"layer {i}" for i in range(layers)) + " |\n"
            + "|---" * (5 + layers) + "|\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------- MQAR

def cell_of(row: dict) -> str:
    return f"{row['attention']}/{row['optimizer']}"


def embed_label(row: dict) -> str:
    lr = embed_lr_of(row)
    return "= lr" if lr is None else f"{lr:g}"


def worst_pair(row: dict) -> float:
    return min(row["accuracy"].values())


def mqar_groups(rows) -> dict[tuple, list[dict]]:
    by = defaultdict(list)
    for r in rows:
        by[sweep_key(r)].append(r)
    return by


def mqar_order(key: tuple) -> tuple:
    device, steps, seq_len, attention, optimizer, embed = key
    return device, steps, seq_len, str(embed), MQAR_CELLS.index(f"{attention}/{optimizer}")


def mqar_cell_stat(runs: list[dict], value) -> CellStat:
    best = best_rate(runs)
    rates = {r["lr"] for r in runs if r["seed"] == 0}
    at = sorted((r for r in runs if r["lr"] == best), key=lambda r: r["seed"])
    return CellStat(cell_of(runs[0]), best, interior(rates, best), [value(r) for r in at])


def mqar_sweep_table(rows, shown: set) -> str:
    """Per (device, budget, length, cell, embedding rate): the worst pair
    count's accuracy at each rate (seed 0; other seeds in parentheses), the best
    rate and whether it is interior, the mean accuracy per pair count and the
    steps to SOLVED of each seed there, and the rates at which seed 0 solved."""
    by = mqar_groups(rows)
    pair_counts = sorted({int(n) for r in rows for n in r["accuracy"]})
    lines = ["| device | budget | seq len | width | cell | embed lr | worst-pair accuracy per lr: seed 0 (others) | "
             "best lr | interior | " + " | ".join(f"{n} pairs" for n in pair_counts)
             + " | steps to 0.99 (seeds at best) | rates solved |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(pair_counts) + "---|---|"]
    for key in sorted(by, key=mqar_order):
        runs = by[key]
        if not any(r["seed"] == 0 for r in runs):
            continue
        shown.update(id(r) for r in runs)
        stat = mqar_cell_stat(runs, worst_pair)
        at_best = sorted((r for r in runs if r["lr"] == stat.best_lr), key=lambda r: r["seed"])
        seed0 = {r["lr"]: worst_pair(r) for r in runs if r["seed"] == 0}
        per_lr = []
        for lr in sorted({r["lr"] for r in runs}):
            others = [f"s{r['seed']} {worst_pair(r):.3f}" for r in sorted(runs, key=lambda r: r["seed"])
                      if r["lr"] == lr and r["seed"] != 0]
            per_lr.append(f"{lr:g}: {seed0[lr]:.3f}" if lr in seed0 else f"{lr:g}: -")
            per_lr[-1] += f" ({', '.join(others)})" if others else ""
        accs = []
        for n in pair_counts:
            values = [r["accuracy"][str(n)] for r in at_best if str(n) in r["accuracy"]]
            accs.append(f"{statistics.mean(values):.3f}" if values else "")
        solves = ", ".join(f"s{r['seed']}: {r['steps_to_solve'] or '-'}" for r in at_best)
        solved = sum(acc >= SOLVED for acc in seed0.values())
        device, steps, seq_len = key[:3]
        lines.append(f"| {device} | {steps} | {seq_len} | {runs[0]['width']} | {cell_of(runs[0])} | "
                     f"{embed_label(runs[0])} | {', '.join(per_lr)} | {stat.best_lr:g} | "
                     f"{'yes' if stat.interior else 'no'} | " + " | ".join(accs)
                     + f" | {solves} | {solved}/{len(seed0)} |")
    return "\n".join(lines) + "\n"


def steps_or_budget(row: dict) -> float:
    return row["steps_to_solve"] if row["steps_to_solve"] is not None else math.nan


def mqar_claims(rows) -> list[tuple]:
    """Claims at each (device, budget, length, embedding policy) the log holds."""
    by = mqar_groups(rows)
    # Muon claims once per (device, budget, length); AdamW claims per embedding policy too.
    settings = sorted({(k[0], k[1], k[2], str(k[5]) if k[4] == "adamw" else "") for k in by})
    claims = []
    for device, steps, seq_len, adamw_embed in settings:
        def stat(cell, value=worst_pair):
            attention, optimizer = cell.split("/")
            for key, runs in by.items():
                if key[:5] == (device, steps, seq_len, attention, optimizer) and any(r["seed"] == 0 for r in runs) \
                        and (optimizer == "muon") == (adamw_embed == "") and (optimizer == "muon" or str(key[5]) == adamw_embed):
                    return mqar_cell_stat(runs, value)
            return None

        where = f"T={seq_len}, {steps} steps, {device}"
        if adamw_embed:
            where += ", AdamW embeddings at " + ("the swept rate" if adamw_embed == "None" else adamw_embed)
        cells = ["parallax/muon", "softmax/muon"] if not adamw_embed else ["parallax/adamw", "softmax/adamw"]
        for cell in cells:
            s = stat(cell)
            if s is not None:
                v, reasons = verdict(s.mean - SOLVED, [s])
                claims.append((f"{cell} solves MQAR ({where})", f"worst-pair accuracy {describe([s])}", v, reasons))
        pairs = ([("parallax/muon solves in fewer steps than softmax/muon", "parallax/muon", "softmax/muon",
                   steps_or_budget, False),
                  ("parallax/muon beats the parameter-matched softmax/muon on worst-pair accuracy", "parallax/muon",
                   "softmax-matched/muon", worst_pair, True)] if not adamw_embed else
                 [("parallax/adamw beats softmax/adamw on worst-pair accuracy", "parallax/adamw", "softmax/adamw",
                   worst_pair, True)])
        for claim, better, other, value, higher in pairs:
            if stat(better) and stat(other):
                claims.append(compare_row(f"{claim} ({where})", stat(better, value), stat(other, value), higher))
    return claims


# ---------------------------------------------------------------- plots

def plot_lm(runs, results: Path, lm_dir: Path):
    """Validation curves (best rate, seed 0) and the correction size per layer of the 200-step grid."""
    best = {}
    for r in runs:
        if r["seed"] == 0 and (r["cell"] not in best or lm_grid.bpb(r) < lm_grid.bpb(best[r["cell"]])):
            best[r["cell"]] = r
    fig, (ax_loss, ax_corr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for cell in LM_CELLS:
        if cell not in best:
            continue
        log = read_jsonl(lm_dir / best[cell]["run"] / "log.jsonl")
        val = [(r["step"], r["val_bpb"]) for r in log if r.get("kind") == "val"]
        ax_loss.plot(*zip(*val), marker="o", label=f"{cell} (lr {best[cell]['lr']:g})")
        if best[cell]["correction"] and best[cell]["correction"][0]["ratios"]:
            steps = [c["step"] for c in best[cell]["correction"]]
            for i, ratios in enumerate(zip(*[c["ratios"] for c in best[cell]["correction"]])):
                ax_corr.plot(steps, ratios, label=f"{cell} layer {i}", linestyle="-" if "muon" in cell else "--")
    ax_loss.set(xlabel="step", ylabel="validation bits per byte", title="Validation loss (best lr, seed 0)")
    ax_corr.set(xlabel="step", ylabel="||Cov_p(s2, v)|| / ||mu||", title="Parallax correction size per layer")
    for ax in (ax_loss, ax_corr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "lm_curves.png", dpi=120)
    plt.close(fig)


def plot_mqar(rows, path: Path):
    """Worst-pair accuracy against the learning rate (seed 0), one panel per (device, budget, length)."""
    by = mqar_groups(rows)
    settings = sorted({key[:3] for key in by})
    labels = sorted({(cell_of(runs[0]), embed_label(runs[0])) for runs in by.values()})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for key in sorted(by, key=mqar_order):
            seed0 = sorted((r["lr"], worst_pair(r)) for r in by[key] if r["seed"] == 0)
            label = (cell_of(by[key][0]), embed_label(by[key][0]))
            if key[:3] == setting and seed0:
                ax.plot(*zip(*seed0), marker="o", label=f"{label[0]} (embed {label[1]})",
                        color=f"C{labels.index(label) % 10}", linestyle="-" if key[4] == "muon" else "--")
        device, steps, seq_len = setting
        ax.set(xscale="log", xlabel="learning rate (hidden matrices)", ylim=(0, 1.05),
               title=f"T={seq_len}, {steps} steps, {device}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("worst-pair accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- assembly

def claims_table(claims) -> str:
    lines = ["| claim | evidence (seed means at each best rate) | verdict |", "|---|---|---|"]
    for claim, evidence, v, reasons in claims:
        lines.append(f"| {claim} | {evidence} | **{v}**" + (f": {'; '.join(reasons)}" if reasons else "") + " |")
    return "\n".join(lines) + "\n"


def tables(results: Path) -> dict[str, str]:
    """Every generated block, by name, from the logs under `results`."""
    grid = read_jsonl(results / "lm" / "runs.jsonl")
    short = read_jsonl(results / "lm_200steps" / "runs.jsonl")
    gpu = read_jsonl(results / "lm_gpu" / "runs.jsonl")
    out, shown = {}, set()
    out["lm-grid"] = lm_grid_table(grid, shown) if grid else "(no run logged yet)\n"
    out["lm-gaps"] = lm_gap_table(grid) if grid else "(no run logged yet)\n"
    out["lm-gpu"] = lm_grid_table(gpu, shown) if gpu else "(no run logged yet)\n"
    out["lm-200"] = lm_grid_table(short, shown, planned=False) if short else "(no run logged)\n"
    out["correction"] = correction_table(grid + gpu)
    out["correction-200"] = correction_table(short)
    claims = lm_claims(grid, "20 tokens/param, CPU float32") if grid else []
    claims += lm_claims(gpu, "20 tokens/param, GPU bf16") if gpu else []
    claims += lm_claims(short, "200 steps = 0.44 tokens/param, CPU float32") if short else []
    shown_mqar = set()
    every = []
    for name, log in MQAR_LOGS.items():
        rows = read_jsonl(results / log)
        every += [(name, r) for r in rows]
        out[name] = mqar_sweep_table(rows, shown_mqar) if rows else "(no run logged yet)\n"
        claims += mqar_claims(rows) if rows else []
    out["claims"] = claims_table(claims)
    missing = [f"| {r['run']} | lm | in no sweep of the grid |" for r in grid + gpu + short if r["run"] not in shown]
    missing += [f"| {name}: {cell_of(r)} lr {r['lr']:g} seed {r['seed']} T={r['seq_len']} | mqar | "
                "its sweep has no seed-0 run |" for name, r in every if id(r) not in shown_mqar]
    out["excluded"] = ("| run | log | why |\n|---|---|---|\n" + "\n".join(missing) + "\n" if missing
                       else "Every logged run appears in a table above.\n")
    out["rule"] = VERDICT_RULE + "\n"
    return out


def update(path: Path, blocks: dict[str, str]) -> None:
    """Replace each `<!-- report:NAME -->` ... `<!-- /report:NAME -->` block of `path`."""
    text = path.read_text()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- report:{re.escape(name)} -->\n).*?(<!-- /report:{re.escape(name)} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/study/results"))
    parser.add_argument("--update", type=Path, help="a markdown file whose report blocks to regenerate")
    args = parser.parse_args(argv)
    blocks = tables(args.results)
    print("\n".join(f"## {name}\n\n{body}" for name, body in blocks.items()))
    if args.update:  # as well as printing them: run_all.sh keeps the printout as results/tables.md
        update(args.update, blocks)
    short = read_jsonl(args.results / "lm_200steps" / "runs.jsonl")
    if short:
        plot_lm(short, args.results, args.results / "lm_200steps")
    sweeps = [r for log in ("mqar_cpu/mqar.jsonl", "mqar_gpu/mqar.jsonl") for r in read_jsonl(args.results / log)]
    if sweeps:
        plot_mqar(sweeps, args.results / "mqar.png")


if __name__ == "__main__":
    main()


