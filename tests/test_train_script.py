"""train.py as users run it: exit codes and one-line errors for every bad flag.

Whole runs of the documented commands (torchrun included) are in
tests/test_docs_commands.py."""
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.cli import main
from parallax.train.config import TrainConfig, build_parser, flag_name, help_text, parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--no-progress"]


# run, summary and _free_port are also the helpers of other train.py subprocess tests (torchrun, FSDP).
def run(args, tmp_path, timeout=120, launcher=(sys.executable, "train.py")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARALLAX_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def summary(stdout: str) -> dict:
    return dict(kv.split("=", 1) for kv in stdout.strip().splitlines()[-1].split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_flag_in_a_subprocess(tmp_path):
    """As users see it; the table below covers every flag in this process."""
    args, flag = ["--model", "gigantic"], "--model"
    proc = run(args, tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def text_file(tmp):
    path = tmp / "text.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return str(path)


def shards(tmp, train_tokens, val_tokens=range(100), raw=None):
    folder = tmp / "shards"
    folder.mkdir(exist_ok=True)
    np.asarray(train_tokens, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(val_tokens, dtype=np.uint16).tofile(folder / "val.bin")
    if raw is not None:
        (folder / "val.bin").write_bytes(raw)
    return str(folder)


def empty_dir(tmp):
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def a_file(tmp):
    (tmp / "a_file").write_text("x")
    return str(tmp / "a_file")


def text_dir(tmp):
    (tmp / "texts").mkdir()
    for i in range(3):
        (tmp / "texts" / f"{i}.txt").write_text("some text\n" * 100)
    return str(tmp / "texts")


# (flags, the flag the one error line must name); callables build files under tmp_path.
BAD_FLAGS = [
    (["--model", "gigantic"], "--model"),
    (["--attention", "linear"], "--attention"),
    (["--parameter-matched"], "--parameter-matched"),  # with --attention parallax
    (["--data", "/no/such/path"], "--data"),
    (["--data", empty_dir], "--data"),
    (["--data", lambda t: (t / "empty.txt").write_text("") and "" or str(t / "empty.txt")], "--data"),
    (["--data", lambda t: shards(t, range(5), raw=b"\x01\x02\x03")], "--data"),  # odd byte count
    (["--data", text_dir, "--cache-dir", a_file], "--cache-dir"),
    (["--vocab-size", "0"], "--vocab-size"),
    (["--vocab-size", "70000"], "--vocab-size"),
    (["--data", text_file, "--vocab-size", "512"], "--vocab-size"),
    (["--data", lambda t: shards(t, [1, 2, 300] * 50), "--vocab-size", "300"], "--vocab-size"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "6e39"], "--lr"),  # the optimizer step itself would overflow float32
    (["--weight-decay", "1e29", "--lr", "100"], "--weight-decay"),  # lr x decay past 1e30
    (["--lr", "fast"], "--lr"),
    (["--embed-lr", "-1e-3"], "--embed-lr"),
    (["--adamw-lr", "nan"], "--embed-lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--momentum", "1.0"], "--momentum"),
    (["--momentum", "nan"], "--momentum"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--schedule", "linear"], "--schedule"),
    (["--warmup", "-1"], "--warmup"),
    (["--cooldown", "1.5"], "--cooldown"),
    (["--cooldown", "nan"], "--cooldown"),
    (["--min-lr-ratio", "-0.1"], "--min-lr-ratio"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--model", "tiny", "--seq-len", "65"], "--seq-len"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--stop-after", "-3"], "--stop-after"),
    (["--eval-every", "0"], "--eval-every"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--ckpt-every", "0"], "--ckpt-every"),
    (["--log-every", "0"], "--log-every"),
    (["--sample-tokens", "-1"], "--sample-tokens"),
    (["--progress=yes"], "--progress"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--device", "cuda:99"], "--device"),  # no machine has it
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads"),  # OpenMP would abort (or segfault) starting them
    (["--threads", str(2**31)], "--threads"),
    (["--batch-size", str(10**12)], "--batch-size"),
    (["--device", "cuda:" + "9" * 30], "--device"),
    (["--dtype", "float8"], "--dtype"),
    (["--backend", "cuda"], "--backend"),
    (["--deterministic=no"], "--deterministic"),
    (["--compile=no"], "--compile"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**63)], "--seed"),
    (["--out", ""], "--out"),
    (["--data", ""], "--data"),
    (["--cache-dir", ""], "--cache-dir"),
    (["--data", lambda t: str(t)], "--out"),  # --out inside the data folder
    (["--data", lambda t: str(t), "--out", lambda t: str(t / "runs" / "x")], "--out"),
    (["--data", text_dir, "--cache-dir", lambda t: str(t / "texts" / "cache")], "--cache-dir"),
    (["--data", lambda t: (t / "run").mkdir() or (t / "run" / "log.jsonl").write_text("x" * 999) and
      str(t / "run" / "log.jsonl"), "--out", lambda t: str(t / "run"), "--resume"], "--data"),  # its own log
    (["--out", a_file], "--out"),
    (["--out", lambda t: a_file(t) + "/sub"], "--out"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--export-hf", ""], "--export-hf"),
    (["--export-hf", a_file], "--export-hf"),
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("args,flag", BAD_FLAGS, ids=[" ".join(a if isinstance(a, str) else "<path>" for a in args)
                                                      for args, _ in BAD_FLAGS])
def test_every_bad_flag_exits_2_with_one_line_before_training(tmp_path, capsys, args, flag):
    args = [a(tmp_path) if callable(a) else a for a in args]
    out = tmp_path / "out"
    base = ["--model", "tiny", "--batch-size", "2", "--data", text_file(tmp_path), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(base + args))  # later flags win
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train.py: error: {flag}"), err
    assert "step" not in captured.out  # nothing trained
    assert not out.exists()  # nothing written, not even an empty --out


def test_every_field_is_one_flag_with_its_default_and_help():
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    fields = dataclasses.fields(TrainConfig)
    assert list(actions) == [f.name for f in fields]
    for field in fields:
        action = actions[field.name]
        assert action.option_strings[0] == flag_name(field.name) and action.default == field.default
        assert field.metadata["help"] and action.help == help_text(field)
        # Each help states the default once: the parser appends it, or the help says what None means.
        assert action.help.count("default") == 1, action.help
        # --no-x only where x is on by default
        assert any(o.startswith("--no-") for o in action.option_strings) == (field.default is True)


def test_help_prints_each_default_once_and_the_documented_devices(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps" in text  # docs/training.md's list
    assert parse_config([]) == TrainConfig()
    assert parse_config(["--backend", "torch", "--no-deterministic", "--adamw-lr", "0.01", "--seq-len", "7"]) == \
        TrainConfig(backend="torch", deterministic=False, embed_lr=0.01, seq_len=7)


def test_bad_data_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([*TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]


def test_token_ids_past_the_vocabulary_beyond_the_scanned_prefix_stop_with_one_line(tmp_path, capsys, monkeypatch):
    """The up-front scan reads SCAN_LIMIT tokens; batches are checked as well."""
    from parallax.train import data

    monkeypatch.setattr(data, "SCAN_LIMIT", 64)
    folder = shards(tmp_path, [1] * 64 + [2, 900] * 500)
    code = main([*TINY, "--data", folder, "--vocab-size", "512", "--out", str(tmp_path / "o"), "--threads", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: --vocab-size: a batch holds token id 900"), err


def test_diverging_run_exits_1_with_a_clear_message(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    out = tmp_path / "o"
    args = [*TINY, "--data", str(text), "--out", str(out), "--steps", "10", "--ckpt-every", "1", "--threads", "1",
            "--optimizer", "adamw", "--lr", "1e30", "--embed-lr", "1e30", "--grad-clip", "0", "--warmup", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan" in err[0].lower() and "checkpoint" in err[0]
    assert (out / "checkpoint.pt").exists()  # the last good one is kept


def test_a_second_run_on_a_busy_out_exits_2_naming_the_holder(tmp_path, capsys):
    from parallax.train.rundir import RunDir

    holder = RunDir.claim(tmp_path / "o", resume=False, overwrite=False)  # a live run
    try:
        assert main([*TINY, "--data", text_file(tmp_path), "--out", str(tmp_path / "o"), "--resume"]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: --out: ") and f"pid {os.getpid()} on host" in err[0]


def test_overwrite_keeps_the_previous_run_when_the_new_one_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the previous run")
    assert main([*TINY, "--out", str(out), "--overwrite", "--data", str(tmp_path / "missing.txt")]) == 2
    assert main([*TINY, "--out", str(out), "--overwrite", "--data", empty_dir(tmp_path)]) == 2
    assert (out / "checkpoint.pt").read_bytes() == b"the previous run"


LAYOUT = st.lists(st.sampled_from(["missing", "empty", "run", "file"]), max_size=5)


@settings(max_examples=60, deadline=None)
@given(layout=LAYOUT, resume=st.booleans(), overwrite=st.booleans(), matched=st.booleans())
def test_default_out_takes_the_first_free_name_and_resume_the_newest_run(tmp_path_factory, layout, resume, overwrite,
                                                                          matched):
    """Whatever runs/ holds: a fresh run never lands on a name that holds something, runs of the same
    preset number upwards, and --resume / --overwrite take the last name taken before the first free one."""
    root = tmp_path_factory.mktemp("cwd")
    base = "small-softmax-matched" if matched else "small-softmax"
    names = [base if n == 1 else f"{base}-{n}" for n in range(1, len(layout) + 2)]
    for name, state in zip(names, layout):
        path = root / "runs" / name
        if state == "file":
            path.parent.mkdir(exist_ok=True)
            path.write_text("x")
        elif state != "missing":
            path.mkdir(parents=True)
            if state == "run":
                (path / "log.jsonl").write_text("")
    free = next(i for i, state in enumerate(layout + ["missing"]) if state in ("missing", "empty"))
    expected = names[free - 1] if (resume or overwrite) and free > 0 else names[free]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = TrainConfig(attention="softmax", parameter_matched=matched, resume=resume, overwrite=overwrite)
        assert cfg.resolved().out == os.path.join("runs", expected)
        assert TrainConfig(out="mine", resume=resume).resolved().out == "mine"  # an explicit --out is kept
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("env,name", [({"WORLD_SIZE": "2"}, "WORLD_SIZE"), ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
                                      ({"RANK": "-1"}, "RANK"), ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0",
                                                                 "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK")])
def test_a_launch_environment_not_from_torchrun_is_refused(tmp_path, capsys, monkeypatch, env, name):
    """WORLD_SIZE=2 without torchrun would wait for a second process for ever."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "o"
    assert main([*TINY, "--data", text_file(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train.py: error: {name}: "), err
    assert not out.exists()


def test_bfloat16_on_cpu_trains(tmp_path, capsys):
    """A documented --dtype: the torch path's backward ran under the autocast dtype and failed."""
    out = tmp_path / "o"
    args = [*TINY, "--data", text_file(tmp_path), "--out", str(out), "--steps", "2", "--eval-every", "2",
            "--sample-tokens", "4", "--threads", "1", "--dtype", "bfloat16"]
    assert main(args) == 0, capsys.readouterr().err
    assert summary(capsys.readouterr().out)["status"] == "done"
