"""Where a run reads and writes must not overlap: a run's own files (--out)
or its text cache (--cache-dir) inside the --data folder would become
training data, and the data must not be one of the run's own files."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, TrainConfig
from .data import default_cache_dir, stdlib_root
from .rundir import LOCK_NAME, RUN_FILES


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: compare as written
        return path.absolute()


def check_paths(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the flag when --out or --cache-dir lies inside
    the --data folder (the stdlib's, by default), or --data is a file of --out's
    run. The flags' own checks (that --data exists, say) have passed."""
    data = Path(cfg.data) if cfg.data is not None else stdlib_root()
    out = Path(cfg.out)
    if data.is_dir():
        cache = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
        for flag, path in (("--out", out), ("--cache-dir", cache)):
            if _resolved(path).is_relative_to(_resolved(data)):
                raise ConfigError(flag, f"{path} is inside the data folder {data}: what the run writes there would "
                                        "become training data; choose a folder outside it")
    elif _resolved(data) in {_resolved(out) / name for name in (*RUN_FILES, LOCK_NAME)}:
        raise ConfigError("--data", f"{data} is a file the run writes in --out {out}; train on another file")
