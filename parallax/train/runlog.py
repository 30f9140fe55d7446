"""log.jsonl: one JSON record per line, appended as the run goes.

A kill can leave a torn last line, and a resumed run redoes the steps after
its checkpoint; `RunLog.rollback` cuts the log back to what the checkpoint
covers, so a resumed log reads as if the run had never stopped. A line
damaged anywhere else (not JSON, not an object, no integer `step`) costs
only itself: rollback moves it to `<log>.unreadable` and keeps every
readable record around it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_write

UNREADABLE_SUFFIX = ".unreadable"


def _record(line: bytes) -> dict | None:
    """The record a whole line holds, or None if it holds none we can use."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return record


def scan_log(path: str | os.PathLike) -> tuple[list[dict], list[bytes]]:
    """(records, unreadable lines) of a log. Blank lines hold nothing and are
    skipped; an unterminated last line is a write torn by a kill (its step
    comes after every checkpoint) and is neither."""
    path = Path(path)
    if not path.exists():
        return [], []
    records, unreadable = [], []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                unreadable.append(line)
            else:
                records.append(record)
    return records, unreadable


def read_log(path: str | os.PathLike) -> list[dict]:
    """The readable records of a log, in order (see `scan_log`)."""
    return scan_log(path)[0]


class RunLog:
    """Appends records to a JSONL file (kept open; flushed per record)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.unreadable_path = self.path.with_name(self.path.name + UNREADABLE_SUFFIX)
        self._file = None

    def append(self, record: dict) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "a")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # name the file (a full disk's error does not)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def sync(self) -> None:
        """Make the records so far durable (before a checkpoint that covers them)."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # every record was flushed (or its failure raised) in `append`

    def rollback(self, step: int) -> tuple[list[dict], int]:
        """Keep the readable records up to `step` (rewritten atomically), after
        appending the unreadable lines to `unreadable_path`; return the records
        kept and the number of lines set aside."""
        self.close()
        records, unreadable = scan_log(self.path)
        records = [r for r in records if r["step"] <= step]
        if unreadable:  # saved before the log is rewritten without them
            with open(self.unreadable_path, "ab") as f:
                f.writelines(unreadable)
                f.flush()
                os.fsync(f.fileno())
        if self.path.exists():
            with atomic_write(self.path) as f:
                f.write("".join(json.dumps(r) + "\n" for r in records).encode())
        return records, len(unreadable)
