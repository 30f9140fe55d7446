"""A corpus for the GPU language grid on a machine that reaches no network:
the *.py sources of this interpreter's site-packages (test folders left out),
linked into one folder that train.py's --data reads as a directory of text
files (split into train / val by file).

    python -m benchmarks.study.corpus /tmp/study_corpus

Links that exist are kept, so a second call only adds what is missing. The
20m grid needs about 400M tokens a run: the corpus should hold at least a
few hundred MB (it prints its size) so that a run sees each byte a few times
at most.
"""
from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path

from parallax.train.data import SKIP_DIRS


def link_sources(root: Path, dest: Path) -> tuple[int, int]:
    """Link every *.py file under `root` (outside SKIP_DIRS and hidden folders)
    into `dest` at the same relative path; returns (files, bytes)."""
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            source = Path(dirpath) / name
            link = dest / source.relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(source)
            files += 1
            size += source.stat().st_size
    return files, size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to fill with links")
    parser.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                        help="where the sources are (default: this interpreter's site-packages)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root: {args.root} is not a directory")
    files, size = link_sources(args.root, args.dest)
    print(f"{args.dest}: {files:,} files, {size / 1e6:,.0f} MB from {args.root}")


if __name__ == "__main__":
    main()
