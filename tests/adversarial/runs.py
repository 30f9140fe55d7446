"""What the train.py properties share: a small corpus, flags that make any
accepted run take a second, main() called in this process, and snapshots of
every file a run must leave alone."""
import contextlib
import io
import os
import stat
from pathlib import Path

from parallax.cli import main
from parallax.hf.export import EXPORT_FILE
from parallax.train.atomic import temp_file_target
from parallax.train.rundir import LOCK_NAME, RUN_FILES

# A run accepted with these flags trains one step of the tiny model and stops.
QUICK = ["--model", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--stop-after", "1",
         "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "0", "--threads", "1", "--no-progress"]


def write_corpus(path: Path) -> Path:
    path.write_bytes(Path(__file__).read_bytes() * 4)
    return path


def run_main(argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of train.py's main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors (and --help) exit from the parser
            code = e.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: (kind, content or target)} of everything under root, not following links."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                found[str(path.relative_to(root))] = ("file", path.read_bytes())
            else:
                found[str(path.relative_to(root))] = ("dir" if stat.S_ISDIR(mode) else "other", None)
    return found


def is_run_file(name: str) -> bool:
    """A file train.py writes in --out (its temp files included)."""
    return name in (*RUN_FILES, LOCK_NAME) or temp_file_target(name) in RUN_FILES


def assert_only_its_own_files_changed(root: Path, before: dict, out: Path, cache: Path,
                                      export: Path | None = None) -> None:
    """Everything under root that `before` (a snapshot) holds is unchanged,
    except the run files in --out; anything new is --out itself (with the
    folders above it), a run file in it, under the cache, or (with
    --export-hf) the export folder, the folders above it and an export's files in it."""
    after = snapshot(root)
    real_out, real_cache = out.resolve(), cache.resolve()
    real_export = export.resolve() if export is not None else None
    for name, entry in before.items():
        path = root / name
        if path.parent.resolve() == real_out and is_run_file(path.name):
            continue  # the run's own: replaced, resumed or (--overwrite) removed
        assert after.get(name) == entry, f"{name} changed"
    for name in set(after) - set(before):
        path = (root / name).resolve()
        assert (path == real_out or path in real_out.parents or real_cache in (path, *path.parents)
                or path.parent == real_out and is_run_file(path.name)
                or real_export is not None and (path == real_export or path in real_export.parents
                                                or path.parent == real_export and EXPORT_FILE.fullmatch(path.name))
                ), f"{name} appeared"


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: "), (code, err)
    assert "Traceback" not in err
    return lines[0]
