"""Loss curves as a PNG (matplotlib, Agg backend; skipped if matplotlib is missing)."""
from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write
from .runlog import read_log


def plot_losses(log_path: str | Path, png_path: str | Path, *, title: str = "", baseline: float | None = None) -> Path | None:
    """Train (light, and its running mean) and val loss vs step from a JSONL log.

    `baseline`: the unigram cross-entropy in nats, drawn as a dashed line.
    Returns the PNG path, or None when matplotlib is unavailable.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_log(log_path)
    train, val = _points(records, "train", "loss"), _points(records, "val", "val_loss")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8)
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.5, ms=4, label="val")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label="unigram")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_write(png_path) as f:  # a kill mid-save leaves the old plot
        fig.savefig(f, format="png")
    plt.close(fig)
    return png_path


def _points(records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of the records of `kind`; a value that is not a float-sized number is skipped."""
    points = []
    for r in records:
        value = r.get(key)
        if r.get("kind") == kind and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                points.append((r["step"], float(value)))
            except OverflowError:
                continue
    return points
