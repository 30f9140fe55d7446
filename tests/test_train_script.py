"""train.py as users run it: subprocesses, exit codes, stdout/stderr, torchrun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from parallax.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--no-progress"]


def run(args, tmp_path, timeout=120, launcher=(sys.executable, "train.py")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARALLAX_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def summary(stdout: str) -> dict:
    return dict(kv.split("=", 1) for kv in stdout.strip().splitlines()[-1].split())


def test_tiny_end_to_end_on_the_stdlib_corpus(tmp_path):
    out = tmp_path / "run"
    proc = run([*TINY, "--steps", "6", "--eval-every", "3", "--sample-tokens", "16", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = summary(proc.stdout)
    assert s["status"] == "done" and s["step"] == "6"
    for key in ("val_loss", "val_bpb", "unigram_bpb", "tokens_per_s", "params"):
        assert float(s[key]) > 0
    assert 4.0 < float(s["unigram_bpb"]) < 5.5  # bytes of Python source
    assert "standard library" in proc.stdout
    assert {"checkpoint.pt", "log.jsonl", "loss.png", "sample.txt", "summary.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("args,flag", [
    (["--steps", "-1"], "--steps"),
    (["--model", "gigantic"], "--model"),
])
def test_bad_flags_in_a_subprocess(tmp_path, args, flag):
    proc = run(args, tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args,flag", [
    (["--optimizer", "sgd"], "--optimizer"),
    (["--attention", "linear"], "--attention"),
    (["--model", "tiny", "--seq-len", "65"], "--seq-len"),
    (["--data", "/no/such/path"], "--data"),
    (["--stop-after", "-3"], "--stop-after"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "ten"], "--steps"),
    (["--schedule", "linear"], "--schedule"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--dtype", "float8"], "--dtype"),
])
def test_bad_flags_exit_2_with_one_line(capsys, args, flag):
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_bad_data_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([*TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "train.py")
    proc = run([*TINY, "--steps", "3", "--eval-every", "3", "--sample-tokens", "0", "--out", str(out)],
               tmp_path, timeout=90, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc.stdout)
    assert s["world_size"] == "2" and s["step"] == "3" and float(s["val_loss"]) > 0
    assert proc.stdout.count("val_loss=") == 1  # only rank 0 reports


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
