"""--resume after damage to a stopped run: lines of log.jsonl replaced by
garbage, blank lines, records whose step is not an int, torn or cut logs;
checkpoints truncated at any byte, flipped, replaced by a FIFO, a folder or
a link to /dev/zero, or gone; stale temp files and the user's look-alikes.
Each resume exits 0 with the final validation loss and weights of a run
never interrupted, bit for bit, a log holding each step at most once with
every unreadable line set aside, or exits 2 with one line and the folder
untouched."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parallax.train.runlog import read_log

from .budget import budget, no_hang
from .runs import one_error_line, run_main, snapshot, write_corpus

STEPS = 6
FLAGS = ["--model", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", str(STEPS), "--eval-every", "2",
         "--ckpt-every", "2", "--eval-batches", "1", "--sample-tokens", "0", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(corpus, a run stopped at step 4, the final loss and weights of the straight run)."""
    root = tmp_path_factory.mktemp("damaged")
    corpus = write_corpus(root / "corpus.txt")
    straight, stopped = root / "straight", root / "stopped"
    assert run_main([*FLAGS, "--data", corpus, "--out", straight])[0] == 0
    assert run_main([*FLAGS, "--data", corpus, "--out", stopped, "--stop-after", "4"])[0] == 0
    final = json.loads((straight / "summary.json").read_text())["val_loss"]
    return corpus, stopped, final, torch.load(straight / "checkpoint.pt", weights_only=True)["model"]


GARBAGE = st.sampled_from([b"garbage", b"[1, 2]", b"{}", b'{"kind": "train"}', b'{"kind": "train", "step": "3"}',
                           b'{"step": 2.5}', b'{"step": null}', b"\xff\xfe\x00", b"[" * 5000, b"", b"   "]) | \
    st.binary(max_size=40).filter(lambda b: b"\n" not in b)


@st.composite
def damage(draw):
    return dict(
        log=draw(st.lists(st.tuples(st.integers(0, 20), GARBAGE), max_size=3)),
        log_cut=draw(st.none() | st.floats(0, 1)),
        records_past=draw(st.booleans()),
        checkpoint=draw(st.sampled_from(["keep", "truncate", "flip", "garbage", "fifo", "folder", "dev_zero",
                                         "gone"])),
        previous=draw(st.sampled_from(["keep", "truncate", "flip", "gone"])),
        where=draw(st.floats(0, 1)),
        temp_files=draw(st.booleans()))


def damage_file(path: Path, how: str, where: float):
    data = path.read_bytes()
    at = int(where * (len(data) - 1))
    if how == "truncate":
        path.write_bytes(data[:at])
    elif how == "flip":
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    elif how in ("garbage", "fifo", "folder", "dev_zero", "gone"):
        path.unlink()
        {"garbage": lambda: path.write_bytes(b"not a checkpoint"), "fifo": lambda: os.mkfifo(path),
         "folder": path.mkdir, "dev_zero": lambda: os.symlink("/dev/zero", path), "gone": lambda: None}[how]()


@budget(12)
@given(d=damage())
def test_resume_after_damage(runs, d):
    corpus, stopped, final_loss, final_weights = runs
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        out = Path(scratch) / "run"
        shutil.copytree(stopped, out)
        log = out / "log.jsonl"
        lines = log.read_bytes().splitlines(keepends=True)
        inserted = []
        for at, junk in d["log"]:
            lines.insert(min(at, len(lines)), junk + b"\n")
            if junk.strip():
                inserted.append(junk + b"\n")
        if d["records_past"]:  # a run killed after logging steps its checkpoint does not hold
            lines += [json.dumps({"kind": "train", "step": s, "loss": 9.0}).encode() + b"\n" for s in (5, 6)]
        text = b"".join(lines)
        if d["log_cut"] is not None:
            text = text[:int(d["log_cut"] * len(text))]
        log.write_bytes(text)
        damage_file(out / "checkpoint.pt", d["checkpoint"], d["where"])
        damage_file(out / "checkpoint.prev.pt", d["previous"], d["where"])
        if d["temp_files"]:
            (out / "checkpoint.pt.abcd_123.parallax.tmp").write_bytes(b"left by a killed save")
            (out / "checkpoint.pt.mine.tmp").write_bytes(b"the user's")
        before = snapshot(out)
        with no_hang(120):
            code, _, err = run_main([*FLAGS, "--data", corpus, "--out", out, "--resume"])
        if code:
            assert code == 2, err
            one_error_line(code, err)
            assert snapshot(out) == before  # a refused resume changes nothing
            return
        summary = json.loads((out / "summary.json").read_text())
        assert summary["val_loss"] == final_loss and summary["step"] == STEPS  # bit for bit
        weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[name], final_weights[name]) for name in final_weights)
        steps = [r["step"] for r in read_log(log) if r.get("kind") == "train"]
        assert steps == sorted(set(steps)) and steps[-2:] == [STEPS - 1, STEPS]
        unreadable = out / "log.jsonl.unreadable"
        kept = unreadable.read_bytes() if unreadable.exists() else b""
        if d["log_cut"] is None:
            assert all(kept.count(line) >= inserted.count(line) for line in inserted)
        if d["temp_files"]:
            assert (out / "checkpoint.pt.mine.tmp").read_bytes() == b"the user's"
            assert not (out / "checkpoint.pt.abcd_123.parallax.tmp").exists()
