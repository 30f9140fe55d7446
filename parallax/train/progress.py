"""A dependency-free progress bar: redrawn in place with \\r on a terminal,
one line every `every` steps otherwise (logs, CI)."""
from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    def __init__(self, total: int, *, start: int = 0, every: int = 10, stream=None, enabled: bool = True,
                 width: int = 24, label: str | None = None):
        self.total, self.step, self.every, self.width = total, start, max(1, every), width
        self.prefix = "" if label is None else label + " "
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_step, self.t0 = start, time.perf_counter()
        self._drawn = False

    def update(self, step: int, **metrics) -> None:
        """Show progress at `step` (steps done) with metrics (loss=..., train_tok_s=...);
        `wall` is the time since the bar started, evaluations and checkpoints included."""
        self.step = step
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        frac = step / max(1, self.total)
        fill = int(frac * self.width)
        bar = "#" * fill + "-" * (self.width - fill)
        parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        eta_s = _hms(eta) if eta == eta else "--:--"
        line = f"{self.prefix}[{bar}] {step}/{self.total} {parts}{' ' if parts else ''}wall={_hms(elapsed)} eta={eta_s}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, message: str, stream=None) -> None:
        """Print a message line without garbling the bar."""
        self.clear()
        print(message, file=stream or sys.stdout, flush=True)

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
