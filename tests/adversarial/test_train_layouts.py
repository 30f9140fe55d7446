"""train.py on hostile file-system layouts: --out, --cache-dir, --data and
--export-hf nested in each other or linked to each other; data folders holding FIFOs,
links to /dev/zero, dangling links, link loops, non-UTF-8 names and shards
named for both splits; --out holding the user's files, names like our temp
files, and run files that are FIFOs, folders or links. Whatever the run does
(train, or refuse with one line), it never blocks, and no file outside the
run's own set changes."""
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from .budget import budget, no_hang
from .runs import QUICK, assert_only_its_own_files_changed, one_error_line, run_main, snapshot, write_corpus

DATA_KINDS = ("file", "texts", "shards")
ODDITIES = ("fifo", "dev_zero", "dangling", "loop", "latin1_name", "hidden", "both_splits", "neither_split",
            "empty_file", "subfolder_link")
OUT_PLACES = ("apart", "inside_data", "is_data", "link_to_data", "new_nested", "is_corpus_file")
CACHE_PLACES = ("apart", "inside_data", "is_out", "inside_out")
# Where --export-hf goes; every place but "none", "apart" and "empty" overlaps the run, its data or its
# cache, or holds the user's files, so it is refused before any training.
EXPORT_PLACES = ("none", "apart", "empty", "is_out", "inside_out", "around_out", "inside_data", "is_cache",
                 "inside_cache", "user_files", "link_to_out")
EXPORT_ALLOWED = ("none", "apart", "empty")
OUT_CONTENTS = ("notes", "temp_lookalikes", "previous_log", "fifo_checkpoint", "folder_log", "link_log_outside",
                "dangling_summary", "damaged_log")
MAKES = {"previous_log": "log.jsonl", "folder_log": "log.jsonl", "link_log_outside": "log.jsonl",
         "damaged_log": "log.jsonl"}  # contents that make the same file exclude each other


def make_data(root: Path, kind: str, oddities) -> Path:
    data = root / "data"
    data.mkdir()
    if kind == "file":
        return write_corpus(data / "corpus.txt")
    if kind == "texts":
        write_corpus(data / "a.txt")
        (data / "sub").mkdir()
        write_corpus(data / "sub" / "b.txt")
    else:
        rng = np.random.default_rng(0)
        rng.integers(0, 200, 4000).astype(np.uint16).tofile(data / "corpus_train_000.bin")
        rng.integers(0, 200, 1000).astype(np.uint16).tofile(data / "corpus_val_000.bin")
    for oddity in oddities:
        ext = ".bin" if kind == "shards" else ".txt"
        if oddity == "fifo":
            os.mkfifo(data / f"pipe{ext}")
        elif oddity == "dev_zero":
            os.symlink("/dev/zero", data / f"zero{ext}")
        elif oddity == "dangling":
            os.symlink(data / "nowhere", data / f"gone{ext}")
        elif oddity == "loop":
            os.symlink(data / f"loop{ext}", data / f"loop{ext}")
        elif oddity == "latin1_name":
            with open(bytes(data) + b"/caf\xe9" + ext.encode(), "wb") as f:
                f.write(b"some text\n" * 50 if kind != "shards" else np.arange(50, dtype=np.uint16).tobytes())
        elif oddity == "hidden":
            (data / ".hidden").write_text("skipped")
        elif oddity == "both_splits" and kind == "shards":
            np.arange(50, dtype=np.uint16).tofile(data / "train_val.bin")
        elif oddity == "neither_split" and kind == "shards":
            np.arange(50, dtype=np.uint16).tofile(data / "tokenizer.bin")
        elif oddity == "empty_file":
            (data / f"empty{ext}").write_bytes(b"")
        elif oddity == "subfolder_link":
            os.symlink(root / "elsewhere", data / "linked")
    return data if kind != "file" else data / "corpus.txt"


def place(root: Path, data: Path, where: str) -> Path:
    folder = data if data.is_dir() else data.parent
    return {"apart": root / "runs" / "x", "inside_data": folder / "out", "is_data": folder,
            "link_to_data": root / "link", "new_nested": root / "a" / "b" / "c", "is_corpus_file": data}[where]


def fill_out(root: Path, out: Path, contents):
    out.mkdir(parents=True, exist_ok=True)
    for item in contents:
        if item == "notes":
            (out / "notes.txt").write_text("the user's notes")
        elif item == "temp_lookalikes":
            for name in ("checkpoint.pt.mine.tmp", "log.jsonl.backup.tmp", "checkpoint.pt.abcdefgh.tmp",
                         "checkpoint.pt.mine.parallax.tmp", "log.jsonl.ABCDEFGH.parallax.tmp"):
                (out / name).write_text("the user's")
        elif item == "previous_log":
            (out / "log.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
        elif item == "fifo_checkpoint":
            os.mkfifo(out / "checkpoint.pt")
        elif item == "folder_log":
            (out / "log.jsonl").mkdir()
        elif item == "link_log_outside":
            (root / "precious.txt").write_text("not the run's")
            os.symlink(root / "precious.txt", out / "log.jsonl")
        elif item == "dangling_summary":
            os.symlink(root / "nowhere", out / "summary.json")
        elif item == "damaged_log":
            (out / "log.jsonl").write_bytes(b'{"kind": "train", "step": 1}\n\xff garbage\n\n{"step": "x"}\n')


@st.composite
def layout(draw):
    return dict(kind=draw(st.sampled_from(DATA_KINDS)),
                oddities=draw(st.lists(st.sampled_from(ODDITIES), max_size=2, unique=True)),
                out=draw(st.sampled_from(OUT_PLACES)), cache=draw(st.sampled_from(CACHE_PLACES)),
                contents=draw(st.lists(st.sampled_from(OUT_CONTENTS), max_size=2,
                                       unique_by=lambda item: MAKES.get(item, item))),
                mode=draw(st.sampled_from([[], ["--resume"], ["--overwrite"]])),
                export=draw(st.sampled_from(EXPORT_PLACES)))


def export_dir(root: Path, data: Path, out: Path, cache: Path, where: str) -> Path | None:
    if where == "empty":
        (root / "empty").mkdir()
    elif where == "link_to_out":
        os.symlink(out, root / "out_link")
    return {"none": None, "apart": root / "exports" / "hf", "empty": root / "empty", "is_out": out,
            "inside_out": out / "hf", "around_out": out.parent, "inside_data": data / "hf", "is_cache": cache,
            "inside_cache": cache / "hf", "user_files": root / "elsewhere", "link_to_out": root / "out_link"}[where]


@budget(25)
@given(case=layout())
def test_hostile_layout(case):
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        root = Path(scratch)
        (root / "elsewhere").mkdir()
        (root / "elsewhere" / "untouchable.txt").write_text("x")
        data = make_data(root, case["kind"], case["oddities"])
        out = place(root, data, case["out"])
        if case["out"] == "link_to_data":
            os.symlink(data if data.is_dir() else data.parent, out)
        elif out.is_dir() or not out.exists():
            if case["contents"] and case["out"] != "is_data":
                fill_out(root, out, case["contents"])
        cache = {"apart": root / "cache", "inside_data": (data if data.is_dir() else data.parent) / "cache",
                 "is_out": out, "inside_out": out / "cache"}[case["cache"]]
        export = export_dir(root, data, out, cache, case["export"])
        before = snapshot(root)
        flags = [*QUICK, "--data", data, "--out", out, "--cache-dir", cache, *case["mode"]]
        with no_hang(120):
            code, stdout, err = run_main(flags if export is None else [*flags, "--export-hf", export])
        assert code in (0, 1, 2), (code, err)
        if code:
            one_error_line(code, err)
        else:
            assert "Traceback" not in err and all(line.startswith(("warning: ", "train.py: exported "))
                                                  for line in err.splitlines()), err
        if case["export"] not in EXPORT_ALLOWED:
            assert code == 2, (case["export"], code, err)
        assert_only_its_own_files_changed(root, before, out, cache, export)
        if code == 2 and str(out.relative_to(root)) not in before:
            assert not out.exists(), "a refused run left its --out behind"
