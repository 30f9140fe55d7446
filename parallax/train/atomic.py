"""Write a file so that readers see the old version or the whole new one."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

# A temp file of `atomic_write(path)` is named `<path's name>.<8 random characters of
# mkstemp>.parallax.tmp`: cleanup deletes exactly such names.
TEMP_SUFFIX = ".parallax.tmp"
_TEMP_NAME = re.compile(r"(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


def temp_file_target(name: str) -> str | None:
    """The name of the file that `name` is an `atomic_write` temp file of, or None."""
    temp = _TEMP_NAME.fullmatch(name)
    return temp["name"] if temp else None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, verify: Callable[[Path], None] | None = None,
                 keep_previous: str | os.PathLike | None = None):
    """Yield a binary file; on success it is fsynced, checked by `verify(temp_path)`
    (which raises to reject it) and renamed over `path`. With `keep_previous`,
    the file `path` held until then is moved there first, so the two newest
    versions survive. On any error the temp file is removed and `path` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp's 0600 would make outputs private
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.strerror is not None:  # name the file (a full disk's error does not)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_stale_temp_files(path: str | os.PathLike) -> None:
    """Delete the regular files named as `atomic_write(path)` names its temp
    files (a killed process leaves them behind), and nothing else.
    Only call this while no other process can be writing `path`."""
    path = Path(path)
    with os.scandir(path.parent) as entries:
        stale = [entry.path for entry in entries
                 if temp_file_target(entry.name) == path.name and entry.is_file(follow_symlinks=False)]
    for name in stale:
        Path(name).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
