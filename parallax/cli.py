"""`python train.py`: flags -> TrainConfig -> `train`, then `--export-hf`.

It sits above parallax.train and parallax.hf: hf reads train's checkpoints,
so train never imports hf. parallax.hf is imported only for --export-hf,
whose directory is checked before any training and written after it, from
the run's newest readable checkpoint.

Every failure prints one line on stderr, never a traceback:
- status 2: a bad flag, unusable data, --out or --export-hf, or a --resume
  that does not fit the checkpoint; nothing was trained.
- status 1: a NaN/inf loss, an output (the export included) that could not
  be written (a full disk), or memory that ran out; the newest complete
  checkpoint is kept.
- status 128 + N: stopped by signal N (SIGINT 130, SIGTERM 143); after the
  first signal a checkpoint is saved at the end of the current step.
"""
from __future__ import annotations

import os
import sys

from .train.checkpoint import CheckpointError
from .train.config import PROG, ConfigError, TrainConfig, parse_config


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return status


def _export_paths(cfg: TrainConfig) -> tuple[str, ...]:
    """What the export directory must keep out of: the run, its data and its text cache."""
    return tuple(path for path in (cfg.out, cfg.data, cfg.cache_dir) if path is not None)


def _check_export_dir(cfg: TrainConfig) -> None:
    from .hf.export import ExportError, check_export_dir

    try:
        check_export_dir(cfg.export_hf, _export_paths(cfg))
    except ExportError as e:
        raise ConfigError("--export-hf", str(e)) from None


def _export(cfg: TrainConfig) -> int:
    """Rank 0 exports the run's newest readable checkpoint (the one training just wrote)."""
    from .hf.export import ExportError, export_checkpoint

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    retry = f"the run is intact: export it with python -m parallax.hf.export {cfg.out} DIR"
    try:
        result = export_checkpoint(cfg.out, cfg.export_hf, _export_paths(cfg))
    except ExportError as e:
        return _fail(f"--export-hf: {e}; {retry}", 1)
    except OSError as e:
        return _fail(f"--export-hf: cannot write {e.filename or cfg.export_hf}: {e.strerror or e}; {retry}", 1)
    except KeyboardInterrupt:
        return _fail(f"--export-hf: interrupted; {retry}", 130)
    for problem in result.skipped:
        print(f"{PROG}: warning: {problem}; exported the checkpoint before it", file=sys.stderr, flush=True)
    # stderr: the summary stays the last line on stdout
    print(f"{PROG}: exported {result.checkpoint} to {result.out} (transformers format)", file=sys.stderr, flush=True)
    return 0


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def main(argv=None) -> int:
    from .train.loop import NonFiniteLossError, TrainingInterrupted, train

    if hasattr(sys.stdout, "reconfigure"):  # a path that is not UTF-8 is printed escaped, not fatal
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        cfg = parse_config(argv).resolved()  # --out named, so the export can be checked against it
        if cfg.export_hf is not None:
            _check_export_dir(cfg)
        train(cfg)
    except ConfigError as e:  # DataError included
        return _fail(str(e), 2)
    except NonFiniteLossError as e:
        return _fail(str(e), 1)
    except TrainingInterrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        return _fail("interrupted; the newest complete checkpoint is intact, continue with --resume", 130)
    except (OSError, CheckpointError) as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        what = e.strerror if getattr(e, "strerror", None) else e
        return _fail(f"cannot write the run's outputs: {where}{what}; the newest complete checkpoint is intact, "
                     "free space (or fix the problem) and continue with --resume", 1)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        return _fail(f"out of memory ({' '.join(str(e).split())[:200]}); the newest complete checkpoint is intact, "
                     "lower --batch-size or --seq-len (--grad-accum keeps the tokens per step)", 1)
    return 0 if cfg.export_hf is None else _export(cfg)


if __name__ == "__main__":
    sys.exit(main())
