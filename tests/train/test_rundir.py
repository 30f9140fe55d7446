"""--out ownership: one live run per directory, stale locks never block, and
a previous run is only continued or replaced when asked."""
import json
import os
import socket

import pytest

from parallax.train.config import ConfigError
from parallax.train.rundir import LOCK_NAME, RunDir


def test_a_second_claim_names_the_holder_and_the_first_release_frees_it(tmp_path):
    first = RunDir.claim(tmp_path / "run", resume=False, overwrite=False)
    with pytest.raises(ConfigError, match=rf"--out: .* is in use by another run \(pid {os.getpid()} on host "
                                          rf"{socket.gethostname()}, started "):
        RunDir.claim(tmp_path / "run", resume=True, overwrite=False)
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunDir.claim(tmp_path / "run", resume=False, overwrite=False).release()


# Named like temp files of ours, but not exactly: the user's, never deleted.
USER_FILES = ["checkpoint.pt.mine.tmp", "log.jsonl.backup.tmp", "checkpoint.pt.abc12345.tmp",
              "checkpoint.pt.ABC12345.parallax.tmp", "xcheckpoint.pt.abc12345.parallax.tmp"]


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    stale = tmp_path / "checkpoint.pt.abc_1234.parallax.tmp"  # killed mid-save
    stale.write_bytes(b"half a checkpoint")
    for name in USER_FILES:
        (tmp_path / name).write_text("the user's")
    run = RunDir.claim(tmp_path, resume=False, overwrite=False)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert stale.exists()  # until the run has passed its checks
    run.discard_stale_temp_files()
    assert not stale.exists()
    assert all((tmp_path / name).read_text() == "the user's" for name in USER_FILES)
    run.release()


def test_a_refused_claim_removes_no_temp_file(tmp_path):
    stale = tmp_path / "log.jsonl.abcdefgh.parallax.tmp"
    stale.write_text("left by a killed run")
    (tmp_path / "log.jsonl").write_text("a previous run")
    with pytest.raises(ConfigError, match="holds a previous run"):
        RunDir.claim(tmp_path, resume=False, overwrite=False)
    assert stale.exists()


def test_release_removes_the_directories_claim_created_if_nothing_was_written(tmp_path):
    run = RunDir.claim(tmp_path / "new" / "deeper" / "out", resume=False, overwrite=False)
    run.release()
    assert list(tmp_path.iterdir()) == []
    run = RunDir.claim(tmp_path / "new" / "deeper" / "out", resume=False, overwrite=False)
    (tmp_path / "new" / "notes.txt").write_text("someone else's")
    run.release()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["new", "new/notes.txt"]


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.prev.pt", "log.jsonl", "summary.json"])
def test_a_fresh_run_refuses_a_directory_holding_a_previous_run(tmp_path, name):
    (tmp_path / name).write_text("previous")
    (tmp_path / "notes.txt").write_text("not ours")
    with pytest.raises(ConfigError, match=rf"holds a previous run \({name}\); continue it with --resume, replace it "
                                          r"with --overwrite, or train into a new directory with --out NEW_DIR"):
        RunDir.claim(tmp_path, resume=False, overwrite=False)
    assert not (tmp_path / LOCK_NAME).exists()  # the refusal released the lock
    RunDir.claim(tmp_path, resume=True, overwrite=False).release()
    assert (tmp_path / name).exists()
    run = RunDir.claim(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / name).exists()  # kept until the new run has passed its checks
    run.discard_previous()
    run.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own files go


def test_unusable_out_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out: .*file is a file, not a directory"):
        RunDir.claim(tmp_path / "file", resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="--out: cannot create .*file/sub"):
        RunDir.claim(tmp_path / "file" / "sub", resume=False, overwrite=False)
