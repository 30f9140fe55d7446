import json

from parallax.train.runlog import RunLog, read_log


def test_a_torn_tail_ends_the_log_and_rollback_cuts_to_the_checkpoint(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    for step in range(1, 6):
        log.append({"kind": "train", "step": step})
    log.append({"kind": "val", "step": 4})
    log.sync()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 4]
    kept = log.rollback(4)
    assert kept == [{"kind": "train", "step": s} for s in range(1, 5)] + [{"kind": "val", "step": 4}]
    assert (tmp_path / "log.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in kept)
    log.append({"kind": "train", "step": 5})  # appending continues after a rollback
    assert read_log(tmp_path / "log.jsonl")[-1] == {"kind": "train", "step": 5}
    log.close()


def test_garbage_in_the_middle_ends_the_consistent_part(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    assert read_log(tmp_path / "log.jsonl") == [{"step": 1}]
    assert RunLog(tmp_path / "missing.jsonl").rollback(3) == []
    assert not (tmp_path / "missing.jsonl").exists()
