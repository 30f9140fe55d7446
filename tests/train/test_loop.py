import io
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from parallax.train import NonFiniteLossError, TrainConfig, load_checkpoint, train
from parallax.train.config import ConfigError


# Tiny models run faster on one thread than on two busy ones.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~250 KB of Python source as one text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["os.py", "random.py", "argparse.py", "functools.py", "dataclasses.py"]
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_bytes(b"\n".join((stdlib / n).read_bytes() for n in names))
    return path


def tiny(corpus, out, **overrides) -> TrainConfig:
    base = dict(model="tiny", data=str(corpus), out=None if out is None else str(out), batch_size=8, seq_len=64,
                steps=20, warmup=5, eval_every=10, eval_batches=2, sample_tokens=0, progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("attention,optimizer", [("parallax", "muon"), ("softmax", "adamw")])
def test_tiny_run_learns_and_writes_outputs(corpus, tmp_path, attention, optimizer):
    out = io.StringIO()
    cfg = tiny(corpus, tmp_path, steps=40, attention=attention, optimizer=optimizer, sample_tokens=20)
    probed = []
    summary = train(cfg, stdout=out, eval_hook=lambda step, model: probed.append((step, type(model).__name__)))
    assert summary["status"] == "done" and summary["step"] == 40
    assert probed == [(10, "GPT"), (20, "GPT"), (30, "GPT"), (40, "GPT")]
    assert summary["val_loss"] < math.log(256) - 1.0, summary
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5]) - 5 * 1.0
    assert [r["step"] for r in log if r["kind"] == "val"] == [10, 20, 30, 40]
    for name in ("loss.png", "sample.txt", "summary.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    last = out.getvalue().strip().splitlines()[-1]
    fields = dict(kv.split("=", 1) for kv in last.split())
    for key in ("val_loss", "val_bpb", "unigram_bpb", "tokens_per_s", "params"):
        assert key in fields
    assert int(fields["params"]) == summary["params"]


def test_stop_after_then_resume_is_bit_identical(corpus, tmp_path):
    straight = train(tiny(corpus, tmp_path / "a", ckpt_every=7), stdout=io.StringIO())
    first = train(tiny(corpus, tmp_path / "b", stop_after=10), stdout=io.StringIO())
    assert first["status"] == "stopped" and first["step"] == 10
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 10
    resumed = train(tiny(corpus, tmp_path / "b", resume=True), stdout=io.StringIO())
    assert resumed["status"] == "done" and resumed["step"] == 20
    assert resumed["val_loss"] == straight["val_loss"]  # bit for bit
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 21))


def test_resume_refuses_a_different_model(corpus, tmp_path):
    train(tiny(corpus, tmp_path, steps=2), stdout=io.StringIO())
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny(corpus, tmp_path, steps=4, attention="softmax", resume=True), stdout=io.StringIO())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    def poison(step, loss):
        return loss * float("nan") if step >= 6 else loss

    with pytest.raises(NonFiniteLossError, match="step 7.*checkpoint"):
        train(tiny(corpus, tmp_path, ckpt_every=4), loss_hook=poison, stdout=io.StringIO())
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--seq-len"):
        TrainConfig(model="tiny", seq_len=65).validate()
    with pytest.raises(ConfigError, match="--steps"):
        TrainConfig(steps=-1).validate()
    assert TrainConfig().validate().matrix_lr == 0.03
    assert TrainConfig(optimizer="adamw").matrix_lr == 3e-3


def test_resume_of_a_finished_run_says_so_and_writes_nothing(corpus, tmp_path):
    done = train(tiny(corpus, tmp_path, steps=6, sample_tokens=5), stdout=io.StringIO())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    out = io.StringIO()
    again = train(tiny(corpus, tmp_path, steps=6, sample_tokens=5, resume=True), stdout=out)
    assert again == json.loads((tmp_path / "summary.json").read_text()) and again["val_loss"] == done["val_loss"]
    lines = out.getvalue().strip().splitlines()
    assert f"{tmp_path} already finished step 6 of --steps 6: nothing to do" in lines[-2]
    assert dict(kv.split("=", 1) for kv in lines[-1].split())["val_loss"] == f"{done['val_loss']:.4f}"
    assert "step 6: val_loss" not in out.getvalue() and "sample" not in out.getvalue()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before
    longer = train(tiny(corpus, tmp_path, steps=8, sample_tokens=5, resume=True), stdout=io.StringIO())
    assert longer["status"] == "done" and longer["step"] == 8  # a larger --steps continues it


def test_runs_without_out_get_their_own_directories(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = (io.StringIO(), io.StringIO())
    train(tiny(corpus, None, steps=2), stdout=first)
    train(tiny(corpus, None, steps=2), stdout=second)
    assert first.getvalue().startswith("out: runs/tiny-parallax\n")
    assert second.getvalue().startswith("out: runs/tiny-parallax-2\n")
    softmax = train(tiny(corpus, None, steps=2, attention="softmax"), stdout=io.StringIO())
    assert softmax["out"] == "runs/tiny-softmax"
    resumed = train(tiny(corpus, None, steps=3, resume=True), stdout=io.StringIO())
    assert resumed["out"] == "runs/tiny-parallax-2" and resumed["step"] == 3  # the newest run
    assert (tmp_path / "runs" / "tiny-parallax" / "summary.json").exists()


def test_evaluation_and_the_sample_show_progress(corpus, tmp_path, capsys):
    train(tiny(corpus, tmp_path, steps=2, eval_every=2, eval_batches=4, batch_size=2, sample_tokens=8,
               progress=True), stdout=io.StringIO())
    err = capsys.readouterr().err.splitlines()  # not a terminal: a few lines per phase
    assert [line.split("]")[1].split()[0] for line in err if line.startswith("eval [")] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.split("]")[1].split()[0] for line in err if line.startswith("sample [")] == ["2/8", "4/8", "6/8",
                                                                                            "8/8"]
    assert any(line.startswith("[") and "2/2" in line for line in err)  # the training bar


def test_compiled_run_matches_the_eager_run(corpus, tmp_path, monkeypatch, traceable_empty):
    """`train.py --compile` on CPU at batch > 1: torch.compile of GPT traces the attention's torch path in
    the forward and backward (aot_eager: the tracing inductor does, without its slow CPU code generation)
    and trains as the eager run does."""
    real_compile = torch.compile
    compiled_models = []

    def compile_with_aot_eager(model, **kwargs):
        compiled_models.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    short = dict(batch_size=2, seq_len=32, steps=3, eval_every=3, eval_batches=1)
    compiled = train(tiny(corpus, tmp_path / "compiled", compile=True, **short), stdout=io.StringIO())
    eager = train(tiny(corpus, tmp_path / "eager", **short), stdout=io.StringIO())
    assert [type(m).__name__ for m in compiled_models] == ["GPT"]
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
