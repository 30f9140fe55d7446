import json

import pytest

from parallax.train.runlog import RunLog, read_log, scan_log


def test_a_torn_tail_ends_the_log_and_rollback_cuts_to_the_checkpoint(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    for step in range(1, 6):
        log.append({"kind": "train", "step": step})
    log.append({"kind": "val", "step": 4})
    log.sync()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 4]
    kept, set_aside = log.rollback(4)
    assert kept == [{"kind": "train", "step": s} for s in range(1, 5)] + [{"kind": "val", "step": 4}]
    assert set_aside == 0 and not log.unreadable_path.exists()  # a torn tail is a step to redo, not damage
    assert (tmp_path / "log.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in kept)
    log.append({"kind": "train", "step": 5})  # appending continues after a rollback
    assert read_log(tmp_path / "log.jsonl")[-1] == {"kind": "train", "step": 5}
    log.close()


DAMAGE = [b"[1, 2]\n", b"garbage\n", b'{"kind": "train"}\n', b'{"kind": "train", "step": "3"}\n',
          b'{"step": true}\n', b'{"step": 2.0}\n', b"\xff\xfe not UTF-8\n", b"[" * 100_000 + b"\n",
          b'{"step": 1, "loss": NaN\n']


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: repr(d[:20]))
def test_damage_anywhere_costs_only_the_damaged_lines(tmp_path, damage):
    lines = [json.dumps({"kind": "train", "step": s}).encode() + b"\n" for s in range(1, 9)]
    lines[3:3] = [damage, b"\n", b"   \n"]  # blank lines hold nothing and are not damage
    (tmp_path / "log.jsonl").write_bytes(b"".join(lines))
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 9))
    log = RunLog(tmp_path / "log.jsonl")
    kept, set_aside = log.rollback(6)
    assert [r["step"] for r in kept] == list(range(1, 7)) and set_aside == 1
    assert log.unreadable_path.read_bytes() == damage  # set aside, not lost
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 7))
    log.rollback(6)  # a second resume: nothing more to set aside
    assert log.unreadable_path.read_bytes() == damage


def test_missing_log(tmp_path):
    assert scan_log(tmp_path / "missing.jsonl") == ([], [])
    assert RunLog(tmp_path / "missing.jsonl").rollback(3) == ([], 0)
    assert not (tmp_path / "missing.jsonl").exists()
