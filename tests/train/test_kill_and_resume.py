"""Kill train.py at random moments (SIGKILL and SIGINT, several seeds), then
`--resume` until it finishes: the final validation loss and weights must be
those of a run never interrupted, the log must hold every step once, and no
interruption may print a traceback.

Kills aim at the training phase: each waits until the log reaches a random
step, then a random few milliseconds more, so it lands anywhere in a step,
an evaluation, a log write or a checkpoint save (one every 2 steps); one
kill per seed instead lands at a random moment of start-up.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parallax.train import TrainConfig, load_checkpoint, train
from parallax.train.runlog import read_log

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
FLAGS = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--steps", str(STEPS), "--eval-every", "8",
         "--eval-batches", "2", "--ckpt-every", "2", "--sample-tokens", "0", "--threads", "1", "--no-progress"]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kill") / "code.txt"
    path.write_bytes((ROOT / "parallax" / "train" / "loop.py").read_bytes() * 4)
    return path


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference: the same flags through `train`, in this process."""
    out = tmp_path_factory.mktemp("straight")
    cfg = TrainConfig(model="tiny", data=str(corpus), out=str(out), batch_size=4, seq_len=32, steps=STEPS,
                      eval_every=8, eval_batches=2, ckpt_every=2, sample_tokens=0, threads=1, progress=False)
    summary = train(cfg, stdout=open(os.devnull, "w"))
    return summary["val_loss"], load_checkpoint(out / "checkpoint.pt")["model"]


def launch(corpus, out, resume):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "train.py", *FLAGS, "--data", str(corpus), "--out", str(out)]
    return subprocess.Popen(args + (["--resume"] if resume else []), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(out: Path) -> int:
    try:
        return max((r["step"] for r in read_log(out / "log.jsonl") if r.get("kind") == "train"), default=0)
    except OSError:
        return 0


def lock_holder(out: Path):
    try:
        return json.loads((out / "train.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def interrupt(proc, out, rng, sig, during_startup):
    """Send `sig` at a random moment; return the process's (returncode, stderr)."""
    if during_startup:  # once the run holds --out: data, model and optimizer set-up, or the first steps
        while proc.poll() is None and lock_holder(out) != proc.pid:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        target = rng.randint(min(logged_steps(out) + 1, STEPS), STEPS)
        while proc.poll() is None and logged_steps(out) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("seed", SEEDS)
def test_random_kills_then_resume_finish_like_an_uninterrupted_run(seed, corpus, uninterrupted, tmp_path):
    rng = random.Random(seed)
    out = tmp_path / "run"
    kills = [signal.SIGKILL, signal.SIGINT]
    rng.shuffle(kills)
    startup_kill = rng.randrange(len(kills))
    for i, sig in enumerate(kills):
        code, err = interrupt(launch(corpus, out, resume=i > 0), out, rng, sig, during_startup=i == startup_kill)
        assert "Traceback" not in err, err
        if sig == signal.SIGINT and code != 0:  # it may have finished first
            assert code == 130 and len(err.strip().splitlines()) == 1, (code, err)
    proc = launch(corpus, out, resume=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err

    expected_loss, expected_weights = uninterrupted
    summary = (out / "summary.json").read_text()
    assert f'"val_loss": {expected_loss!r}' in summary  # bit for bit
    weights = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in log if r["kind"] == "val"] == [8, 16, 24]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "log.jsonl", "loss.png",
                                                     "summary.json"]
