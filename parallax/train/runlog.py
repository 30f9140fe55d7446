"""log.jsonl: one JSON record per line, appended as the run goes.

A kill can leave a torn last line, and a resumed run redoes the steps after
its checkpoint; `RunLog.rollback` cuts the log back to what the checkpoint
covers, so a resumed log reads as if the run had never stopped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_write


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a log, up to the first line that is not a whole JSON
    object (a torn write ends the consistent part)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict):
                break
            records.append(record)
    return records


class RunLog:
    """Appends records to a JSONL file (kept open; flushed per record)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
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

    def rollback(self, step: int) -> list[dict]:
        """Keep the consistent records up to `step` (rewritten atomically); return them."""
        self.close()
        records = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        if self.path.exists():
            with atomic_write(self.path) as f:
                f.write("".join(json.dumps(r) + "\n" for r in records).encode())
        return records
