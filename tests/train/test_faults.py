"""Faults injected into `train.py`'s main in this process: a full disk while
checkpointing or logging, a corrupt latest checkpoint, a torn log line and a
SIGINT. Each leaves one line on stderr and a run that `--resume` finishes
with the final loss of a run never interrupted."""
import errno
import json
import os
import signal

import pytest
import torch

from parallax.cli import main
from parallax.train import checkpoint as checkpoint_module
from parallax.train.runlog import RunLog, read_log

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "code.txt"
    path.write_bytes(open(checkpoint_module.__file__, "rb").read() * 8)
    return path


def flags(corpus, out, *extra):
    return ["--model", "tiny", "--data", str(corpus), "--out", str(out), "--batch-size", "4", "--seq-len", "32",
            "--steps", str(STEPS), "--eval-every", "8", "--eval-batches", "2", "--ckpt-every", "2",
            "--sample-tokens", "0", "--threads", "1", "--no-progress", *extra]


def final_loss(out):
    return json.loads((out / "summary.json").read_text())["val_loss"]


@pytest.fixture(scope="module")
def expected_loss(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert main(flags(corpus, out)) == 0
    return final_loss(out)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def resume_and_check(corpus, out, expected_loss, capsys):
    assert main(flags(corpus, out, "--resume")) == 0, capsys.readouterr().err
    assert final_loss(out) == expected_loss  # bit for bit
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_while_checkpointing(corpus, tmp_path, expected_loss, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 3:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    out = tmp_path / "run"
    assert main(flags(corpus, out)) == 1
    line = one_error_line(capsys)
    assert f"{out / 'checkpoint.pt'}: No space left on device" in line and "--resume" in line
    monkeypatch.undo()
    assert checkpoint_module.load_checkpoint(out / "checkpoint.pt")["step"] == 4  # the last complete one
    assert checkpoint_module.load_checkpoint(out / "checkpoint.prev.pt")["step"] == 2
    resume_and_check(corpus, out, expected_loss, capsys)


def test_full_disk_while_logging(corpus, tmp_path, expected_loss, capsys, monkeypatch):
    real_append = RunLog.append

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def append(self, record):
        if record["step"] == 7:
            self._file = FullDisk()
        real_append(self, record)

    monkeypatch.setattr(RunLog, "append", append)
    out = tmp_path / "run"
    assert main(flags(corpus, out)) == 1
    assert "log.jsonl: No space left on device" in one_error_line(capsys)
    monkeypatch.undo()
    resume_and_check(corpus, out, expected_loss, capsys)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(corpus, tmp_path, expected_loss, capsys, damage):
    out = tmp_path / "run"
    assert main(flags(corpus, out, "--stop-after", "10")) == 0
    damage(out / "checkpoint.pt")
    capsys.readouterr()
    assert main(flags(corpus, out, "--resume")) == 0
    assert "resuming from the checkpoint before it" in capsys.readouterr().out
    assert final_loss(out) == expected_loss
    assert [r["step"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"] == list(range(1, STEPS + 1))


def test_no_readable_checkpoint_refuses_to_resume(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(flags(corpus, out, "--stop-after", "4")) == 0
    truncate(out / "checkpoint.pt")
    flip_a_byte(out / "checkpoint.prev.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(flags(corpus, out, "--resume")) == 2
    line = one_error_line(capsys)
    assert line.startswith("train.py: error: --resume: no readable checkpoint") and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_torn_log_line_and_records_past_the_checkpoint_are_rolled_back(corpus, tmp_path, expected_loss, capsys):
    out = tmp_path / "run"
    assert main(flags(corpus, out, "--stop-after", "6")) == 0
    with open(out / "log.jsonl", "a") as f:  # a run killed after step 7's record, mid-way through step 8's
        f.write(json.dumps({"kind": "train", "step": 7, "loss": 1.0}) + "\n" + '{"kind": "train", "st')
    resume_and_check(corpus, out, expected_loss, capsys)


def test_sigint_finishes_the_step_saves_and_exits_130(corpus, tmp_path, expected_loss, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = []

    def interrupt_at_step_5(step, loss):
        if step == 5 and not seen:
            seen.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    from parallax.train import loop

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, loss_hook=interrupt_at_step_5))
    # A shell starts background jobs with SIGINT ignored, so compare with what was there, not the default.
    handler_before = signal.getsignal(signal.SIGINT)
    assert main(flags(corpus, out)) == 130
    line = one_error_line(capsys)
    assert line == f"train.py: stopped by SIGINT at step 6; saved {out / 'checkpoint.pt'}; continue with --resume"
    assert checkpoint_module.load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored
    monkeypatch.undo()
    resume_and_check(corpus, out, expected_loss, capsys)


def test_out_of_memory_exits_1_with_one_line(corpus, tmp_path, capsys, monkeypatch):
    def no_memory(step, loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    from parallax.train import loop

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, loss_hook=no_memory))
    out = tmp_path / "new" / "run"
    assert main(flags(corpus, out)) == 1
    line = one_error_line(capsys)
    assert line.startswith("train.py: error: out of memory (CUDA out of memory.") and "--batch-size" in line
    assert not (tmp_path / "new").exists()  # nothing was written: the folders the run made are gone


def test_a_stop_signal_during_the_final_sample_ends_the_run_at_once(corpus, tmp_path, capsys, monkeypatch):
    """The last step's checkpoint is saved before the sample: nothing is lost by not finishing it."""
    from parallax.models import GPT

    real_generate = GPT.generate

    def generate(self, idx, max_new_tokens, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(self, idx, 10**9, **kwargs)  # would run for hours

    monkeypatch.setattr(GPT, "generate", generate)
    out = tmp_path / "run"
    assert main([*flags(corpus, out), "--sample-tokens", "5"]) == 143
    assert one_error_line(capsys) == (f"train.py: stopped by SIGTERM at step {STEPS}; saved {out / 'checkpoint.pt'}; "
                                      "continue with --resume")
    assert not (out / "sample.txt").exists() and not (out / "summary.json").exists()
    monkeypatch.undo()
    assert main([*flags(corpus, out), "--sample-tokens", "5", "--resume"]) == 0
    assert (out / "sample.txt").exists() and (out / "summary.json").exists()


def test_damaged_log_lines_are_set_aside_with_a_warning(corpus, tmp_path, expected_loss, capsys):
    out = tmp_path / "run"
    assert main(flags(corpus, out, "--stop-after", "6")) == 0
    lines = (out / "log.jsonl").read_bytes().splitlines(keepends=True)
    damage = [b"\n", b"garbage\n", b'{"kind": "train", "step": "three"}\n']
    (out / "log.jsonl").write_bytes(b"".join(lines[:2] + damage + lines[2:]))
    capsys.readouterr()
    assert main(flags(corpus, out, "--resume")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "2 unreadable line(s)" in err[0]
    assert (out / "log.jsonl.unreadable").read_bytes() == b"".join(damage[1:])
    assert final_loss(out) == expected_loss
    assert [r["step"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"] == list(range(1, STEPS + 1))


def test_a_checkpoint_holding_values_of_the_wrong_type_is_not_read(corpus, tmp_path, expected_loss, capsys):
    out = tmp_path / "run"
    assert main(flags(corpus, out, "--stop-after", "10")) == 0
    state = checkpoint_module.load_checkpoint(out / "checkpoint.pt")
    state["train_config"] = ["not", "a", "dict"]
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(flags(corpus, out, "--resume")) == 0
    assert "holds a train_config of the wrong type" in capsys.readouterr().out  # resumed from the one before
    assert final_loss(out) == expected_loss
