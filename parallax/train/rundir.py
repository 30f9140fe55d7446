"""The --out directory of a run: one run at a time, and no run overwritten by accident.

`RunDir.claim` takes an exclusive lock on `<out>/train.lock` (fcntl.flock: the
kernel drops it when its process dies, kill -9 included, so a stale lock file
never blocks), records the holder's pid and host in it, refuses a fresh run
into a directory that holds a previous run's outputs unless the caller
resumes it or overwrites it. An overwritten run's files, and the temp files
a killed run left behind, go only when `discard_previous` and
`discard_stale_temp_files` are called, once the new run has passed its own
checks; directories `claim` created are removed again by `release` if the
run wrote nothing into them.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import stat
from pathlib import Path

from .atomic import remove_stale_temp_files
from .checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME
from .config import ConfigError
from .runlog import UNREADABLE_SUFFIX

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

_NO_LINK_NO_WAIT = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # POSIX only

LOCK_NAME = "train.lock"
LOG_NAME, PLOT_NAME, SAMPLE_NAME, SUMMARY_NAME = "log.jsonl", "loss.png", "sample.txt", "summary.json"
UNREADABLE_LOG_NAME = LOG_NAME + UNREADABLE_SUFFIX  # damaged lines a resume set aside
# What a run writes; any of them marks the directory as holding a run.
RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_NAME, LOG_NAME, UNREADABLE_LOG_NAME, SUMMARY_NAME, PLOT_NAME, SAMPLE_NAME)


class RunDir:
    """Paths of a run's outputs; `claim` also makes this process their only writer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.previous: list[str] = []  # a previous run's files found by `claim`
        self._created: list[Path] = []  # directories `claim` made, deepest first

    def __getitem__(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def claim(cls, path: str | os.PathLike, *, resume: bool, overwrite: bool) -> "RunDir":
        """Create and lock the directory. Raises ConfigError("--out", ...) when it
        cannot be written, another live run holds it, or it holds a previous
        run and neither `resume` nor `overwrite` is set."""
        run = cls(path)
        try:
            is_file = run.path.exists() and not run.path.is_dir()
        except OSError as e:  # a name too long, say
            raise ConfigError("--out", f"cannot use {run.path}: {e.strerror}") from None
        if is_file:
            raise ConfigError("--out", f"{run.path} is a file, not a directory")
        run._make_directories()
        try:
            run._lock()
            for name in RUN_FILES:
                if os.path.lexists(run[name]) and not run[name].is_file():
                    raise ConfigError("--out", f"{run[name]} is not a regular file (a directory, FIFO, device or "
                                               "dangling link); move it away or choose another --out")
            run.previous = [name for name in RUN_FILES if run[name].exists()]
            if run.previous and not (resume or overwrite):
                raise ConfigError("--out", f"{run.path} holds a previous run ({', '.join(run.previous)}); "
                                           "continue it with --resume, replace it with --overwrite, or train into "
                                           "a new directory with --out NEW_DIR")
        except BaseException:
            run.release()
            raise
        return run

    def _make_directories(self) -> None:
        missing = [p for p in (self.path, *self.path.parents) if not os.path.lexists(p)]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("--out", f"cannot create {self.path}: {e.strerror}") from None
        self._created = missing

    def discard_previous(self) -> None:
        """Delete the previous run's files (--overwrite), and only those."""
        for name in self.previous:
            self[name].unlink(missing_ok=True)
        self.previous = []

    def discard_stale_temp_files(self) -> None:
        """Delete the temp files a killed run left (named as `atomic_write` names them)."""
        for name in RUN_FILES:
            remove_stale_temp_files(self[name])

    def _lock(self) -> None:
        lock = self[LOCK_NAME]
        while True:
            try:  # never through a link, and never waiting on a FIFO
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NO_LINK_NO_WAIT, 0o644)
            except OSError as e:
                raise ConfigError("--out", f"cannot write to {lock}: {e.strerror}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ConfigError("--out", f"{lock} is not a regular file; move it away or choose another --out")
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError("--out", f"{self.path} is in use by another run ({holder}); wait for it to "
                                           "finish or choose another --out") from None
            # The holder we raced with may have unlinked the file it locked: retry on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
        except OSError as e:
            os.close(fd)
            raise ConfigError("--out", f"cannot write to {self.path}: {e.strerror}") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Unlock and remove the lock file (only a claimed RunDir holds one),
        then the directories `claim` created, if the run left them empty."""
        if self._lock_fd is not None:
            self[LOCK_NAME].unlink(missing_ok=True)  # while still locked, so no one locks the old file
            os.close(self._lock_fd)
            self._lock_fd = None
        for directory in self._created:
            try:
                directory.rmdir()
            except OSError:  # not empty: the run wrote something, or someone else did
                break
        self._created = []


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
