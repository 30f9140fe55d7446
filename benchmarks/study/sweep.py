"""What both study grids share: which learning rate a sweep tries next, and
running runs in child processes until they are done or a deadline passes.

A sweep runs seed 0 at its starting rates; while its best rate is the lowest
or highest tried, one more rate a factor 2 past it (until the rates span
`max_range`); then the other seeds at the best rate. The plan is a function
of the logged runs alone, so a sweep resumes in any later sitting.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
from typing import Callable, Iterable


def best_rate(scores: dict[float, object]) -> float:
    """The rate of the lowest score (ties: the lowest rate)."""
    return min(sorted(scores), key=scores.__getitem__)


def interior(rates: Iterable[float], best: float) -> bool:
    rates = list(rates)
    return min(rates) < best < max(rates)


def wider_rate(rates: Iterable[float], best: float, max_range: float) -> float | None:
    """The next rate to try when `best` is the lowest or highest of `rates`, else None."""
    rates = list(rates)
    if max(rates) / min(rates) >= max_range:
        return None
    if best == min(rates):
        return best / 2
    if best == max(rates):
        return best * 2
    return None


def next_runs(start_rates, scores: dict[float, object], seeded_at_best: Callable[[float], set[int]], seeds,
              max_range: float) -> list[tuple[float, int]]:
    """The (lr, seed) runs a sweep can start, given the seed-0 `scores` per rate
    logged so far and the seeds logged at a rate (seeded_at_best(lr))."""
    missing = [(lr, 0) for lr in start_rates if lr not in scores]
    if missing:
        return missing
    best = best_rate(scores)
    wider = wider_rate(scores, best, max_range)
    if wider is not None:
        return [(wider, 0)]
    done = seeded_at_best(best)
    return [(best, seed) for seed in seeds if seed not in done]


def _child(target, job, conn) -> None:
    try:
        conn.send(target(job))
    except Exception as error:  # noqa: BLE001 - reported by the parent, which goes on with other runs
        conn.send(f"{type(error).__name__}: {error}")


def run_pending(plan: Callable[[set[str]], list[tuple[str, dict]]], target: Callable[[dict], dict | None],
                jobs: int, deadline: float | None, on_row: Callable[[str, dict], None]) -> list[str]:
    """Start the runs plan(names in flight or failed) offers, `jobs` at a time,
    each `target(job)` in a spawned process, until plan offers nothing and none
    runs. At `deadline` (time.time()) every run in flight gets one SIGTERM (a
    training run checkpoints and returns None; others just end) and none
    starts. on_row(name, row) gets each row a run returns. Returns the runs
    that raised or died."""
    ctx = mp.get_context("spawn")
    running: dict[str, tuple] = {}  # name -> (process, parent end of its pipe)
    failed: list[str] = []
    stopped: set[str] = set()
    try:
        while True:
            if deadline is not None and time.time() >= deadline:
                for name in set(running) - stopped:
                    running[name][0].terminate()
                    stopped.add(name)
            else:  # a failed run counts as in flight: what depends on it waits for the next sitting
                for name, job in plan(set(running) | set(failed)):
                    if len(running) >= jobs:
                        break
                    if name in running:
                        continue
                    parent, child = ctx.Pipe(duplex=False)
                    process = ctx.Process(target=_child, args=(target, job, child), name=name)
                    process.start()
                    child.close()
                    running[name] = (process, parent)
            if not running:
                return failed
            time.sleep(0.5)
            for name, (process, parent) in list(running.items()):
                if not parent.poll() and process.is_alive():
                    continue
                try:
                    row = parent.recv()
                except EOFError:  # ended without a word: killed, or stopped at the deadline
                    row = None if name in stopped else "the process died"
                process.join()
                del running[name]
                if isinstance(row, str):
                    failed.append(name)
                    print(f"{name} failed: {row}", file=sys.stderr, flush=True)
                elif row is not None:
                    on_row(name, row)
    except KeyboardInterrupt:  # the runs got the same SIGINT: training runs checkpoint and end
        for process, _ in running.values():
            process.join()
        raise
    finally:
        for process, _ in running.values():
            if process.is_alive():
                process.terminate()
                process.join()
